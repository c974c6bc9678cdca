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

The first moment follows the paper's section 7: an exponential average of the clipped update Û, no bias
correction; off by default (β₁ = None), as in torch.

Departures from galore-torch's ``GaLoreAdafactor`` (transformers' Adafactor inside), which it equals at a
constant lr to float32 rounding (1e-7 over 8 steps, measured by a QA pass):

* **the first moment under a changing lr**: galore-torch (and transformers) average lr·Û, so a step's
  momentum carries the lr it was taken at; we average Û and multiply by the current lr, as Adam's M is
  applied. Under a schedule the two part: 1.6e-3 on the weight over 8 steps of a linear decay
  0.01 → 0.00125 (steps of about 5.7e-4), most during warmup and decay.
* **ε**: galore-torch adds 1e-30 to X²; we clamp V̂ ≥ ε² and mean(r) ≥ ε, as torch, with the group's ``eps``
  (1e-8). Only gradients near ε or below tell them apart (|X| ≈ 1e-9: our steps shrink, galore-torch's
  do not); ``eps=1e-30`` brings ours close to its placement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..distributed import Split
from ..reductions import sum_squares
from .base import Fail, Rule, descend, register, steps

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


def _mean_square(x: Tensor, dim: int, split: Split) -> Tensor:
    """mean(x², dim) of the whole tensor (no temporary of x²: :func:`lowrank_optim.reductions.sum_squares`)."""
    sq = sum_squares(x, dim)
    # an empty dimension has mean 0 (a sum over nothing), not 0/0: NaN statistics would be refused as a
    # corrupt state when the optimizer's own checkpoint loads (a Linear(d, 0) placeholder)
    if split.axis is not None and dim % x.dim() == split.axis:
        return split.sum_(sq).div_(max(split.length, 1))
    return sq.div_(max(x.size(dim), 1))


def direction(x: Tensor, state: dict[str, Any], *, beta2_decay: float, eps: float, clip_threshold: float,
              momentum: float | None, split: Split | None = None) -> Tensor:
    """Update the statistics in ``state`` with ``x`` and return the direction (Û, or M with a first
    moment). ``state["step"]`` must already count this step. No host synchronisation: the clipping
    divisor stays a tensor.

    ``split`` (FSDP2) says which piece of the whole tensor ``x`` and the statistics that follow it are:
    the means and the RMS are then the whole tensor's, summed over the ranks."""
    split = split or Split.of_whole()
    weight = float(steps(state)) ** beta2_decay  # 1 − β̂₂ₜ
    if "row_var" in state:
        row_var, col_var = state["row_var"], state["col_var"]
        row_var.lerp_(_mean_square(x, -1, split), weight)
        col_var.lerp_(_mean_square(x, -2, split), weight)
        v_hat = (row_var @ col_var).div_(split.mean(row_var, -2).clamp_(min=eps))
    else:
        variance = state["variance"]
        variance.lerp_(x * x, weight)
        v_hat = variance.clone()
    update = v_hat.clamp_(min=eps * eps).rsqrt_().mul_(x)
    if split.axis is None:
        rms = torch.linalg.vector_norm(update) / math.sqrt(max(update.numel(), 1))
    else:
        rms = split.sum_(update.square().sum()).div_(max(split.numel(update), 1)).sqrt_()
    update.div_(torch.clamp(rms / clip_threshold, min=1.0))
    if momentum is None:
        return update
    exp_avg = state["exp_avg"]
    exp_avg.lerp_(update, 1.0 - momentum)
    return exp_avg.clone()


#: Elements per row block of :func:`step_factored` (1 MiB of float32: a block's temporaries stay in the
#: allocator's heap and in cache, where a whole embedding's are fresh pages at every step).
BLOCK = 2**18


def step_factored(w: Tensor, x: Tensor, state: dict[str, Any], *, lr: float, decay: float, beta2_decay: float,
                  eps: float, clip_threshold: float, momentum: float | None) -> None:
    """W ← decay·W − lr·direction for a whole 2-D parameter, :func:`direction`'s numbers without a
    temporary the size of W: the statistics as there, then Û formed in row blocks twice, once for its RMS
    (the clipping divisor needs all of it) and once to apply, block by block into M and W.

    Why: an embedding or head in Adafactor (GaLoreAdafactor's unprojected weights) made V̂, Û and the
    returned copy of M, 64 MiB each at LLaMA-60M, freshly mapped and page-faulted at every step; the
    recomputation costs less than that (bench/interleaved.py). The RMS is summed per block, so it may
    differ from :func:`direction`'s one-pass norm in the last bits (tested against it)."""
    weight = float(steps(state)) ** beta2_decay
    row_var, col_var, whole = state["row_var"], state["col_var"], Split.of_whole()
    row_var.lerp_(_mean_square(x, -1, whole), weight)
    col_var.lerp_(_mean_square(x, -2, whole), weight)
    mean = row_var.mean(dim=-2, keepdim=True).clamp_(min=eps)
    rows = max(1, BLOCK // max(x.shape[-1], 1))
    spans = [(a, min(rows, x.shape[0] - a)) for a in range(0, x.shape[0], rows)]

    def update(a: int, n: int) -> Tensor:
        v_hat = torch.mul(row_var.narrow(0, a, n), col_var).div_(mean)
        return v_hat.clamp_(min=eps * eps).rsqrt_().mul_(x.narrow(0, a, n))

    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for a, n in spans:
        total.add_(torch.linalg.vector_norm(update(a, n)).square_())
    clip = torch.clamp(total.div_(max(x.numel(), 1)).sqrt_() / clip_threshold, min=1.0)
    for a, n in spans:
        u = update(a, n).div_(clip)
        if momentum is not None:
            u = state["exp_avg"].narrow(0, a, n).lerp_(u, 1.0 - momentum)
        descend(w.narrow(0, a, n), u, lr, decay)


def estimate(state: dict[str, Any], eps: float, split: Split | None = None) -> Tensor:
    """The second-moment estimate V̂ the statistics stand for (r cᵀ / mean(r), or V)."""
    split = split or Split.of_whole()
    if "row_var" in state:
        row_var = state["row_var"]
        return (row_var @ state["col_var"]).div_(split.mean(row_var, -2).clamp(min=eps))
    return state["variance"].clone()


def refactor(state: dict[str, Any], v_hat: Tensor, split: Split | None = None) -> None:
    """Store a full second-moment estimate back as statistics: its row and column means (the
    statistics Adafactor would keep for a squared gradient equal to ``v_hat``)."""
    split = split or Split.of_whole()
    if "row_var" in state:
        state["row_var"] = split.mean(v_hat, -1).to(state["row_var"].dtype)
        state["col_var"] = split.mean(v_hat, -2).to(state["col_var"].dtype)
    else:
        state["variance"] = v_hat.to(state["variance"].dtype)


def _momentum(group: dict[str, Any]) -> float | None:
    return None if group["momentum"] is None else float(group["momentum"])


@register
class Adafactor(Rule):
    """The factored rule above; the group's unprojected parameters get it too (factored when 2-D)."""

    name = "adafactor"
    label = "Adafactor"
    keys = KEYS
    first_moment = "exp_avg"
    nonnegative = ("row_var", "col_var", "variance")
    int8_keys = ()  # the statistics are r + n floats: nothing worth storing in 8 bits
    plain_rule = "adafactor"
    steps_whole = True
    defaults = {"momentum": None, "beta2_decay": -0.8, "clip_threshold": 1.0}

    def adamw_rms_keys(self, group: dict[str, Any]) -> dict[str, Any]:
        """A first moment at AdamW's β₁ where none is given: without one Adafactor steps by G/√V̂, about 1 per
        entry, where Adam's m̂/√v̂ averages the gradient's noise down (measured with bench/update_rms.py at
        AdamW's tuned lr: 3.2–3.5x AdamW's update RMS on the projected weights, 1.00x with momentum=β₁; held-out
        loss 1.201 → 1.022 of AdamW's on nanoGPT, 1.027 → 0.970 on llama_tiny). It costs r·n floats per weight
        (float32, or INT8 under state_bits=8), below Adam's 2·r·n."""
        return {"momentum": float(group["betas"][0])} if group["momentum"] is None else {}

    def init(self, low: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = fresh_state(low.shape, low.dtype, low.device, group["momentum"])
        del state["step"]
        return state

    def check(self, group: dict[str, Any], fail: Fail) -> None:
        decay = group["beta2_decay"]
        if not _is_real(decay) or not -math.inf < float(decay) <= 0.0:
            fail("beta2_decay", "Adafactor's decay exponent c (beta2_t = 1 - t^c) must be a finite number <= 0 "
                 "(the paper uses -0.8)")
        clip = group["clip_threshold"]
        if not _is_real(clip) or not 0.0 < float(clip) < math.inf:
            fail("clip_threshold", "Adafactor's update clipping threshold d must be a finite number > 0 "
                 "(the paper uses 1)")

    def direction(self, low: Tensor, state: dict[str, Any], group: dict[str, Any],
                  split: Split | None = None) -> Tensor:
        return direction(low, state, beta2_decay=float(group["beta2_decay"]), eps=float(group["eps"]),
                         clip_threshold=float(group["clip_threshold"]), momentum=_momentum(group), split=split)

    def step_whole(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                   group: dict[str, Any]) -> None:
        """Whole unprojected parameters (never FSDP2 pieces, whose statistics span the ranks): 2-D ones by
        :func:`step_factored`, the rest by ``direction``; W ← (1 − lr·wd)·W − lr·direction either way."""
        lr = float(group["lr"])
        decay = 1.0 - lr * float(group["weight_decay"])
        options = {"beta2_decay": float(group["beta2_decay"]), "eps": float(group["eps"]),
                   "clip_threshold": float(group["clip_threshold"]), "momentum": _momentum(group)}
        for w, g, state in zip(params, grads, states):
            state["step"] += 1
            if "row_var" in state and g.dim() == 2:
                step_factored(w, g, state, lr=lr, decay=decay, **options)
                continue
            descend(w, direction(g, state, **options), lr, decay)

    def directions(self, lows: Sequence[Tensor], states: Sequence[dict[str, Any]], group: dict[str, Any],
                   splits: Sequence[Split]) -> list[Tensor]:
        splits = list(splits) or [Split.of_whole() for _ in lows]
        return [self.direction(low, state, group, split) for low, state, split in zip(lows, states, splits)]

    def rotate(self, state: dict[str, Any], mapping: Callable[[Tensor], Tensor], split: Split,
               group: dict[str, Any]) -> None:
        """The first moment, if any, M ← map(M); the factored V̂ = r cᵀ/mean(r) is rebuilt, mapped as
        |map(V̂)| and factored again into row and column means (a rank-1 factorisation cannot be rotated
        exactly; this is the statistic Adafactor would keep for the rotated estimate)."""
        if "exp_avg" in state:
            state["exp_avg"] = mapping(state["exp_avg"]).to(state["exp_avg"].dtype)
        if "row_var" in state:
            v_hat = estimate(state, float(group["eps"]), split)
            refactor(state, mapping(v_hat).abs_(), split)


def _is_real(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.is_complex()
    return isinstance(x, (int, float)) and not isinstance(x, bool)
