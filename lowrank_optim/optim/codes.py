"""What ``state_dict()`` writes for the few state entries that are not numbers: codes that
``torch.distributed.checkpoint``'s flattened state dicts take (``StateDictOptions(
flatten_optimizer_state_dict=True)``, torchtitan's default, accepts tensors, ints, floats and dicts only).

Inside the optimizer they stay as they are; a checkpoint holds:

* ``side`` (a projector's: ``"left"``/``"right"``) as its index in :data:`CODES` ``["side"]``;
* ``variant`` (the DCT's) and ``*_dtype`` (an INT4 tensor's dtype) likewise;
* ``*_shape`` (an INT4 tensor's shape, a list) as ``{"0": m, "1": n, ...}``.

``load_state_dict`` reads both forms, so checkpoints written before the codes still load. The code
tables only ever grow at their end: a checkpoint's codes keep their meaning.
"""

from __future__ import annotations

from typing import Any

#: key (or key suffix, for ``_dtype``) -> the values its codes stand for, in code order
CODES: dict[str, tuple[str, ...]] = {
    "side": ("left", "right"),
    "variant": ("makhoul", "matmul", "trion"),
    "_dtype": ("float32", "bfloat16", "float16", "float64"),
}


def _table(key: Any) -> tuple[str, ...] | None:
    if not isinstance(key, str):
        return None
    return CODES.get(key) or (CODES["_dtype"] if key.endswith("_dtype") else None)


def _encode(key: Any, value: Any) -> Any:
    table = _table(key)
    if table is not None and isinstance(value, str) and value in table:
        return table.index(value)
    if isinstance(key, str) and key.endswith("_shape") and isinstance(value, (list, tuple)):
        return {str(i): int(n) for i, n in enumerate(value)}
    if isinstance(value, dict):
        return {k: _encode(k, v) for k, v in value.items()}
    return value


def _decode(key: Any, value: Any) -> Any:
    table = _table(key)
    if table is not None and isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(table):
            raise ValueError(f"load_state_dict: {key}={value!r} is no code of {', '.join(map(repr, table))}")
        return table[value]
    if isinstance(key, str) and key.endswith("_shape") and isinstance(value, dict):
        return [value[str(i)] for i in range(len(value))]
    if isinstance(value, dict):
        return {k: _decode(k, v) for k, v in value.items()}
    return value


def encoded(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every parameter's non-numeric entries coded (new dicts: the optimizer's own
    state is not touched)."""
    return {**state_dict, "state": {p: _encode(None, s) for p, s in state_dict["state"].items()}}


def decoded(state_dict: Any) -> Any:
    """The inverse of :func:`encoded`; a state dict without codes is returned as it is."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        return state_dict  # loading's own checks name what is wrong
    return {**state_dict, "state": {p: _decode(None, s) for p, s in state_dict["state"].items()}}
