"""Online PCA projector: P from one SVD, then one gradient step per update on the PCA loss
(Liang et al. 2024, "Memory-Efficient LLM Training with Online Subspace Descent", arXiv:2408.12857).

The first update sets P exactly as ``svd`` does (P = U[:, :r], m×r, left; Q = Vh[:r], r×n, right).
Every later update takes one gradient-descent step of size η = ``lr`` on

    L(P) = ‖Ĝ − P Pᵀ Ĝ‖²_F,    Ĝ = G / ‖G‖_F                     (left side)

and the right side solves the transpose problem, L(Q) = ‖Ĝ − Ĝ Qᵀ Q‖²_F, i.e. the left one for Ĝᵀ
with P = Qᵀ. With A = Ĝ Ĝᵀ and K = PᵀP, expanding
L = ‖Ĝ‖² − 2 tr(Pᵀ A P) + tr(Pᵀ A P K) and differentiating each trace gives

    ∇L = −4 A P + 2 A P K + 2 P (Pᵀ A P) = 2 [ A P (K − 2I) + P (Pᵀ A P) ],

which for orthonormal P is Oja's rule, −2 (I − P Pᵀ) A P. It is evaluated without forming A:
W = Gᵀ P (n×r), A P = G W / ‖G‖², Pᵀ A P = Wᵀ W / ‖G‖², so an update costs two m×n×r matmuls
and no SVD. P is not re-orthonormalized (the paper does not): the loss itself pulls it back
towards PᵀP = I on the gradient's span; ``basis()`` is orthonormal right after the SVD.

``refresh_every_step`` is True: the optimizer calls ``update`` at every step, and
``options_from_group`` turns ``update_proj_gap`` into η = 1 / update_proj_gap, as the paper pairs
them. State ``{"side", "P"}`` like ``svd``, but P is kept in float32 (float64 for float64
gradients) whatever the gradient's dtype: steps of η = 0.005 would mostly round away in bf16's
8-bit mantissa. ``nbytes()`` = P's bytes, r·d·itemsize (d = m left, n right).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .svd import SVDProjector


class OnlinePCAProjector(SVDProjector):
    name = "online_pca"
    refresh_every_step = True
    quantizable = False  # P takes a small gradient step every step: INT4 would round them away

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0, lr: float = 0.005,
                 canonical_signs: bool = True) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed, canonical_signs=canonical_signs)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.lr = float(lr)

    @staticmethod
    def basis_dtype(grad_dtype: torch.dtype) -> torch.dtype:
        """float32 at least: η-sized steps would round away in a half-precision P."""
        return torch.float64 if grad_dtype == torch.float64 else torch.float32

    @classmethod
    def options_from_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr": 1.0 / group["update_proj_gap"]}

    def _refresh(self, grad: Tensor, side: str) -> None:
        m, n = grad.shape
        if "P" not in self._state:
            if self.rank > min(m, n):
                raise ValueError(
                    f"online_pca projector of rank {self.rank} cannot start from the SVD of a "
                    f"{m}x{n} matrix: rank exceeds min(m, n) = {min(m, n)}"
                )
            super()._refresh(grad, side)  # keeps P in basis_dtype(grad.dtype)
            return
        self.check_fits(grad.shape)
        work = grad if grad.dtype == torch.float64 else grad.float()
        x = work if side == "left" else work.t()
        p = self._state["P"].to(work.dtype)
        p = p if side == "left" else p.t()
        # Dividing the two products by ‖G‖ instead of G itself avoids an m×n copy; the clamp makes a
        # zero gradient a zero step rather than 0/0.
        inv_norm = 1.0 / torch.linalg.vector_norm(x).clamp_min(torch.finfo(x.dtype).tiny)
        w = (x.t() @ p) * inv_norm
        ap = (x @ w) * inv_norm
        gram = p.t() @ p
        eye = torch.eye(self.rank, dtype=p.dtype, device=p.device)
        step = ap @ (gram - 2 * eye) + p @ (w.t() @ w)
        p = p - (2 * self.lr) * step
        basis = p if side == "left" else p.t()
        self._state["P"] = basis.to(self.basis_dtype(grad.dtype), copy=True, memory_format=torch.contiguous_format)

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        """The same step from row shards of G: the products that run over W's rows are all-reduced
        (‖G‖², then n×r or r×r), the rest stays local. The first refresh is ``svd``'s."""
        if "P" not in self._state:
            super()._refresh_sharded(grad, side)
            return
        comm = self.comm
        n = comm.shape[1]
        work = grad.double() if grad.dtype == torch.float64 else grad.float()
        stored = self._state["P"].to(work.dtype)
        norm_sq = comm.all_reduce_(work.square().sum(), "refresh")
        inv_norm = 1.0 / norm_sq.sqrt().clamp_min(torch.finfo(work.dtype).tiny)
        eye = torch.eye(self.rank, dtype=work.dtype, device=work.device)
        if side == "left":  # x = G (rows here), p = P (rows here)
            p = stored
            w = comm.all_reduce_(work.t() @ p, "refresh") * inv_norm  # n×r
            ap = (work @ w) * inv_norm  # this rank's rows
            gram = comm.all_reduce_(p.t() @ p, "refresh")
            new = p - (2 * self.lr) * (ap @ (gram - 2 * eye) + p @ (w.t() @ w))
        else:  # x = Gᵀ, p = Qᵀ (n×r, gathered from its column pieces)
            p = comm.gather(stored, 1, n, "refresh").t()
            w = (work @ p) * inv_norm  # this rank's rows of G Qᵀ / ‖G‖
            ap = comm.all_reduce_(work.t() @ w, "refresh") * inv_norm  # n×r
            wtw = comm.all_reduce_(w.t() @ w, "refresh")
            full = p - (2 * self.lr) * (ap @ (p.t() @ p - 2 * eye) + p @ wtw)
            start, stop = comm.cols(n)
            new = full.t()[:, start:stop]
        self._state["P"] = new.to(self.basis_dtype(grad.dtype), copy=True, memory_format=torch.contiguous_format)
