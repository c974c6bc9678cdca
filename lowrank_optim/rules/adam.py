"""The Adam inner rule, as functions over lists of tensors.

On the low-rank tensor R (Kingma & Ba 2015, with bias correction)::

    M ← β₁ M + (1 − β₁) R
    V ← β₂ V + (1 − β₂) R²
    N = M̂ / (√V̂ + ε),   M̂ = M / (1 − β₁ᵗ),   V̂ = V / (1 − β₂ᵗ)

ε is added to √V̂, as ``torch.optim.AdamW`` does. galore-torch instead folds the bias corrections
into the step size and adds ε to √V, which amounts to ε/√(1 − β₂ᵗ) here: the same rule with a
larger ε in early steps. We keep torch's placement so that the low-rank and the plain parameters of
one optimizer follow one Adam.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam

from .. import kernels
from ..distributed import Split
from ..quant.storage import Int8Storage
from .base import Rule, register, steps


def adam_direction(
    lows: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: Sequence[int],
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    """Update the moments in place with ``lows`` and return each N = M̂ / (√V̂ + ε).

    ``steps`` are the step counts *after* this step's increment (1 on the first step).
    """
    if not lows:
        return []
    torch._foreach_lerp_(exp_avgs, lows, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, lows, lows, 1.0 - beta2)
    bias_correction1 = [1.0 - beta1**t for t in steps]
    bias_correction2_sqrt = [(1.0 - beta2**t) ** 0.5 for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    direction = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(direction, bias_correction1)
    return direction


def adamw_plain(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    foreach: bool | None,
) -> None:
    """Full-rank AdamW through torch's own functional Adam: the same numbers as ``torch.optim.AdamW``.

    ``params`` must share dtype with their moments; callers hand half-precision parameters in as
    float32 master copies and round the result back once. ``foreach=None`` takes torch's
    multi-tensor path on every device: on CPU it gives bit-identical results to the single-tensor
    path that ``torch.optim.AdamW`` defaults to there, and is faster (bench/).
    """
    if not params:
        return
    if foreach is None:
        foreach = True
    _torch_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=foreach,
        capturable=False,
        differentiable=False,
        fused=None,
        grad_scale=None,
        found_inf=None,
        has_complex=False,
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )


def _adam_int8(low: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """One Adam step on INT8 moments in place, in one fused kernel (Triton on CUDA): N, float32."""
    beta1, beta2 = group["betas"]
    return kernels.adam8bit_direction(
        low.reshape(-1).float().contiguous(),
        state["exp_avg"].view(-1), Int8Storage.absmax(state, "exp_avg"),
        state["exp_avg_sq"].view(-1), Int8Storage.absmax(state, "exp_avg_sq"),
        beta1=beta1, beta2=beta2, eps=float(group["eps"]), step=steps(state),
    ).view(low.shape)


@register
class Adam(Rule):
    """Adam with bias correction (the module docstring): M and V shaped like R, float32 or INT8."""

    name = "adam"
    label = "AdamW"
    keys = ("exp_avg", "exp_avg_sq")
    nonnegative = ("exp_avg_sq",)
    first_moment = "exp_avg"
    elementwise = True
    steps_whole = True
    fused = {Int8Storage: _adam_int8}

    def direction(self, low: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        return self.directions([low], [state], group, [])[0]

    def directions(self, lows, states, group, splits) -> list[Tensor]:  # noqa: ANN001 (the base's types)
        beta1, beta2 = group["betas"]
        return adam_direction(list(lows), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                              [steps(s) for s in states], beta1, beta2, group["eps"])

    def transfer(self, state: dict[str, Any], mapping: Callable[[Tensor], Tensor], squared: Callable[[Tensor], Tensor],
                 steps: int, split: Split, group: dict[str, Any]) -> None:
        """LDAdam's projection-aware transfer (Robert et al. 2025, arXiv:2410.16103; IST-DASLab/LDAdam ``ldadamw.py``):
        with T the change of basis, k = ``steps``, c₁ = 1 − β₁ᵏ, c₂ = 1 − β₂ᵏ,

            M ← T(M),   V ← c₂ · | T∘T (V/c₂ − M_old²/c₁²) + M²/c₁² |,

        i.e. the bias-corrected variance V̂ − M̂² is carried by the element-wise squared change of basis (as the
        variance of independent coordinates is), and the new mean's square added back. Element-wise along the
        unsplit rank axis, so it runs on FSDP2 pieces as it is."""
        beta1, beta2 = group["betas"]
        c1, c2 = 1 - beta1**steps, 1 - beta2**steps
        m, v = state["exp_avg"], state["exp_avg_sq"]
        new_m = mapping(m)
        variance = squared(v / c2 - m * m / c1**2)
        state["exp_avg_sq"] = (c2 * (variance + new_m * new_m / c1**2)).abs_().to(v.dtype)
        state["exp_avg"] = new_m.to(m.dtype)

    def step_whole(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                   group: dict[str, Any]) -> None:
        """torch's own AdamW (``torch.optim.adam.adam``): the numbers of ``torch.optim.AdamW``."""
        beta1, beta2 = group["betas"]
        adamw_plain(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [s["step"] for s in states], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], foreach=group["foreach"])
