"""DCT projector: r columns of a fixed orthonormal DCT-II basis, chosen by the gradient
(Modoranu et al. 2025, "SVD-free low-rank adaptive gradient optimization for large language
models", arXiv:2505.17967; ISTA-DASLab's DCTAdamW).

D is the d×d orthonormal DCT-II matrix of the projected dimension (d = m left, d = n right), with
the basis vectors as its *columns*:

    D[i, k] = c_k · cos(π (2i + 1) k / (2d)),   c_0 = √(1/d),  c_k = √(2/d) for k > 0

(so ``D == scipy.fft.dct(np.eye(d), norm="ortho")``, and ``Dᵀ x`` is the DCT-II of a vector x).
A refresh computes S = G D (right side, m×n) or S = Dᵀ G (left side, m×n), scores each of the d
candidates by the ℓ1 norm of its column (right) or row (left) of S, and keeps the r best indices,
sorted ascending. Then, with D_r = D[:, idx]:

* left  side: basis P = D_r (m×r), R = D_rᵀ G (r×n), project_back(R) = D_r R
* right side: basis Q = D_rᵀ (r×n), R = G D_r (m×r), project_back(R) = R D_rᵀ

D depends only on (d, dtype, device), so it is built once (in float64 from the cosine formula, then
cast) in a module-level cache shared by every layer of that size; ``shared_basis_nbytes()`` reports
those bytes once for the whole model. A projector keeps only its indices: state
``{"side", "idx", "dim"}`` with ``idx`` an int64 tensor of r and ``dim`` = d; ``nbytes()`` = 8·r.

Refresh cost: one m×n×d matmul and a top-k. The step's projection is a second, m×n×r matmul
(r/d of the refresh's cost): DCTAdamW reuses S's selected columns instead, but our optimizer
refreshes every layer before it steps any (so a failing refresh changes nothing), and holding those
columns would keep an extra moment's worth of memory alive for all layers at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Projector, check_index_state

_BASES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def dct_basis(d: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The shared d×d orthonormal DCT-II matrix (basis vectors as columns) for (d, dtype, device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (d, dtype, device)
    basis = _BASES.get(key)
    if basis is None:
        i = torch.arange(d, dtype=torch.int64, device=device)
        # Reduce (2i+1)k modulo 4d in integers first: the cosine then sees an angle in [0, 2π)
        # and keeps full float64 accuracy for large d.
        phase = ((2 * i + 1)[:, None] * i[None, :]) % (4 * d)
        basis = torch.cos(phase.to(torch.float64) * (math.pi / (2 * d)))
        basis *= math.sqrt(2.0 / d)
        basis[:, 0] = math.sqrt(1.0 / d)
        basis = basis.to(dtype)
        _BASES[key] = basis
    return basis


def shared_basis_nbytes() -> int:
    """Bytes held by the cached DCT bases, to be counted once for the whole model."""
    return sum(b.numel() * b.element_size() for b in _BASES.values())


def clear_cache() -> None:
    """Drop the cached bases (they are rebuilt on the next use)."""
    _BASES.clear()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class DCTProjector(Projector):
    name = "dct"

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed)
        # basis()'s default dtype: the last gradient's (a loaded projector has seen none: float32)
        self._seen_dtype: torch.dtype | None = None

    def _refresh(self, grad: Tensor, side: str) -> None:
        m, n = grad.shape
        d = m if side == "left" else n
        if self.rank > d:
            raise ValueError(
                f"dct projector of rank {self.rank} cannot pick from the {d} DCT vectors of a "
                f"{side}-side projection of a {m}x{n} matrix"
            )
        work = grad if grad.dtype == torch.float64 else grad.float()
        basis = dct_basis(d, work.dtype, work.device)
        coeffs = basis.t() @ work if side == "left" else work @ basis
        scores = coeffs.abs().sum(dim=1 if side == "left" else 0)
        idx = torch.topk(scores, self.rank, sorted=False).indices.sort().values
        self._state["idx"] = idx
        self._state["dim"] = d
        self._seen_dtype = grad.dtype

    @classmethod
    def shard_error(cls, side: str, options: dict[str, Any]) -> str | None:
        if side == "left":
            return ("projector='dct' on the left side (its scores need the DCT of every row: an m×n all-reduce; "
                    "use proj_type='right' or 'sparse')")
        return super().shard_error(side, options)

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        """Right side only: the ℓ1 scores of the columns of G D, summed over the ranks' rows."""
        n = self.comm.shape[1]
        if self.rank > n:
            raise ValueError(f"dct projector of rank {self.rank} cannot select from {n} columns")
        work = grad.double() if grad.dtype == torch.float64 else grad.float()
        scores = self.comm.all_reduce_((work @ dct_basis(n, work.dtype, work.device)).abs().sum(dim=0), "refresh")
        self._state["idx"] = torch.topk(scores, self.rank, sorted=False).indices.sort().values
        self._state["dim"] = n
        self._seen_dtype = grad.dtype

    def _check_state(self, state: dict[str, Any]) -> None:
        check_index_state(self.name, state, self.rank)

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        d = shape[0] if side == "left" else shape[1]
        return {"idx": torch.arange(self.rank, dtype=torch.int64, device=device), "dim": d}

    def _columns(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """D[:, idx] (d×r) in ``dtype``: gathered from the shared float32/float64 basis, so a bf16
        model caches no second copy of D."""
        idx = self._state["idx"].to(device)
        basis = dct_basis(self._state["dim"], _compute_dtype(dtype), device)
        return basis.index_select(1, idx).to(dtype)

    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """D[:, idx] (m×r) left, its transpose (r×n) right; on the indices' device and in the last
        gradient's dtype unless told (float32 if it has seen none)."""
        device = torch.device(device) if device is not None else self._state["idx"].device
        cols = self._columns(device, dtype or self._seen_dtype or torch.float32)
        return cols if self.side == "left" else cols.t()

    def project(self, grad: Tensor) -> Tensor:
        self._seen_dtype = grad.dtype
        return super().project(grad)
