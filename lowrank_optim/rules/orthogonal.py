"""The orthogonal inner rule: one momentum, orthogonalized (SUMO, Refael et al. 2025; Muon).

On the low-rank tensor R (r×n or m×r), step t::

    M ← μ M + (1 − μ) R                  (Muon's and torch's average; SUMO writes M ← μM + R)
    X = R + μ M  with Nesterov, else M  (torch.optim.Muon's ``nesterov``; SUMO uses plain M)
    O = orth(X)                          U Vᵀ of X's SVD (``svd``), or Muon's Newton–Schulz iteration
    direction = 0.2·√max(rows, cols) · O

The two ways of writing the momentum differ by the constant factor 1/(1 − μ) on every M, and the
orthogonal factor of a matrix does not change when it is scaled, so both give the same O (the
refresh rotation is linear and keeps the proportion).

**Shape-aware scaling.** O has r singular values equal to 1, so its RMS is 1/√max(rows, cols):
a wide low-rank tensor would move by less than a narrow one at the same learning rate. The factor
0.2·√max(rows, cols) gives O an RMS of 0.2, about the RMS of Adam's update, which is torch.optim.Muon's
``adjust_lr_fn="match_rms_adamw"`` applied to the low-rank tensor's shape. The learning rate (and
``scale``) of a low-rank Adam run therefore carries over, and with rank = the short side it is exactly
Muon's adjustment of the full matrix.

**Exact SVD** (SUMO's choice): the momentum is small (r×n), so its polar factor U Vᵀ costs O(r²n): it is
taken from the r×r Gram matrix's eigendecomposition in float64 (:func:`orthogonalize_svd`). Singular
values below max(rows, cols)·ε·σ_max count as zero and get a zero factor instead of an arbitrary unit
direction (a zero momentum gives a zero update, a rank-deficient one keeps its rank).

**Newton–Schulz** (Muon's choice): five steps of the quintic iteration with coefficients
(3.4445, −4.775, 2.0315), in bfloat16, normalised by the Frobenius norm first. It produces U S' Vᵀ with
S' roughly in [0.7, 1.2], not exactly U Vᵀ; :func:`newton_schulz` gives the same bits as torch.optim.Muon's
own orthogonalization of the same matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Fail, Rule, register

METHODS = ("svd", "newton_schulz")
#: Muon's quintic coefficients (Keller Jordan's, as torch.optim.Muon ships them).
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
NS_EPS = 1e-7
#: Target RMS of the orthogonalized update (Moonshot's match of AdamW's update RMS, as torch's Muon).
RMS = 0.2

KEYS = ("momentum_buffer",)
DEFAULT_MOMENTUM = 0.95


def fresh_state(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    return {
        "step": torch.tensor(0.0, dtype=torch.float32),
        "momentum_buffer": torch.zeros(tuple(shape), dtype=dtype, device=device),
    }


def orthogonalize_svd(x: Tensor) -> Tensor:
    """U Vᵀ of ``x``'s thin SVD (in ``x``'s dtype, float32 at least), with negligible singular values
    dropped rather than given an arbitrary direction.

    Computed (for float32 and narrower ``x``) as the polar factor X (XᵀX)^(-1/2) on the short side, from
    the r×r Gram matrix's ``eigh`` in float64 (the Gram matrix squares the condition number; float64 keeps
    every direction float32's SVD resolves) and one float32 product: closer to the exact U Vᵀ than
    LAPACK's float32 SVD (a fifth to a twentieth of its error, tested), at a fraction of its time for the
    m×r momenta of a low-rank step (0.3–0.6x on LLaMA-60M shapes).

    A matrix holding inf or NaN (a momentum that took a non-finite gradient under ``nonfinite="ignore"``)
    has no eigendecomposition, and LAPACK would raise midway through a step: it gives NaN everywhere
    instead, as Adam's update does from such a moment. Decided on the device, without a host
    synchronisation."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    finite = torch.isfinite(work).all()
    work = torch.where(finite, work, torch.zeros((), dtype=work.dtype, device=work.device))
    out = _svd_factor(work) if work.dtype == torch.float64 else _gram_polar(work)
    return torch.where(finite, out, torch.full((), float("nan"), dtype=out.dtype, device=out.device))


def _svd_factor(work: Tensor) -> Tensor:
    """U Vᵀ from LAPACK's thin SVD (float64: there is no wider Gram matrix to take)."""
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return (u * (s > max(work.shape) * torch.finfo(work.dtype).eps * s.amax()).to(work.dtype)) @ vh


def _gram_polar(work: Tensor) -> Tensor:
    """X (XᵀX)^(-1/2) on the short side, from the Gram matrix's ``eigh`` in float64."""
    tall = work.shape[0] >= work.shape[1]
    x = work if tall else work.t()
    y = x.double()
    evals, evecs = torch.linalg.eigh(y.t() @ y)
    # singular values below max(rows, cols)·ε·σ_max (ε of the working dtype) count as zero
    tol = (max(work.shape) * torch.finfo(work.dtype).eps) ** 2 * evals[-1].clamp(min=0)
    inv_sqrt = torch.where(evals > tol, evals.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(),
                           torch.zeros_like(evals))
    # X·(XᵀX)^(-1/2) in X's own dtype: the r×r factor comes from the float64 eigh and is rounded once; the
    # product's error is about ε·‖X‖‖factor‖ per entry, 2–4e-6 in float32 for singular values over three
    # decades, against 2–6e-5 for LAPACK's float32 SVD (tests/test_rules.py), and it is one float32 matmul
    # instead of a float64 one (0.7–0.85x of this function's time at LLaMA-60M's low-rank shapes).
    polar = x @ ((evecs * inv_sqrt) @ evecs.t()).to(work.dtype)
    return polar if tall else polar.t()


def newton_schulz(x: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS) -> Tensor:
    """Muon's quintic Newton–Schulz iteration towards U Vᵀ, in bfloat16 (returns bfloat16).

    Written from Jordan et al.'s description: X ← X/‖X‖_F on the wide orientation, then
    ``steps`` times A = X Xᵀ, B = bA + cA², X ← aX + BX."""
    if x.dim() != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(x.shape)}")
    a, b, c = coefficients
    y = x.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        y = y.T
    y.div_(y.norm().clamp(min=eps))
    for _ in range(steps):
        gram = y @ y.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.addmm(y, poly, y, beta=a)
    return y.T if tall else y


def shape_factor(shape: tuple[int, ...] | torch.Size) -> float:
    """0.2·√max(rows, cols): the orthogonal factor's RMS becomes 0.2 (see the module docstring)."""
    return RMS * math.sqrt(max(shape[-2], shape[-1]))


def direction(low: Tensor, state: dict[str, Any], *, momentum: float, nesterov: bool, method: str,
              ns_steps: int) -> Tensor:
    """Update the momentum in ``state`` with ``low`` and return the scaled orthogonal factor."""
    buf = state["momentum_buffer"]
    buf.lerp_(low, 1.0 - momentum)
    x = low.lerp(buf, momentum) if nesterov else buf
    if method == "svd":
        o = orthogonalize_svd(x)
    else:
        o = newton_schulz(x, ns_steps)
    return o.to(low.dtype).mul_(shape_factor(low.shape))


@register
class Orthogonal(Rule):
    """The orthogonal rule above (SUMO, Muon); the group's unprojected parameters stay AdamW."""

    name = "orthogonal"
    keys = KEYS
    first_moment = "momentum_buffer"
    defaults = {"momentum": None, "nesterov": False, "orthogonalize": "svd", "ns_steps": 5}

    def init(self, low: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros_like(low)}

    def check(self, group: dict[str, Any], fail: Fail) -> None:
        if group["nesterov"] not in (True, False):
            fail("nesterov", "choose True or False")
        if group["orthogonalize"] not in METHODS:
            fail("orthogonalize", f"choose one of {', '.join(METHODS)}")
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
            fail("ns_steps", "the number of Newton-Schulz iterations must be an integer in [1, 100) (Muon uses 5)")

    def check_parameter(self, shape: tuple[int, ...], group: dict[str, Any]) -> str | None:
        if min(shape) >= group["rank"]:
            return None
        return (f"has shape {tuple(shape)}, and rank={group['rank']} is above its short side {min(shape)}: "
                "rule='orthogonal' cannot orthogonalize in a subspace larger than the matrix. Use a rank of at "
                f"most {min(shape)}, or leave this parameter out of the rank group")

    def direction(self, low: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        momentum = DEFAULT_MOMENTUM if group["momentum"] is None else float(group["momentum"])
        return direction(low, state, momentum=momentum, nesterov=bool(group["nesterov"]),
                         method=group["orthogonalize"], ns_steps=int(group["ns_steps"]))
