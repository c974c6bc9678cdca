"""GaLore's projector: the top-r singular vectors of the gradient (Zhao et al. 2024, arXiv:2403.03507).

Refresh: ``U, S, Vh = svd(G)`` in float32, float64 for float64 gradients (``full_matrices=False``, as galore-torch does, so both
packages get the same basis from the same gradient). Left side keeps ``P = U[:, :r]`` (m×r), right
side keeps ``Q = Vh[:r]`` (r×n). The basis is stored in the gradient's dtype: float32 for float32
parameters, bf16/fp16 for half-precision ones (half the bytes; its columns stay orthonormal to that
dtype's precision). Projections run in the gradient's dtype; the weight update is one fused
``addmm_`` (rounded once into the weight's dtype, no m×n temporary).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Projector


class SVDProjector(Projector):
    name = "svd"

    def _refresh(self, grad: Tensor, side: str) -> None:
        work = grad if grad.dtype == torch.float64 else grad.float()
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
        # clone: keep r vectors, not the whole factorization they are views of
        basis = u[:, : self.rank] if side == "left" else vh[: self.rank]
        self._state["P"] = basis.to(self.basis_dtype(grad.dtype), copy=True).contiguous()

    @staticmethod
    def basis_dtype(grad_dtype: torch.dtype) -> torch.dtype:
        """The dtype P is kept in for gradients of ``grad_dtype``: the gradient's own."""
        return grad_dtype

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        m, n = shape
        rows, cols = (m, self.rank) if side == "left" else (self.rank, n)
        return {"P": torch.zeros(rows, cols, dtype=self.basis_dtype(dtype), device=device)}

    def _check_state(self, state: dict[str, Any]) -> None:
        basis = state.get("P")
        if not isinstance(basis, Tensor) or basis.dim() != 2:
            raise ValueError(f"{self.name} projector state needs a 2-D tensor 'P'")
        r = basis.shape[1] if state["side"] == "left" else basis.shape[0]
        if r != self.rank:
            raise ValueError(
                f"{self.name} projector state holds a rank-{r} basis but this projector has rank {self.rank}"
            )

    def check_fits(self, shape: tuple[int, int] | torch.Size) -> None:
        m, n = shape
        want = (m, self.rank) if self.side == "left" else (self.rank, n)
        if tuple(self.basis().shape) != want:
            raise ValueError(
                f"{self.name} projector basis has shape {tuple(self.basis().shape)}, but a {self.side}-side "
                f"projection of a {m}x{n} matrix needs {want}"
            )

    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        return self._state["P"].to(device=device, dtype=dtype)
