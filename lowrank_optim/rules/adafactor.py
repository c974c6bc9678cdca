"""The Adafactor inner rule (Shazeer & Stern 2018), in ``torch.optim.Adafactor``'s conventions.

On a tensor X (the low-rank gradient R, or a plain parameter's gradient), step t = 1, 2, ...::

    β̂₂ₜ = 1 − t^c                                   c = beta2_decay (−0.8)
    r ← β̂₂ₜ r + (1 − β̂₂ₜ) mean_cols(X²)             one value per row       (X has ≥ 2 dims)
    c ← β̂₂ₜ c + (1 − β̂₂ₜ) mean_rows(X²)             one value per column
    V̂ = r cᵀ / mean(r)                              the rank-1 factored second moment
    U = X / √max(V̂, ε²)
    Û = U / max(1, RMS(U) / d)                      update clipping, d = clip_threshold (1)
    M ← β₁ M + (1 − β₁) Û                           only with a first moment (``momentum`` β₁)
    direction = M, or Û

A 1-D tensor keeps the full V (no factoring), as the paper and torch do. The step applied by the
optimizer is ``lr`` times the direction (times ``scale`` for a low-rank one), decoupled weight decay
``lr·wd`` as everywhere in this package.

Departures from ``torch.optim.Adafactor``, both deliberate:

* **no relative step**: torch multiplies the direction by α = max(ε₂, RMS(W))·min(lr, 1/√t), a step
  relative to the weight's own scale. In a subspace the weight's RMS says nothing about the projected
  gradient's, and GaLore's Adafactor runs with ``relative_step=False, scale_parameter=False`` too, so
  the step is the learning rate. With that one difference our direction is torch's, to rounding
  (``tests/test_rules.py`` checks it against torch's own optimizer).
* ε is the group's ``eps`` (ε₁ of the paper's clamping, as torch places it: V̂ ≥ ε², mean(r) ≥ ε);
  torch's default is the dtype's machine epsilon, 1.2e-7 in float32, ours Adam's 1e-8.

The first moment follows the paper's section 7 and transformers' Adafactor: an exponential average of
the clipped update Û, no bias correction; off by default (β₁ = None), as in torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: The state keys this rule keeps (besides ``step``).
KEYS = ("row_var", "col_var", "variance", "exp_avg")


def fresh_state(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device,
                momentum: float | None) -> dict[str, Tensor]:
    """Zero statistics for a tensor of ``shape``: r (…×m×1) and c (…×1×n) for 2+ dims, V for 1-D,
    and M of ``shape`` when there is a first moment. ``step`` is a float32 CPU scalar, as torch keeps it."""
    shape = tuple(shape)
    state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}
    if len(shape) >= 2:
        state["row_var"] = torch.zeros((*shape[:-1], 1), dtype=dtype, device=device)
        state["col_var"] = torch.zeros((*shape[:-2], 1, shape[-1]), dtype=dtype, device=device)
    else:
        state["variance"] = torch.zeros(shape, dtype=dtype, device=device)
    if momentum is not None:
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
    return state


def direction(x: Tensor, state: dict[str, Any], *, beta2_decay: float, eps: float, clip_threshold: float,
              momentum: float | None, reduce: Callable[[Tensor], Tensor] | None = None,
              rows: int | None = None) -> Tensor:
    """Update the statistics in ``state`` with ``x`` and return the direction (Û, or M with a first
    moment). ``state["step"]`` must already count this step. No host synchronisation: the clipping
    divisor stays a tensor.

    For a tensor sharded by rows (FSDP2), ``x`` and the row statistics are this rank's rows, ``rows``
    the whole tensor's row count and ``reduce`` sums a tensor over the ranks in place: the column
    statistics, the mean of the row statistics and the RMS are then the whole tensor's."""
    t = float(state["step"])
    weight = t**beta2_decay  # 1 − β̂₂ₜ
    total = reduce or (lambda z: z)
    if "row_var" in state:
        row_var, col_var = state["row_var"], state["col_var"]
        m = x.size(-2) if rows is None else rows
        # mean of squares along one side, as a squared norm (no m×n temporary of X²)
        row_var.lerp_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)), weight)
        col_var.lerp_(total(torch.linalg.vector_norm(x, dim=-2, keepdim=True).square_()).div_(m), weight)
        v_hat = row_var @ col_var
        if reduce is None:
            v_hat.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps))
        else:
            v_hat.div_(total(row_var.sum(dim=-2, keepdim=True)).div_(m).clamp_(min=eps))
    else:
        variance = state["variance"]
        variance.lerp_(x * x, weight)
        v_hat = variance.clone()
    update = v_hat.clamp_(min=eps * eps).rsqrt_().mul_(x)
    if reduce is None:
        rms = torch.linalg.vector_norm(update) / math.sqrt(max(update.numel(), 1))
    else:
        numel = update.numel() if rows is None else update[..., :1, :].numel() * rows if update.dim() > 1 else rows
        rms = total(update.square().sum()).div_(max(numel, 1)).sqrt_()
    update.div_(torch.clamp(rms / clip_threshold, min=1.0))
    if momentum is None:
        return update
    exp_avg = state["exp_avg"]
    exp_avg.lerp_(update, 1.0 - momentum)
    return exp_avg.clone()


def estimate(state: dict[str, Any], eps: float) -> Tensor:
    """The second-moment estimate V̂ the statistics stand for (r cᵀ / mean(r), or V)."""
    if "row_var" in state:
        row_var = state["row_var"]
        return (row_var @ state["col_var"]).div_(row_var.mean(dim=-2, keepdim=True).clamp(min=eps))
    return state["variance"].clone()


def refactor(state: dict[str, Any], v_hat: Tensor) -> None:
    """Store a full second-moment estimate back as statistics: its row and column means (the
    statistics Adafactor would keep for a squared gradient equal to ``v_hat``)."""
    if "row_var" in state:
        state["row_var"] = v_hat.mean(dim=-1, keepdim=True).to(state["row_var"].dtype)
        state["col_var"] = v_hat.mean(dim=-2, keepdim=True).to(state["col_var"].dtype)
    else:
        state["variance"] = v_hat.to(state["variance"].dtype)
