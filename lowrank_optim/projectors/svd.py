"""GaLore's projector: the top-r singular vectors of the gradient (Zhao et al. 2024, arXiv:2403.03507).

Refresh: ``U, S, Vh = svd(G)`` in float32, float64 for float64 gradients (``full_matrices=False``, as galore-torch does, so both
packages get the same basis from the same gradient). Left side keeps ``P = U[:, :r]`` (m×r), right
side keeps ``Q = Vh[:r]`` (r×n). The basis is stored in the gradient's dtype: float32 for float32
parameters, bf16/fp16 for half-precision ones (half the bytes; its columns stay orthonormal to that
dtype's precision). Projections run in the gradient's dtype; the weight update is one fused
``addmm_`` (rounded once into the weight's dtype, no m×n temporary).

With ``bits=4`` (group key ``proj_bits=4``; Q-GaLore) the basis is stored as INT4: min–max codes
packed two per byte with a float32 scale and zero point per group of 256 elements
(:class:`lowrank_optim.quant.Int4Tensor`), 0.53 bytes per element, and dequantized when used. The
state then holds ``P_packed``, ``P_scale``, ``P_zero``, ``P_shape``, ``P_group``, ``P_dtype``
instead of ``P``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Projector


class SVDProjector(Projector):
    name = "svd"
    #: Whether the basis may be stored as INT4 (``bits=4``).
    quantizable: ClassVar[bool] = True

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0, bits: int = 32,
                 canonical_signs: bool = False) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed)
        if bits not in (32, 4) or isinstance(bits, bool):
            raise ValueError(f"bits must be 32 or 4 (INT4-stored basis), got {bits!r}")
        if bits == 4 and not self.quantizable:
            raise ValueError(f"the {self.name} projector cannot store its basis as INT4")
        if canonical_signs not in (True, False):
            raise ValueError(f"canonical_signs must be True or False, got {canonical_signs!r}")
        self.bits = bits
        #: Fix each singular pair's sign so that the largest entry of its right singular vector is
        #: positive, as a refresh on FSDP2 shards does (``lro.distributed``); off by default, which keeps
        #: LAPACK's signs and galore-torch's basis.
        self.canonical_signs = canonical_signs

    @classmethod
    def options_from_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        bits = group.get("proj_bits", 32)
        return {"bits": bits} if bits != 32 and cls.quantizable else {}

    def _store_basis(self, basis: Tensor) -> None:
        """Keep ``basis`` (already in its storage dtype) as P, or as INT4 entries when bits=4."""
        for key in [k for k in self._state if k.startswith("P_")]:
            del self._state[key]
        if self.bits == 4:
            from ..quant.tensors import Int4Tensor

            self._state.pop("P", None)
            self._state.update(Int4Tensor.quantize(basis).state_dict(prefix="P_"))
        else:
            self._state["P"] = basis

    def _refresh(self, grad: Tensor, side: str) -> None:
        work = grad if grad.dtype == torch.float64 else grad.float()
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
        if self.canonical_signs:
            from ..distributed import canonical_signs

            v = canonical_signs(vh[: self.rank].t())
            sign = torch.sign((v * vh[: self.rank].t()).sum(0))  # +1 where kept, -1 where flipped
            u, vh = u[:, : self.rank] * sign, v.t()
        # clone: keep r vectors, not the whole factorization they are views of
        basis = u[:, : self.rank] if side == "left" else vh[: self.rank]
        self._store_basis(basis.to(self.basis_dtype(grad.dtype), copy=True).contiguous())

    @staticmethod
    def basis_dtype(grad_dtype: torch.dtype) -> torch.dtype:
        """The dtype P is kept in for gradients of ``grad_dtype``: the gradient's own."""
        return grad_dtype

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        m, n = shape
        rows, cols = (m, self.rank) if side == "left" else (self.rank, n)
        basis = torch.zeros(rows, cols, dtype=self.basis_dtype(dtype), device=device)
        if self.bits == 4:
            from ..kernels import GROUP
            from ..quant.tensors import Int4Tensor

            # built by hand: the quantizer cannot run on the meta device the memory report uses
            n_el, group = rows * cols, GROUP
            groups = -(-n_el // group)
            stored = Int4Tensor(
                torch.zeros(-(-n_el // 2), dtype=torch.uint8, device=device),
                torch.zeros(groups, dtype=torch.float32, device=device),
                torch.zeros(groups, dtype=torch.float32, device=device),
                (rows, cols), group, basis.dtype,
            )
            return stored.state_dict(prefix="P_")
        return {"P": basis}

    def _check_state(self, state: dict[str, Any]) -> None:
        if "P_packed" in state:
            from ..quant.tensors import Int4Tensor

            shape = Int4Tensor.from_state_dict(state, prefix="P_").shape
            if len(shape) != 2:
                raise ValueError(f"{self.name} projector state needs a 2-D basis, got shape {shape}")
        else:
            basis = state.get("P")
            if not isinstance(basis, Tensor) or basis.dim() != 2:
                raise ValueError(f"{self.name} projector state needs a 2-D tensor 'P'")
            shape = tuple(basis.shape)
        r = shape[1] if state["side"] == "left" else shape[0]
        if r != self.rank:
            raise ValueError(
                f"{self.name} projector state holds a rank-{r} basis but this projector has rank {self.rank}"
            )

    def check_fits(self, shape: tuple[int, int] | torch.Size) -> None:
        m, n = shape
        want = (m, self.rank) if self.side == "left" else (self.rank, n)
        have = self.basis_shape()
        if have != want:
            raise ValueError(
                f"{self.name} projector basis has shape {have}, but a {self.side}-side "
                f"projection of a {m}x{n} matrix needs {want}"
            )

    def basis_shape(self) -> tuple[int, ...]:
        if "P_packed" in self._state:
            return tuple(self._state["P_shape"])
        return tuple(self._state["P"].shape)

    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        if "P_packed" in self._state:
            from ..quant.tensors import Int4Tensor

            return Int4Tensor.from_state_dict(self._state, prefix="P_").dequantize(dtype, device)
        return self._state["P"].to(device=device, dtype=dtype)
