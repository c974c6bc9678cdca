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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..distributed import Split
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
    synchronisation. :func:`orthogonalize_svd_many` is the same for a list, one ``eigh`` per shape."""
    return orthogonalize_svd_many([x])[0]


def orthogonalize_svd_many(xs: Sequence[Tensor]) -> list[Tensor]:
    """:func:`orthogonalize_svd` of every matrix in ``xs``, bit for bit; the Gram matrices of one shape
    share one batched ``eigh`` and one batched product (LLaMA-60M's 56 momenta: 3 calls instead of 56)."""
    out: list[Tensor | None] = [None] * len(xs)
    batches: dict[tuple[Any, ...], list[int]] = {}
    for i, x in enumerate(xs):
        if x.dim() != 2:
            raise ValueError(f"orthogonalize_svd needs 2-D matrices, got shape {tuple(x.shape)}")
        if x.dtype == torch.float64:
            out[i] = _finite_or_nan(x, _svd_factor)
        else:
            batches.setdefault((tuple(x.shape), x.dtype, x.device), []).append(i)
    for idx in batches.values():
        for i, polar in zip(idx, _gram_polar([xs[i] if xs[i].dtype == torch.float32 else xs[i].float()
                                              for i in idx])):
            out[i] = polar
    return out  # type: ignore[return-value]


def _finite_or_nan(x: Tensor, factor: Callable[[Tensor], Tensor]) -> Tensor:
    finite = torch.isfinite(x).all()
    out = factor(torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)))
    return torch.where(finite, out, torch.full((), float("nan"), dtype=out.dtype, device=out.device))


def _svd_factor(work: Tensor) -> Tensor:
    """U Vᵀ from LAPACK's thin SVD (float64: there is no wider Gram matrix to take)."""
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return (u * (s > max(work.shape) * torch.finfo(work.dtype).eps * s.amax()).to(work.dtype)) @ vh


def _gram_polar(works: list[Tensor]) -> list[Tensor]:
    """X (XᵀX)^(-1/2) on the short side of each float32 matrix (all of one shape), from the Gram matrices'
    batched ``eigh`` in float64.

    A non-finite entry of X makes its column's diagonal entry of XᵀX inf or NaN (a float32 X cannot
    overflow a float64 sum of squares), so the Gram matrices' diagonals alone say which X are finite: a
    non-finite one is replaced by zeros before ``eigh`` and its factor set to NaN after."""
    shape = works[0].shape
    tall = shape[0] >= shape[1]
    xs = [w if tall else w.t() for w in works]
    grams = torch.stack([y.t() @ y for y in (x.double() for x in xs)])
    finite = torch.isfinite(grams.diagonal(dim1=-2, dim2=-1)).all(-1)
    grams = torch.where(finite[:, None, None], grams, torch.zeros((), dtype=grams.dtype, device=grams.device))
    evals, evecs = torch.linalg.eigh(grams)
    # singular values below max(rows, cols)·ε·σ_max (ε of float32) count as zero
    tol = (max(shape) * torch.finfo(torch.float32).eps) ** 2 * evals[:, -1:].clamp(min=0)
    inv_sqrt = torch.where(evals > tol, evals.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(),
                           torch.zeros_like(evals))
    # X·(XᵀX)^(-1/2) in float32: the r×r factor comes from the float64 eigh and is rounded once; the
    # product's error is about ε·‖X‖‖factor‖ per entry, 2–4e-6 for singular values over three decades,
    # against 2–6e-5 for LAPACK's float32 SVD (tests/test_rules.py), and it is one float32 matmul instead
    # of a float64 one (0.7–0.85x of this function's time at LLaMA-60M's low-rank shapes).
    factors = torch.bmm(evecs * inv_sqrt[:, None, :], evecs.transpose(1, 2)).float()
    # a NaN factor makes every entry of X·factor NaN: the r×r factor is marked, not the m×r product
    factors = torch.where(finite[:, None, None], factors, torch.full((), float("nan"), device=factors.device))
    polars = [x @ f for x, f in zip(xs, factors)]
    return polars if tall else [p.t() for p in polars]


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


def _momentum_step(low: Tensor, state: dict[str, Any], momentum: float, nesterov: bool) -> Tensor:
    """M ← μM + (1 − μ)R in ``state``; returns the matrix to orthogonalize: M, or (1 − μ)R + μM under
    Nesterov."""
    buf = state["momentum_buffer"]
    buf.lerp_(low, 1.0 - momentum)
    return low.lerp(buf, momentum) if nesterov else buf


def direction(low: Tensor, state: dict[str, Any], *, momentum: float, nesterov: bool, method: str,
              ns_steps: int) -> Tensor:
    """Update the momentum in ``state`` with ``low`` and return the scaled orthogonal factor."""
    x = _momentum_step(low, state, momentum, nesterov)
    return _scaled(orthogonalize_svd(x) if method == "svd" else newton_schulz(x, ns_steps), low)


def _scaled(o: Tensor, low: Tensor) -> Tensor:
    """The orthogonal factor in ``low``'s dtype, times :func:`shape_factor` of its shape."""
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
        return direction(low, state, momentum=_momentum(group), nesterov=bool(group["nesterov"]),
                         method=group["orthogonalize"], ns_steps=int(group["ns_steps"]))

    def directions(self, lows: Sequence[Tensor], states: Sequence[dict[str, Any]], group: dict[str, Any],
                   splits: Sequence[Split]) -> list[Tensor]:
        """``direction`` of each whole tensor, the exact SVDs batched by shape (:func:`orthogonalize_svd_many`,
        the same bits); FSDP2 pieces gather the whole tensor first (:meth:`Rule.on_piece`)."""
        splits = list(splits) or [Split.of_whole() for _ in lows]
        if group["orthogonalize"] != "svd":
            return super().directions(lows, states, group, splits)
        out: list[Tensor | None] = [None] * len(lows)
        whole: list[int] = []
        for i, split in enumerate(splits):
            if split.whole:
                whole.append(i)
            else:
                out[i] = self.on_piece(lows[i], states[i], group, split)
        momentum, nesterov = _momentum(group), bool(group["nesterov"])
        xs = [_momentum_step(lows[i], states[i], momentum, nesterov) for i in whole]
        for i, o in zip(whole, orthogonalize_svd_many(xs)):
            out[i] = _scaled(o, lows[i])
        return out  # type: ignore[return-value]


def _momentum(group: dict[str, Any]) -> float:
    return DEFAULT_MOMENTUM if group["momentum"] is None else float(group["momentum"])
