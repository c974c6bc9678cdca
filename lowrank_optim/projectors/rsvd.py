"""Randomized SVD projector: GaLore's top-r singular vectors from a randomized range finder
(Halko, Martinsson & Tropp 2011, "Finding structure with randomness", SIAM Review 53(2),
Algorithms 4.1/4.3 and 5.1).

Let X be G or Gᵀ, whichever is a×b with a ≤ b (the sketch lives on the short side), k = min(r + p, a)
with p = ``oversample`` and q = ``power_iters``:

    Ω ~ N(0, 1)^{b×k}                        (seeded, see below)
    Q = qr(X Ω)
    repeat q times:  Q = qr(X (Xᵀ Q))         (one power step, re-orthonormalized)
    U_B Σ V_Bᵀ = svd(Qᵀ X)                    (a small k×b SVD)
    X ≈ (Q U_B) Σ V_Bᵀ

so the left singular vectors of X are ``Q U_B[:, :r]`` and the right ones ``V_Bᵀ[:r]``; the side the
projector needs (P = U[:, :r], m×r, left; Q = Vh[:r], r×n, right, as ``svd``) is read off whichever
corresponds. Sketching the short side keeps every QR on an a×k matrix, and one sketch serves both
sides. The error of the range is within a factor (1 + O(√(k/(k − r)))·(σ_{r+1}/σ_r)^{2q}) of the
optimum, so two power steps match the exact SVD on the spectra GaLore sees.

Cost per refresh: 2q + 2 matmuls of m×n×k, q + 1 QRs of min(m, n)×k and one k×max(m, n) SVD, against
the full SVD's O(m n min(m, n)).

Ω comes from a ``torch.Generator`` seeded with a mix of the projector's ``seed`` and a refresh
counter kept in the state as a plain int, so every DDP rank and a resumed run draw the same numbers.
Singular-vector signs are canonical by default, as for ``svd``.
State: ``{"side", "P", "refreshes"}``; ``P`` in the gradient's dtype, computed in float32 (float64
for float64 gradients). ``nbytes()`` = P's bytes (r·d·itemsize, d = m left, n right) + 8 for the counter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .random_proj import gaussian, mix_seed
from .svd import CountedSVDProjector, _canonical_pairs


class RSVDProjector(CountedSVDProjector):
    name = "rsvd"

    def __init__(
        self, rank: int, proj_type: str = "std", seed: int = 0, oversample: int = 8, power_iters: int = 2,
        bits: int = 32, canonical_signs: bool = True,
    ) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed, bits=bits, canonical_signs=canonical_signs)
        for option, value in (("oversample", oversample), ("power_iters", power_iters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{option} must be an integer >= 0, got {value!r}")
        self.oversample = oversample
        self.power_iters = power_iters

    def _refresh(self, grad: Tensor, side: str) -> None:
        m, n = grad.shape
        if self.rank > min(m, n):
            raise ValueError(
                f"rsvd projector of rank {self.rank} cannot refresh from a {m}x{n} matrix: "
                f"rank exceeds min(m, n) = {min(m, n)}"
            )
        work = grad if grad.dtype == torch.float64 else grad.float()
        count = self._state.get("refreshes", 0)
        short_is_rows = m <= n
        x = _unit_scaled(work if short_is_rows else work.t())
        a, b = x.shape
        k = min(self.rank + self.oversample, a)
        omega = gaussian((b, k), mix_seed(self.seed, count), work.device, work.dtype)
        q = torch.linalg.qr(x @ omega).Q
        for _ in range(self.power_iters):
            # Orthonormalizing once per X Xᵀ step only loses directions below sqrt(eps)·σ₁, which
            # carry no energy that matters, and halves the QRs of Algorithm 4.4.
            q = torch.linalg.qr(x @ (x.t() @ q)).Q
        u_small, _, vh = torch.linalg.svd(q.t() @ x, full_matrices=False)
        r = self.rank
        left_x, right_x = q @ u_small[:, :r], vh[:r].t()  # singular vectors of X
        u, v = (left_x, right_x) if short_is_rows else (right_x, left_x)  # ... of G
        if self.canonical_signs:
            u, v = _canonical_pairs(u, v)
        basis = u if side == "left" else v.t()
        # copy: vh[:r] is a view that would keep the whole k×b factor alive
        self._store_basis(basis.to(grad.dtype, copy=True, memory_format=torch.contiguous_format))
        self._state["refreshes"] = count + 1

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        """On shards the refresh is exact (the Gram matrix's eigenvectors, as ``svd``): a randomized sketch
        reduced across ranks is not built yet. The counter still moves, as in one process."""
        super()._refresh_sharded(grad, side)
        self._state["refreshes"] = int(self._state.get("refreshes", 0)) + 1


def _unit_scaled(x: Tensor) -> Tensor:
    """``x`` times the power of two that brings its largest |entry| into [0.5, 1).

    The sketch's singular vectors do not depend on the scale, but the power steps form X Xᵀ Q, whose entries are
    about σ₁²: float32 overflows there from |g| ≈ 1e16 on a 512×512 gradient (a raw LinAlgError from the QR) and
    underflows to zero below ~1e-22. Only exponents change, so the sketch's numbers are otherwise the same. The
    exponent is clamped to ±120 so the factor stays a normal float32."""
    exponent = torch.frexp(torch.linalg.vector_norm(x, ord=float("inf"))).exponent.clamp(-120, 120)
    return x * torch.ldexp(torch.ones((), dtype=x.dtype, device=x.device), -exponent)
