"""Sparse row/column selection: keep the r rows (or columns) of G with the largest ℓ2 norm
(Muhamed et al. 2024, "Grass: Compute Efficient Low-Memory LLM Training with Structured Sparse
Gradients", arXiv:2406.17660; its "top-r norm" selection).

With idx the r indices of largest ‖G[i, :]‖₂ (left) or ‖G[:, j]‖₂ (right), sorted ascending:

* left  side: R = G[idx] (r×n), project_back(R) = the m×n matrix with R's rows at idx, zeros elsewhere
* right side: R = G[:, idx] (m×r), project_back(R) puts R's columns at idx

This is R = Pᵀ G (left) or G Qᵀ (right) with a one-hot selection basis, P[idx[j], j] = 1 (m×r) or
Q[j, idx[j]] = 1 (r×n), which ``basis()`` builds; it is orthonormal, so ``project_back(project(G))``
is the orthogonal projection of G onto the chosen rows (columns). ``project`` is a gather,
``project_back`` a scatter, and ``apply_back`` scales the weight and then adds into the r rows
(``index_add_``), with no m×n temporary.

State ``{"side", "idx", "dim"}``: ``idx`` an int64 tensor of r, ``dim`` the length of the selected
dimension (m left, n right: ``project_back`` cannot read it off R). ``nbytes()`` = 8·r.
Refresh cost: one pass over G for the norms (in float32, float64 for float64 input) and a top-k.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Projector, check_index_state


class SparseProjector(Projector):
    name = "sparse"

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed)
        # basis()'s default dtype: the last gradient's (a loaded projector has seen none: float32)
        self._seen_dtype: torch.dtype | None = None

    def _refresh(self, grad: Tensor, side: str) -> None:
        m, n = grad.shape
        d = m if side == "left" else n
        if self.rank > d:
            raise ValueError(
                f"sparse projector of rank {self.rank} cannot select from the {d} "
                f"{'rows' if side == 'left' else 'columns'} of a {m}x{n} matrix"
            )
        norm_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        norms = torch.linalg.vector_norm(grad, dim=1 if side == "left" else 0, dtype=norm_dtype)
        self._state["idx"] = torch.topk(norms, self.rank, sorted=False).indices.sort().values
        self._state["dim"] = d
        self._seen_dtype = grad.dtype

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        """The same selection from row shards: the squared norms of G's columns (right side) or rows (left,
        each rank filling its own) are summed over the ranks, then every rank takes the same top r."""
        m, n = self.comm.shape
        d = m if side == "left" else n
        if self.rank > d:
            raise ValueError(f"sparse projector of rank {self.rank} cannot select from {d} "
                             f"{'rows' if side == 'left' else 'columns'}")
        work = grad.double() if grad.dtype == torch.float64 else grad.float()
        if side == "right":
            scores = work.square().sum(dim=0)
        else:
            start, stop = self.comm.local_rows(m)
            scores = work.new_zeros(m)
            scores[start:stop] = work.square().sum(dim=1)
        self.comm.all_reduce_(scores, "refresh")
        self._state["idx"] = torch.topk(scores, self.rank, sorted=False).indices.sort().values
        self._state["dim"] = d
        self._seen_dtype = grad.dtype

    def _check_state(self, state: dict[str, Any]) -> None:
        check_index_state(self.name, state, self.rank)

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        d = shape[0] if side == "left" else shape[1]
        return {"idx": torch.arange(self.rank, dtype=torch.int64, device=device), "dim": d}

    @property
    def _axis(self) -> int:
        return 0 if self.side == "left" else 1

    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """The one-hot selection matrix, m×r (left) or r×n (right); on the indices' device and in
        the last gradient's dtype unless told (float32 if it has seen none)."""
        idx = self._state["idx"] if device is None else self._state["idx"].to(device)
        dtype = dtype or self._seen_dtype or torch.float32
        sel = torch.zeros(self._state["dim"], self.rank, dtype=dtype, device=idx.device)
        sel[idx, torch.arange(self.rank, device=idx.device)] = 1
        return sel if self.side == "left" else sel.t().contiguous()

    @property
    def _gathers(self) -> bool:
        """Whether the maps are a gather and a scatter here: always, except for rows spread over FSDP2
        ranks (the left side on shards), where the dense one-hot maps of the base class serve."""
        return self.comm.whole or self.side == "right"

    def project(self, grad: Tensor) -> Tensor:
        self._seen_dtype = grad.dtype
        if not self._gathers:
            return super().project(grad)
        return grad.index_select(self._axis, self._state["idx"].to(grad.device))

    def project_back(self, low: Tensor) -> Tensor:
        if not self._gathers:
            return super().project_back(low)
        shape = list(low.shape)
        shape[self._axis] = self._state["dim"]
        out = low.new_zeros(shape)
        return out.index_copy_(self._axis, self._state["idx"].to(low.device), low)

    def residual(self, grad: Tensor, low: Tensor) -> Tensor:
        if not self._gathers:
            return super().residual(grad, low)
        rest = grad.to(low.dtype, copy=True)
        return rest.index_add_(self._axis, self._state["idx"].to(rest.device), low, alpha=-1.0)

    def apply_back(self, weight: Tensor, low: Tensor, alpha: float, beta: float = 1.0) -> None:
        if not self._gathers:
            super().apply_back(weight, low, alpha, beta)
            return
        if beta != 1.0:
            weight.mul_(beta)
        weight.index_add_(self._axis, self._state["idx"].to(weight.device), low.to(weight.dtype), alpha=alpha)
