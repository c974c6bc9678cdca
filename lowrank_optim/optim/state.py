"""A parameter's optimizer state: how it is built, checked when loaded, and counted.

``optimizer.state[p]`` holds ``step`` (a float32 CPU scalar, as torch keeps it), the rule's keys in their
storage (float, or INT8 codes with an absmax vector: :mod:`lowrank_optim.quant.storage`), the update's
keys (the limiter's ``limiter_norm``), and for a projected weight ``projector`` (its state dict). On FSDP2
shards every entry that follows the parameter's rows (or, on the left side, the columns of R) is a
DTensor, so distributed checkpoints hold every rank's piece; the rest every rank holds whole.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import rules as _rules
from .. import updates as _updates
from ..distributed import Local, RowShard, Split, is_sharded, local
from ..quant.storage import FLOAT, INT8, Storage, largest_piece_blocks, storage_of

Comm = Local | RowShard


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low-rank moments are kept in float32 at least: float64 weights keep float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def plain_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Plain parameters' moments: the parameter's dtype, as torch.optim.AdamW keeps them (bf16 for
    bf16 weights), except float16, whose range would flush Adam's V = g² to zero: float32 there."""
    return torch.float32 if dtype == torch.float16 else dtype


def uses_8bit(group: dict[str, Any], numel: int) -> bool:
    """Whether a state tensor of ``numel`` elements is stored as blockwise INT8 in ``group``."""
    return group["state_bits"] == 8 and numel >= group["min_8bit_size"]


def new_step() -> Tensor:
    return torch.tensor(0.0, dtype=torch.float32)


def fresh(rule: _rules.Rule, update: _updates.Update | None, group: dict[str, Any], piece: Tensor,
          split: Split, global_shape: tuple[int, ...]) -> dict[str, Any]:
    """Zero state for a tensor (R, or a plain parameter's gradient) of ``global_shape`` of which this rank
    steps ``piece`` (like ``piece``: its dtype and device): the step counter, the rule's keys in their
    storage, the update's keys. On shards the entries that follow the split become DTensors."""
    out: dict[str, Any] = {"step": new_step()}
    whole = rule.init(torch.empty(global_shape, dtype=piece.dtype, device="meta"), group)
    for key, zero in rule.init(piece, group).items():
        out.update(_entries(rule, group, key, zero, piece, split, tuple(whole[key].shape)))
    if update is not None:
        out.update(update.init(piece, group))
    return out


def _entries(rule: _rules.Rule, group: dict[str, Any], key: str, zero: Tensor, piece: Tensor, split: Split,
             global_shape: tuple[int, ...]) -> dict[str, Any]:
    signed = key not in rule.nonnegative
    follows = split.axis is not None and len(global_shape) > split.axis and global_shape[split.axis] == split.length
    storage: Storage = INT8 if uses_8bit(group, math.prod(global_shape)) and rule.storable(key, zero, piece) else FLOAT
    blocks = None
    if storage is INT8 and follows:
        blocks = largest_piece_blocks(global_shape, split.axis, split.comm.world)
    entries = storage.zeros(key, zero, signed=signed, blocks=blocks)
    if not follows:
        return entries
    comm = split.comm
    out = {key: comm.wrap(entries[key], split.axis, split.length)}
    if storage is INT8:
        out[f"{key}_absmax"] = comm.wrap(entries[f"{key}_absmax"], 0, comm.world * blocks)
    return out


def local_view(state: dict[str, Any], keys: tuple[str, ...]) -> tuple[dict[str, Any], frozenset[str]]:
    """This rank's pieces of a state (DTensors to their local tensors, which share storage: writes in place
    persist), and which of ``keys`` are split over the ranks."""
    if not any(is_sharded(v) for v in state.values()):
        return state, frozenset()
    view = {k: local(v) for k, v in state.items() if k != "projector"}
    return view, frozenset(k for k in keys if is_sharded(state.get(k)))


def first_moment(rule: _rules.Rule, state: dict[str, Any]) -> Tensor | None:
    """The rule's first moment (``rule.first_moment``) as a float tensor shaped like R, this rank's piece,
    dequantized if stored as INT8; None before the first step or for a rule that keeps none."""
    key = rule.first_moment
    if key is None or key not in state:
        return None
    view, _ = local_view(state, (key,))
    return storage_of(view, key).load(view, key, signed=True)


# ---------------------------------------------------------------------------- loading
def check_loaded(where: str, rule: _rules.Rule, group: dict[str, Any], state: dict[str, Any],
                 shape: tuple[int, ...]) -> None:
    """Raise ValueError when a loaded state does not fit ``rule`` for a tensor of ``shape`` (R's, or the
    parameter's): a key missing, of another shape, or INT8 codes without their absmax."""
    expected = rule.init(torch.empty(shape, device="meta"), group)
    for key, zero in expected.items():
        if not isinstance(state.get(key), Tensor):
            raise ValueError(f"{where}: state has no tensor {key!r}, which rule={rule.name!r} keeps (was it saved "
                             "with another rule, or another momentum setting?)")
        if tuple(state[key].shape) != tuple(zero.shape):
            raise ValueError(f"{where}: {key} has shape {tuple(state[key].shape)}, expected {tuple(zero.shape)}")
        _check_int8(where, state, key, zero.numel())


def _check_int8(where: str, state: dict[str, Any], key: str, numel: int) -> None:
    codes, absmax = state[key], state.get(f"{key}_absmax")
    if codes.dtype != torch.uint8 and absmax is None:
        return
    blocks = -(-numel // 256)
    if isinstance(absmax, Tensor) and absmax.dtype != torch.float32:
        raise ValueError(f"{where}: INT8 moments keep their scales '{key}_absmax' in float32; the checkpoint's are "
                         f"{absmax.dtype} (an integer scale would be truncated at every step)")
    if codes.dtype == torch.uint8 and not local(codes).is_contiguous():
        raise ValueError(f"{where}: the INT8 codes {key!r} are not contiguous (a view of another tensor); save "
                         f"them with .contiguous()")
    if is_sharded(absmax) and codes.dtype == torch.uint8:
        # a piece of a sharded parameter: the absmax is padded to the same length on every rank
        piece = absmax.to_local().numel()
        if absmax.numel() == piece * absmax.device_mesh.size() and piece * 256 >= codes.to_local().numel():
            return
    if codes.dtype == torch.uint8 and isinstance(absmax, Tensor) and absmax.numel() > blocks:
        # more scales than one process's blocks: each rank's piece padded to the largest (an FSDP2 checkpoint)
        raise ValueError(f"{where}: the checkpoint holds {absmax.numel()} '{key}_absmax' values where {blocks} (one per "
                         "block of 256) are needed: it was saved on another number of ranks. INT8 moments resume on "
                         "the number of ranks that saved them (float moments reshard freely)")
    if codes.dtype != torch.uint8 or not isinstance(absmax, Tensor) or absmax.numel() != blocks:
        raise ValueError(f"{where}: INT8 moments need uint8 {key!r} and {blocks} float32 '{key}_absmax' values "
                         "(one per block of 256); the checkpoint's are incomplete")


def check_values(where: str, rule: _rules.Rule, state: dict[str, Any], dtype: torch.dtype) -> None:
    """Raise ValueError for values a step cannot continue from: a ``step`` that is not a finite integer
    >= 0, the rule's float moments in another dtype than ``dtype`` (what the step keeps them in) or
    non-finite, a key in ``rule.nonnegative`` below zero, INT8 codes with a bad absmax, a ``reset_step``
    outside [0, step], a ``proj_gap`` below 1, a ``next_refresh`` (the refresh schedule) below 0 other than
    ``policies.REBUILD`` (-1: rebuild the subspace at the next step)."""
    step = _scalar(where, "step", state["step"])
    if step < 0 or step != int(step):
        raise ValueError(f"{where}: step={step!r}; a step count is an integer >= 0")
    for key in rule.keys:
        value = local(state.get(key))
        if not isinstance(value, Tensor):
            continue
        if value.dtype == torch.uint8 and f"{key}_absmax" in state:
            check_finite_entries(where, "", {f"{key}_absmax": state[f"{key}_absmax"]}, nonnegative=True)
            continue
        if value.dtype != dtype:
            raise ValueError(f"{where}: {key} is {value.dtype}; this optimizer keeps it in {dtype} (was the "
                             "state dict edited, or saved for a parameter of another dtype?)")
        check_finite_entries(where, "", {key: value}, nonnegative=key in rule.nonnegative)
    for key, lowest, highest in (("reset_step", 0, step), ("proj_gap", 1, float("inf")),
                                 ("next_refresh", -1, float("inf"))):
        if key in state:
            value = _scalar(where, key, state[key])
            if not lowest <= value <= highest or value != int(value):
                raise ValueError(f"{where}: {key}={value!r}; it must be an integer in [{lowest}, {highest}]")


def _scalar(where: str, key: str, value: Any) -> float:
    value = local(value)
    if not isinstance(value, Tensor) or value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{where}: {key} must be a real scalar tensor, got {_describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where}: {key}={number!r}; it must be finite")
    return number


def check_finite_entries(where: str, what: str, entries: dict[str, Any], nonnegative: bool = False) -> None:
    """Raise ValueError when a floating-point tensor among ``entries`` holds inf or NaN (or, with
    ``nonnegative``, a negative value), naming the key."""
    for key, value in entries.items():
        value = local(value)
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.device.type == "meta":
            continue
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: {what + ' ' if what else ''}{key} holds inf or NaN; the state dict is "
                             "corrupt (resume from an earlier checkpoint)")
        if nonnegative and value.numel() and bool((value < 0).any()):
            raise ValueError(f"{where}: {what + ' ' if what else ''}{key} holds negative values, and it is a "
                             "second moment (>= 0); the state dict is corrupt")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value) if len(repr(value)) < 40 else type(value).__name__


def normalize_step(state: dict[str, Any]) -> dict[str, Any]:
    """A loaded state with a Python-number ``step`` (torch.optim.AdamW loads those) gets the float32 tensor."""
    step = state.get("step")
    if isinstance(step, (int, float)) and not isinstance(step, bool):
        state = {**state, "step": torch.tensor(float(step), dtype=torch.float32)}
    return state


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors (nested in dicts) to ``device`` keeping their dtype; ``step`` counters stay put."""
    if isinstance(value, Tensor):
        return value.to(device=device)
    if isinstance(value, dict):
        return {k: (v if k == "step" else to_device(v, device)) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- counting
def moment_keys() -> set[str]:
    """Every state key any registered rule keeps, with its INT8 absmax."""
    keys = {k for rule in _rules.REGISTRY.values() for k in rule.keys}
    return keys | {f"{k}_absmax" for k in keys}


def tensor_bytes(value: Any) -> int:
    """Bytes this process keeps: a DTensor counts its local piece."""
    value = local(value)
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0
