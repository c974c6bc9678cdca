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
    if denom[0].device.type == "cpu":  # M / denom written over denom: no second set of r×n temporaries
        for m, d in zip(exp_avgs, denom):
            torch.div(m, d, out=d)
        direction = denom
    else:  # one multi-tensor kernel
        direction = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(direction, bias_correction1)
    return direction


#: CPU tensors of at least this many elements take the tiled AdamW (:func:`_adamw_tiled`); smaller
#: ones fit the caches whole and go through torch's multi-tensor loop.
TILED_MIN = 1 << 20
#: Elements per tile: 512 KiB per float32 stream, so a tile's p, g, m, v and √v stay in L2 across
#: the seven passes (measured on LLaMA-60M's 32000×512 embedding, 1 and 2 threads: 2^16–2^18 within 5%
#: of each other, 2^14 slower from per-call overhead, 2^20 slower from cache misses).
TILE = 1 << 17


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
    """Full-rank AdamW with the numbers of ``torch.optim.AdamW``, bit for bit.

    ``params`` must share dtype with their moments; callers hand float16 parameters in as float32
    master copies and round the result back once (bf16 ones keep bf16 moments, as torch). ``foreach=None``
    takes torch's multi-tensor path: for float32 and float64 it gives bit-identical results to the
    single-tensor path that ``torch.optim.AdamW`` defaults to on CPU, and is faster (bench/). A
    half-precision tensor on CPU with ``foreach=None`` takes torch's single-tensor path, as
    ``torch.optim.AdamW``'s default does there, and so does a tensor ``lr`` (torch then computes 1 − lr·wd and
    lr/(1 − β₁ᵗ) in the tensor's dtype; with ``foreach=True``, which torch refuses, it is read as a number): in bf16 torch's two paths differ (up to 1.5e-3 after five
    steps at betas (0.9, 0.95)). Large CPU tensors (an embedding, an output head) take
    :func:`_adamw_tiled`, the same element-wise operations in the same order over cache-sized tiles.
    """
    if not params:
        return
    if foreach is None:
        foreach = not isinstance(lr, Tensor) and not any(
            p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) for p in params)
    elif foreach and isinstance(lr, Tensor):
        lr = float(lr)  # torch's multi-tensor loop refuses a tensor lr without capturable; its number is the same
    tiled = [i for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs))
             if foreach and _tileable(p, g, m, v, lr)]
    if tiled:
        _adamw_tiled([params[i] for i in tiled], [grads[i] for i in tiled], [exp_avgs[i] for i in tiled],
                     [exp_avg_sqs[i] for i in tiled], [steps[i] for i in tiled], lr=float(lr), beta1=beta1,
                     beta2=beta2, eps=eps, weight_decay=weight_decay)
        done = set(tiled)
        rest = [i for i in range(len(params)) if i not in done]
        params, grads, exp_avgs, exp_avg_sqs, steps = ([xs[i] for i in rest] for xs in
                                                       (params, grads, exp_avgs, exp_avg_sqs, steps))
        if not params:
            return
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


def _tileable(p: Tensor, g: Tensor, m: Tensor, v: Tensor, lr: float | Tensor) -> bool:
    return (p.device.type == "cpu" and p.numel() >= TILED_MIN and not isinstance(lr, Tensor)
            and not p.is_complex() and all(t.dtype == p.dtype and t.device == p.device and t.is_contiguous()
                                           and t.shape == p.shape for t in (p, g, m, v)))


def _adamw_tiled(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 steps: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    """torch's multi-tensor AdamW (``torch.optim.adam._multi_tensor_adam``, not capturable: the decay,
    ``lerp_``, ``mul_``, ``addcmul_``, ``sqrt``, ``div_``, ``add_``, ``addcdiv_``, with its scalars) run tile
    by tile over flattened CPU tensors. Each operation is element-wise, so every element gets the same
    arithmetic as in one pass over the whole tensor (tested bit for bit against ``torch.optim.AdamW``, 1 and
    2 threads); what changes is that a tile's streams stay in cache across the passes and √V̂ + ε lives in
    one tile-sized buffer instead of a fresh tensor as large as the parameter, which on CPU comes from
    ``mmap`` and is page-faulted in at every step (above glibc's 32 MiB threshold). On LLaMA-60M's
    embedding and head, 0.6x of torch's time at 1 and 2 threads (``bench/interleaved.py``)."""
    torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t = float(s.item())
        step_size = (lr / (1 - beta1**t)) * -1
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        p, g, m, v = (x.view(-1) for x in (p, g, m, v))
        buf = torch.empty(min(TILE, p.numel()), dtype=v.dtype)
        for start in range(0, p.numel(), TILE):
            pt, gt, mt, vt = (x[start:start + TILE] for x in (p, g, m, v))
            denom = buf[: pt.numel()]
            if weight_decay != 0:
                pt.mul_(1 - lr * weight_decay)
            mt.lerp_(gt, 1 - beta1)
            vt.mul_(beta2)
            vt.addcmul_(gt, gt, value=1 - beta2)
            torch.sqrt(vt, out=denom)
            denom.div_(bias_correction2_sqrt)
            denom.add_(eps)
            pt.addcdiv_(mt, denom, value=step_size)


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
