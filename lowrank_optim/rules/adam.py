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

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam


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
