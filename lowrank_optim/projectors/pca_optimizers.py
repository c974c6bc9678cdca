"""The optimizers that move Online Subspace Descent's basis P (``online_pca``'s ``pca_optimizer``).

The official code (kyleliang919/Online-Subspace-Descent, ``galore_torch/galore_projector.py``) builds one
torch-style optimizer per weight for its P, with lr η = 1/``update_proj_gap`` (times the weight lr's
schedule, ``lr_t / lr_0``), and these settings, which are the defaults of the classes it calls:

===============  =======================================================================================
``adamw``        ``torch.optim.AdamW``: β = (0.9, 0.999), ε = 1e-8, decoupled weight decay 0.01 (the default)
``adam8bit``     ``bitsandbytes.optim.Adam8bit``: Adam, β = (0.9, 0.999), ε = 1e-8, no decay, M and V blockwise
                 INT8 (dynamic code book, blocks of 256; float32 below 4096 elements, its ``min_8bit_size``)
``lion``         its own ``Lion``: β = (0.9, 0.99), no decay
``adafactor``    ``transformers.optimization.Adafactor``: ε₁ = 1e-30, clip 1.0, decay −0.8, no first moment,
                 no relative step or parameter scale
``sgd``          ``torch.optim.SGD``: P ← P − η ∇
===============  =======================================================================================

Each is written here as its paper / class states it, over float tensors: ``step(p, g, state, lr, seam)``
returns the new P and rebinds its entries of ``state`` (the projector's own dict, keys ``pca_*``; nothing
is written in place, so a projector copied before the step keeps its values). On FSDP2 shards ``p`` and
``g`` are this rank's piece of P (rows of P, columns of Q); the element-wise rules need nothing from other
ranks, and Adafactor's row and column statistics and its update RMS complete their sums with
``seam.total`` (:class:`Seam`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..quant.storage import FLOAT, INT8, storage_of



@dataclass(frozen=True)
class Seam:
    """P's whole shape, and ``total(x, dim)``: a sum of this rank's piece along ``dim`` (None: over every
    dimension) completed over the ranks where P is split along it (the identity in one process)."""

    shape: tuple[int, int]
    total: Callable[[Tensor, int | None], Tensor]


def whole(p: Tensor) -> Seam:
    """The seam of a P that is all here."""
    return Seam(tuple(p.shape), lambda x, dim: x)


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ADAMW_DECAY = 0.01
LION_BETAS = (0.9, 0.99)
ADAFACTOR_EPS1 = 1e-30
ADAFACTOR_CLIP = 1.0
ADAFACTOR_DECAY = -0.8
#: bitsandbytes keeps the moments of tensors smaller than this in float32 (``min_8bit_size``).
MIN_8BIT_SIZE = 4096


def _count(state: dict[str, Any]) -> int:
    """Advance the P optimizer's step counter (a 0-d int64 tensor, rebound) and return the new count."""
    step = int(state["pca_step"]) + 1
    state["pca_step"] = torch.tensor(step, dtype=torch.int64)
    return step


def sgd(p: Tensor, g: Tensor, state: dict[str, Any], lr: float, seam: Seam) -> Tensor:
    """``torch.optim.SGD`` (no momentum, no decay): P ← P − η ∇."""
    _count(state)
    return p - lr * g


def _adam(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, lr: float, decay: float) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.optim.AdamW``'s update: P ← P(1 − η·wd) − (η / c₁) · M / (√V / √c₂ + ε)."""
    beta1, beta2 = ADAM_BETAS
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    new = p * (1 - lr * decay) - (lr / c1) * m / (v.sqrt() / math.sqrt(c2) + ADAM_EPS)
    return new, m, v


def adamw(p: Tensor, g: Tensor, state: dict[str, Any], lr: float, seam: Seam) -> Tensor:
    """``torch.optim.AdamW`` with its defaults (β 0.9, 0.999; ε 1e-8; weight decay 0.01)."""
    step = _count(state)
    new, state["pca_exp_avg"], state["pca_exp_avg_sq"] = _adam(
        p, g, state["pca_exp_avg"], state["pca_exp_avg_sq"], step, lr, ADAMW_DECAY)
    return new


def adam8bit(p: Tensor, g: Tensor, state: dict[str, Any], lr: float, seam: Seam) -> Tensor:
    """bitsandbytes' ``Adam8bit``: Adam (no decay) on M and V dequantized from blockwise INT8, the step taken
    from the float values, then requantized (signed dynamic code for M, unsigned for V, as bitsandbytes)."""
    step = _count(state)
    m = storage_of(state, "pca_exp_avg").load(state, "pca_exp_avg", signed=True).to(p.dtype)
    v = storage_of(state, "pca_exp_avg_sq").load(state, "pca_exp_avg_sq", signed=False).to(p.dtype)
    new, m, v = _adam(p, g, m, v, step, lr, 0.0)
    for key, value, signed in (("pca_exp_avg", m, True), ("pca_exp_avg_sq", v, False)):
        storage = storage_of(state, key)
        if storage is FLOAT:
            state[key] = value
        else:  # fresh entries: the old ones may belong to the projector this step used
            state.update(INT8.zeros(key, value))
            INT8.store(state, key, value, signed=signed)
    return new


def lion(p: Tensor, g: Tensor, state: dict[str, Any], lr: float, seam: Seam) -> Tensor:
    """Lion (Chen et al. 2023), as the official ``lion.py``: P ← P − η sign(β₁M + (1 − β₁)∇), then
    M ← β₂M + (1 − β₂)∇."""
    _count(state)
    beta1, beta2 = LION_BETAS
    m = state["pca_exp_avg"]
    new = p - lr * torch.sign(beta1 * m + (1 - beta1) * g)
    state["pca_exp_avg"] = beta2 * m + (1 - beta2) * g
    return new


def adafactor(p: Tensor, g: Tensor, state: dict[str, Any], lr: float, seam: Seam) -> Tensor:
    """Adafactor (Shazeer & Stern 2018) as ``transformers.optimization.Adafactor`` with the official settings:
    β̂₂ = 1 − t^−0.8; row and column means of ∇² + ε₁; U = ∇ / √(R Cᵀ / mean R); U /= max(1, RMS(U)); P ← P − η U."""
    step = _count(state)
    rows, cols = seam.shape
    beta2 = 1.0 - step**ADAFACTOR_DECAY
    sq = g * g + ADAFACTOR_EPS1
    row = beta2 * state["pca_exp_avg_sq_row"] + (1 - beta2) * (seam.total(sq.sum(1), 1) / cols)
    col = beta2 * state["pca_exp_avg_sq_col"] + (1 - beta2) * (seam.total(sq.sum(0), 0) / rows)
    state["pca_exp_avg_sq_row"], state["pca_exp_avg_sq_col"] = row, col
    row_mean = seam.total(row.sum().reshape(1), 0) / rows
    update = g * (row / row_mean).rsqrt().unsqueeze(1) * col.rsqrt().unsqueeze(0)
    rms = (seam.total(update.square().sum().reshape(1), None) / (rows * cols)).sqrt()
    update = update / (rms / ADAFACTOR_CLIP).clamp(min=1.0)
    return p - lr * update


STEPS: dict[str, Callable[..., Tensor]] = {
    "adamw": adamw, "adam8bit": adam8bit, "lion": lion, "adafactor": adafactor, "sgd": sgd}


def zeros(name: str, like: Tensor) -> dict[str, Any]:
    """The P optimizer's fresh state for a P shaped like ``like`` (this rank's piece of it)."""
    out: dict[str, Any] = {"pca_step": torch.tensor(0, dtype=torch.int64)}
    if name in ("adamw", "lion"):
        out["pca_exp_avg"] = torch.zeros_like(like)
    if name == "adamw":
        out["pca_exp_avg_sq"] = torch.zeros_like(like)
    if name == "adam8bit":
        small = like.numel() < MIN_8BIT_SIZE
        for key, signed in (("pca_exp_avg", True), ("pca_exp_avg_sq", False)):
            out.update(FLOAT.zeros(key, like) if small else INT8.zeros(key, like, signed=signed))
    if name == "adafactor":
        out["pca_exp_avg_sq_row"] = like.new_zeros(like.shape[0])
        out["pca_exp_avg_sq_col"] = like.new_zeros(like.shape[1])
    return out
