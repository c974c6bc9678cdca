"""Gradients that hold inf or NaN: found for every parameter before the step writes anything.

The group key ``nonfinite`` says what a step does with them:

* ``"raise"`` (default): :class:`NonFiniteGradientError` naming the parameter; weights, moments, bases
  and step counters are as they were, so the step can be retried or skipped;
* ``"skip"``: the whole step is skipped (every group of this ``step()`` call, as ``torch.amp.GradScaler``
  skips ``optimizer.step()``): nothing changes, step counters included, and the skip is counted in every
  group's ``"nonfinite_skipped"`` (an integer, saved and loaded with ``state_dict()``);
* ``"ignore"``: no check, torch.optim.AdamW's behaviour: inf and NaN go into the moments and the
  weights. Where a step would otherwise fail midway it still refuses before any change: at a subspace
  refresh (an SVD of a non-finite gradient poisons the basis), and for the parameters of a group with
  ``state_bits=8`` and INT8 weights (a block's scale cannot hold inf or NaN).

Under layer-wise updates (``lro.layerwise``) with ``max_grad_norm`` the measuring pass finds every
non-finite gradient of the step before its first update, so a step is skipped or refused whole, as in the
ordinary loop (:func:`decide`). Without it each parameter is stepped as its gradient arrives: those stepped
before the first non-finite gradient stay stepped, the rest of that backward is skipped, and the skip is
counted once.

The check is one pass over each gradient: a float32 sum per gradient (``torch._foreach_norm`` on CUDA),
non-finite when any element is, confirmed exactly (``isfinite``) only for the gradients it flags (a sum
of finite values can overflow), then one host synchronisation for all of them. On FSDP2 shards the flags
are summed over the ranks, so every rank takes the same decision and names the same parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..distributed import local
from ..projectors import NonFiniteGradientError
from ..quant.weights import Int8Weight

if TYPE_CHECKING:
    from .lowrank import LowRankAdamW

#: The group key that counts skipped steps.
SKIPPED = "nonfinite_skipped"


def skip_step(opt: "LowRankAdamW", only: set[int] | None) -> bool:
    """Whether this step is skipped (counted in every group); raises under ``nonfinite="raise"``.

    Checks every parameter with a gradient (of ``only``, when given) before anything is written."""
    items = list(_checked(opt, only))
    if not items:
        return False
    meta = next(((group, i) for group, i, _, grad in items if grad.device.type == "meta"), None)
    if meta is not None:
        raise ValueError(f"{type(opt).__name__}: parameter {opt._label(*meta)} and its gradient are on the meta device, "
                         "which holds no values to step; materialize the model first (model.to_empty(device=...) "
                         "and its initialization). To size the state without values, opt.init_state() works on "
                         "meta, as lro.memory does")
    bad = _flags(opt, [p for _, _, p, _ in items], [grad for *_, grad in items])
    return decide(opt, [p for (_, _, p, _), b in zip(items, bad) if b])


def decide(opt: "LowRankAdamW", bad: list[Tensor]) -> bool:
    """What a step does whose parameters ``bad`` have non-finite gradients: False (none of them is checked:
    ``nonfinite="ignore"``), True (skipped, counted in every group), or :class:`NonFiniteGradientError`.

    :func:`skip_step` decides with it, and so do layer-wise updates, which find the non-finite gradients of
    a whole step in their measuring pass, before its first update."""
    where = {id(p): (group, i) for group in opt.param_groups for i, p in enumerate(group["params"])}
    found = [(*where[id(p)], p) for p in bad if id(p) in where and _checks(where[id(p)][0], p)]
    if not found:
        return False
    if any(group["nonfinite"] == "skip" for group, _, _ in found):
        for group in opt.param_groups:
            group[SKIPPED] = int(group.get(SKIPPED, 0)) + 1
        return True
    group, i, p = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    # counted from 1, as opt.step() calls, Trainer's global_step and the training command count them
    step = int(opt.state[p]["step"]) if "step" in opt.state.get(p, {}) else 0
    why = (" (nonfinite='ignore' does not apply to INT8 moments or weights, which cannot store inf or NaN)"
           if group["nonfinite"] == "ignore" else "")
    raise NonFiniteGradientError(
        f"{type(opt).__name__}: parameter {opt._label(group, i)}{more} has a non-finite gradient (inf or NaN) "
        f"at step {step + 1}{why}; weights and optimizer state are unchanged. Skip this step (nonfinite='skip' "
        "skips and counts such steps, as torch.amp.GradScaler does) or lower the learning rate.")


def _checks(group: dict[str, Any], p: Tensor) -> bool:
    """Whether a step checks ``p``'s gradient: always under ``raise`` and ``skip``; under ``ignore`` where its
    INT8 moments or weights could not store the result."""
    return group["nonfinite"] != "ignore" or group["state_bits"] == 8 or isinstance(p, Int8Weight)


def _checked(opt: "LowRankAdamW", only: set[int] | None) -> Iterator[tuple[dict[str, Any], int, Tensor, Tensor]]:
    """(group, index, parameter, local gradient) of every parameter this step checks: all under
    ``raise`` and ``skip``; under ``ignore`` those whose INT8 moments or weights could not store the result."""
    compact = opt.__dict__.get("low_rank_grads") or {}
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            grad = compact.get(p, p.grad)
            if grad is None or grad.is_sparse or (only is not None and id(p) not in only):
                continue
            if _checks(group, p):
                yield group, i, p, local(grad)


def _flags(opt: "LowRankAdamW", params: list[Tensor], grads: list[Tensor]) -> list[bool]:
    """Per gradient, whether it holds inf or NaN (on shards: on any rank)."""
    sums: list[Tensor] = []
    for device, idx in _by_device(grads).items():
        if device.type == "cuda":
            screen = torch._foreach_norm([grads[k] for k in idx], 1)
        else:
            screen = [grads[k].sum(dtype=torch.promote_types(grads[k].dtype, torch.float32)) for k in idx]
        sums.append(torch.stack([s.float() for s in screen]).isfinite().logical_not_().cpu())
    order = [k for idx in _by_device(grads).values() for k in idx]
    flagged = torch.zeros(len(grads), dtype=torch.float32)
    flagged[order] = torch.cat(sums).float()
    for k in flagged.nonzero().flatten().tolist():  # a sum of finite values may overflow: look exactly
        flagged[k] = float(not bool(torch.isfinite(grads[k]).all()))
    return [bool(f) for f in _agree(opt, params, grads, flagged)]


def _by_device(grads: list[Tensor]) -> dict[torch.device, list[int]]:
    out: dict[torch.device, list[int]] = {}
    for k, g in enumerate(grads):
        out.setdefault(g.device, []).append(k)
    return out


def _agree(opt: "LowRankAdamW", params: list[Tensor], grads: list[Tensor], flags: Tensor) -> Tensor:
    """The flags summed over the ranks of the sharded parameters' process group (one all-reduce, on the
    device of their gradients: the CPU under gloo, the GPU under NCCL)."""
    for p, grad in zip(params, grads):
        comm = opt._comm(p)
        if not comm.whole:
            return comm.all_reduce_(flags.to(grad.device), "nonfinite").cpu()
    return flags
