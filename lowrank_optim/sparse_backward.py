"""Grass's sparse backward: a projected ``nn.Linear`` computes only the r selected rows (columns) of dW.

Muhamed et al. 2024 ("Grass", arXiv:2406.17660, section 3) observe that with a row-selection projection
Pᵀ = ρB the compressed gradient of a linear layer Y = X Wᵀ (W m×n, out × in) never needs the m×n product:

* rows (left side, σ over the m outputs):    R = Pᵀ G = ρ · dY[:, σ]ᵀ X         (r×n)
* columns (right side, σ over the n inputs): R = G P  = dYᵀ X[:, σ] · ρ         (m×r)

(X and dY flattened to tokens × features). ``handle = lro.sparse_grad(model, opt)`` makes every
``nn.Linear`` whose weight ``opt`` projects with the ``sparse`` projector compute its weight gradient that
way: the backward writes R into ``opt.low_rank_grads[weight]`` instead of ``weight.grad``, and the step
takes it as the projected gradient (``project`` is skipped), so the update is the one the dense backward
gives, to float32 rounding (the r rows of dYᵀX summed in another order), with r·n instead of m·n
gradient elements and r/m of the weight-gradient matmul. ``handle.remove()`` restores the layers.

**Refresh steps.** A new selection needs the norms of all m rows (n columns) of G, so at a step where a
weight's subspace renews (and at its first step) its backward is the plain one: its full gradient goes to
``weight.grad`` as without the handle, and the optimizer draws the new rows from it. Under the default
staggered schedule each weight renews at its own phase of ``update_proj_gap``, so at most about 1/gap of
the projected weights hold a full gradient at any step, once every gap steps each. (The paper computes
the norms without keeping G; this keeps one weight's G for that step instead, which is what makes
gradient accumulation over a refresh step exact.)

**Gradient accumulation** is supported: backward calls between two steps add their R (the selection is
fixed between steps) or, on a refresh step, their dense gradients. ``opt.zero_grad()`` clears both.

**Clipping.** ``torch.nn.utils.clip_grad_norm_`` sees only ``.grad``. :meth:`SparseGrad.clip_grad_norm_`
clips dense and projected gradients together by their joint norm, in which a projected weight counts
‖R‖ = ‖Pᵀ G‖ (an unbiased estimate of ‖G‖² under the sampled selections, ‖G[σ]‖ under top-r): it is
not the dense path's ‖G‖, so the two runs agree only on steps where clipping does not engage.

Refused, naming the layer: a weight of a group whose update reads the full gradient (a residual other
than ``drop``, or a ``scaling``), weights with a post-accumulate-grad hook (``lro.layerwise``: its
hooks fire on ``.grad``), FSDP2-sharded weights (their gradient is reduce-scattered as m×n), and a
model wrapped in DDP (its reducer all-reduces ``.grad`` only): the sparse backward runs in one process.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .optim import LowRankAdamW
from .optim import policies
from .optim.step import low_rank_grads
from .projectors import REGISTRY
from .projectors.sparse import SparseProjector


@dataclass
class _Slot:
    """One wrapped layer: its weight, the optimizer and group that step it."""

    opt: LowRankAdamW
    group: dict[str, Any]
    weight: nn.Parameter

    def projector(self) -> SparseProjector | None:
        """The projector of the weight's next step, or None when that step renews it (a dense backward)."""
        state = self.opt.state.get(self.weight, {})
        step = int(state["step"]) if "step" in state else 0
        if step == 0:
            return None
        proj = self.opt._projector(self.weight, self.group)
        return None if policies.due(state, self.group, step, proj) else proj

    def add(self, low: Tensor) -> None:
        grads = low_rank_grads(self.opt)
        held = grads.get(self.weight)
        grads[self.weight] = low if held is None else held.add_(low)


def compact_weight_grad(dy: Tensor, x: Tensor, proj: SparseProjector) -> Tensor:
    """R = Pᵀ G (left) or G P (right) for G = dYᵀ X, from the selected rows of dY (columns of X) only."""
    idx = proj.state_dict()["idx"].to(dy.device)
    rho = proj.state_dict().get("scale")
    if proj.side == "left":
        low = dy.index_select(1, idx).t() @ x
        return low if rho is None else low.mul_(rho.to(low).view(-1, 1))
    low = dy.t() @ x.index_select(1, idx)
    return low if rho is None else low.mul_(rho.to(low).view(1, -1))


class _SparseLinear(torch.autograd.Function):
    """``F.linear`` whose backward gives the weight R (see the module docstring) instead of dW."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, slot: _Slot) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.slot, ctx.has_bias = slot, bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = dy @ weight if ctx.needs_input_grad[0] else None
        gb = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        gw = None
        if ctx.needs_input_grad[1]:
            proj = ctx.slot.projector()
            if proj is None:
                gw = dy2.t() @ x2
            else:
                ctx.slot.add(compact_weight_grad(dy2, x2, proj).to(weight.dtype))
        return gx, gw, gb, None


class SparseGrad:
    """The handle :func:`sparse_grad` returns: the wrapped layers, :meth:`clip_grad_norm_` and :meth:`remove`."""

    def __init__(self, opt: LowRankAdamW, layers: dict[str, tuple[nn.Linear, _Slot]]) -> None:
        self.opt = opt
        self.layers = layers
        for module, slot in layers.values():
            module.forward = _forward(module, slot)

    def remove(self) -> None:
        """Give the layers back their own forward (and their weights back their dense gradients)."""
        for module, _ in self.layers.values():
            module.__dict__.pop("forward", None)
        self.layers = {}

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, params: Iterable[Tensor] | None = None) -> Tensor:
        """Clip the dense ``.grad`` of ``params`` (default: every parameter of the optimizer) and the
        projected gradients together to a joint 2-norm of ``max_norm``; returns the norm before clipping
        (see the module docstring for what a projected weight contributes)."""
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
        if params is None:
            params = [p for g in self.opt.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None] + list(low_rank_grads(self.opt).values())
        if not grads:
            return torch.zeros(())
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(factor.to(g))
        return total


def _forward(module: nn.Linear, slot: _Slot):
    def forward(x: Tensor) -> Tensor:
        return _SparseLinear.apply(x, module.weight, module.bias, slot)

    return forward


def sparse_grad(model: nn.Module, opt: LowRankAdamW) -> SparseGrad:
    """Make every ``nn.Linear`` of ``model`` whose weight ``opt`` projects with the ``sparse`` projector
    compute only its selected rows (columns) of the weight gradient (module docstring); returns the handle.

    >>> opt = lro.Grass(lro.param_groups(model, rank=128), lr=1e-2)
    >>> handle = lro.sparse_grad(model, opt)
    >>> loss.backward(); opt.step(); opt.zero_grad()

    Not for ``torch.amp.GradScaler`` (fp16): it unscales and checks ``.grad`` only, so R would stay scaled
    and an overflow in it would raise instead of skipping the step. bf16 needs no scaler.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("sparse_grad does not run under DDP: its reducer all-reduces .grad, and the projected "
                         "gradients live beside it; pass the unwrapped model in a single process")
    if not isinstance(opt, LowRankAdamW):
        raise TypeError(f"opt must be a lowrank_optim optimizer (e.g. lro.Grass), got {type(opt).__name__}")
    group_of = {p: g for g in opt.param_groups for p in g["params"]}
    layers: dict[str, tuple[nn.Linear, _Slot]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight not in group_of:
            continue
        group = group_of[module.weight]
        if not opt.is_low_rank(module.weight, group) or not issubclass(REGISTRY[group["projector"]], SparseProjector):
            continue
        _check_layer(name, module, opt, group)
        layers[name] = (module, _Slot(opt, group, module.weight))
    if not layers:
        raise ValueError("sparse_grad found no nn.Linear whose weight the optimizer projects with "
                         "projector='sparse'; build the optimizer as lro.Grass(lro.param_groups(model, rank=...)) "
                         "or with projector='sparse'")
    return SparseGrad(opt, layers)


def _check_layer(name: str, module: nn.Linear, opt: LowRankAdamW, group: dict[str, Any]) -> None:
    if "forward" in module.__dict__:
        raise ValueError(f"layer {name!r} already has its forward replaced (a second sparse_grad on the same "
                         "model?); call remove() on the first handle")
    if group["residual"] != "drop" or group["scaling"] is not None:
        raise ValueError(f"layer {name!r}: its update (residual={group['residual']!r}, scaling="
                         f"{group['scaling']!r}) reads the full gradient, which the sparse backward does not "
                         "compute; use residual='drop' and scaling=None (Grass's update)")
    if getattr(module.weight, "_post_accumulate_grad_hooks", None):
        raise ValueError(f"layer {name!r}: its weight has a post-accumulate-grad hook (lro.layerwise?), which the "
                         "sparse backward would never fire (the weight gets R, not .grad); step with opt.step()")
    if not opt._comm(module.weight).whole:
        raise ValueError(f"layer {name!r}: its weight is sharded by FSDP2, whose backward reduce-scatters the full "
                         "m x n gradient; the sparse backward runs on unsharded weights in one process")
