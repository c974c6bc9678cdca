"""APOLLO's projector: a Gaussian matrix regenerated from a seed, never stored (Zhu et al. 2024,
"APOLLO: SGD-like Memory, AdamW-level Performance", arXiv:2412.05270).

The basis has i.i.d. entries N(0, 1/r) (``randn / sqrt(r)``, APOLLO's scaling):

* left  side: P is m×r, R = Pᵀ G (r×n), project_back(R) = P R
* right side: Q is r×n, R = G Qᵀ (m×r), project_back(R) = R Q

With that scale E[Qᵀ Q] = I_n (right) and E[P Pᵀ] = I_m (left), so
``project_back(project(G))`` is G in expectation (a Johnson–Lindenstrauss sketch); the basis is *not*
orthonormal. ``project_back`` is the transpose map and nothing else: no 1/r or n/r correction.

The state is the seed (a plain int; an int64 0-dim tensor is accepted on load) and two shape facts:
``{"side", "seed", "dim"}`` where ``dim`` is the length of the projected dimension (m left, n right),
which ``project_back`` cannot read off the low-rank tensor. The matrix is drawn on demand in float32 on the tensor's device with a ``torch.Generator``
seeded with ``seed`` and then cast, so it is the same in ``project``, ``project_back``,
``apply_back`` and ``basis``, on every DDP rank and after a resume. Each refresh moves the seed
along a SplitMix64 chain (the first refresh uses the constructor's ``seed`` itself), independent of
the gradient's values. ``nbytes()`` is 8: the seed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Projector

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A non-negative 63-bit seed from integers: SplitMix64's finalizer applied to each in turn.

    63 bits so it fits an int64 tensor and ``torch.Generator.manual_seed`` on every backend.
    """
    h = 0
    for v in values:
        h = ((h ^ (int(v) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def gaussian(shape: tuple[int, int], seed: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """``randn(shape)`` from ``torch.Generator(device).manual_seed(seed)``, drawn in float32 then cast.

    Drawing in float32 whatever ``dtype`` is keeps the numbers of a bf16 and an fp32 run the same
    matrix up to rounding.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return out if dtype == torch.float32 else out.to(dtype)


class RandomProjector(Projector):
    name = "random"
    orthonormal = False  # Gaussian N(0, 1/r): orthonormal only in expectation
    reads_gradient = False  # drawn from its seed

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed)
        # Where basis() draws when not told: the last gradient's device and dtype. Not state: a
        # loaded projector learns them from its next gradient.
        self._seen: tuple[torch.device, torch.dtype] | None = None

    def _refresh(self, grad: Tensor, side: str) -> None:
        seed = self._state.get("seed")
        self._state["seed"] = self.seed if seed is None else mix_seed(seed)
        self._state["dim"] = grad.shape[0] if side == "left" else grad.shape[1]
        self._seen = (grad.device, grad.dtype)

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        """Nothing to communicate: every rank draws the same matrix from the shared seed."""
        m, n = self.comm.shape
        seed = self._state.get("seed")
        self._state["seed"] = self.seed if seed is None else mix_seed(seed)
        self._state["dim"] = m if side == "left" else n
        self._seen = (grad.device, grad.dtype)

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        return {"seed": self.seed, "dim": shape[0] if side == "left" else shape[1]}

    def _check_state(self, state: dict[str, Any]) -> None:
        seed, dim = state.get("seed"), state.get("dim")
        if isinstance(seed, Tensor) and seed.dim() == 0 and not seed.is_floating_point():
            seed = int(seed)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
            raise ValueError(f"random projector state needs an integer 'seed' in [0, 2**63), got {seed!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"random projector state needs an integer 'dim' >= 1, got {dim!r}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # A seed saved as a 0-dim tensor becomes a plain int, so no later call reads a device tensor.
        if isinstance(self._state.get("seed"), Tensor):
            self._state["seed"] = int(self._state["seed"])

    def nbytes(self) -> int:
        return 8 if self.initialized else 0

    def _matrix(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        r, d = self.rank, self._state["dim"]
        shape = (d, r) if self.side == "left" else (r, d)
        # Scale in float32 before the cast so bf16 holds the rounded N(0, 1/r) draw, not randn rounded twice.
        out = gaussian(shape, self._state["seed"], device, torch.float32).mul_(1.0 / math.sqrt(r))
        return out if dtype == torch.float32 else out.to(dtype)

    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """The Gaussian matrix (m×r left, r×n right), drawn again; on the device and in the dtype of
        the last gradient this projector saw unless told (CPU float32 before any)."""
        seen_device, seen_dtype = self._seen or (torch.device("cpu"), torch.float32)
        return self._matrix(torch.device(device) if device is not None else seen_device, dtype or seen_dtype)

    def project(self, grad: Tensor) -> Tensor:
        self._seen = (grad.device, grad.dtype)
        return super().project(grad)
