"""Haar projector: GWT's fixed basis, the level-l Haar approximation coefficients along one side.

The approximation coefficients of an l-step orthonormal Haar transform (Wen et al. 2025, "GWT: Scalable
Optimizer State Compression for Large Language Model Training", arXiv:2501.07237; the official code is
zqOuO/GWT, ``waveadamw.py``).

Along the projected side (d = n on the right, m on the left) the level-l Haar approximation of a
vector is the sum of each block of 2^l consecutive entries times 2^(−l/2), so the basis is the
r × d matrix (r = ⌈d / 2^l⌉, the projector's rank whatever ``rank`` says)

    H[j, c] = 2^(−l/2)   where c // 2^l == j,   0 elsewhere,

and R = G Hᵀ (m×r, right side) or H G (r×n, left), project_back(R) = R H or Hᵀ R: R repeated over
each block, times 2^(−l/2). H's rows have disjoint supports, so they are orthonormal when 2^l divides
d, and G − project_back(R) is exactly what the detail coefficients of all l levels reconstruct.

**Widths that 2^l does not divide** follow the official code's default boundary (``mode="zero"``):
each level pads its odd-length input with one zero, which is the same as padding the side with zeros
to a multiple of 2^l, transforming, and cropping. The last block is then partial, and its row of H
keeps the weight 2^(−l/2) (its norm is √(q/2^l) for the q entries it covers): the basis is orthonormal
on every full block, and G − project_back(R) on the partial one is what the official inverse transform
gives there.

On FSDP2 row shards the right side works as it is (each rank's rows are whole rows); the left side,
whose blocks would straddle the ranks, is refused.

The basis never changes (``fixed``: the optimizer builds it at the first step and never refreshes
it), so nothing is computed at a refresh and nothing is kept but the side and d: state
``{"side", "dim"}``, ``nbytes()`` = 0. ``rank`` only decides, as for every projector, which weights
are projected (those with a short side above it); ``level`` (default 2, the paper's LLaMA setting)
sets the compression, 2^l. The maps are sums and repeats over a reshape (O(m·n), no matmul, no
stored matrix); ``basis()`` builds H when asked. ``spread(x)`` gives each coefficient's value over its
block (``project_back`` without the 2^(−l/2)), which GWT uses to divide the details by the Adam
denominator of the coefficient they belong to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Projector, choose_side


class HaarProjector(Projector):
    name = "haar"
    fixed = True
    reads_gradient = False

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0, level: int = 2) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed)
        if isinstance(level, bool) or not isinstance(level, int) or level < 1:
            raise ValueError(f"level must be an integer >= 1 (the projection keeps 1/2**level of the "
                             f"projected side), got {level!r}")
        self.level = level
        self.block = 2**level
        self.entry = 2.0 ** (-level / 2)

    def coefficients(self, d: int) -> int:
        """How many approximation coefficients a side of length ``d`` has: ⌈d / 2^level⌉."""
        return -(-d // self.block)

    def _refresh(self, grad: Tensor, side: str) -> None:
        m, n = grad.shape
        self._state["dim"] = m if side == "left" else n

    @classmethod
    def shard_error(cls, side: str, options: dict[str, Any]) -> str | None:
        if side == "left":
            return (f"projector={cls.name!r} on the left side (its blocks run along the rows FSDP2 splits; use "
                    "proj_type='right', GWT's own side)")
        return None

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        """Right side only: every rank holds whole rows, and the blocks run along them."""
        if side == "left":
            raise TypeError(self.shard_error(side, {}))
        self._state["dim"] = self.comm.shape[1]

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        return {"dim": shape[0] if side == "left" else shape[1]}

    def _check_state(self, state: dict[str, Any]) -> None:
        dim = state.get("dim")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"haar projector state needs an integer 'dim' >= 1, got {dim!r}")

    def low_rank_shape(self, shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
        m, n = shape
        side = self.side or choose_side(shape, self.proj_type)
        return (self.coefficients(m), n) if side == "left" else (m, self.coefficients(n))

    # ----------------------------------------------------------------- maps, along dim 1 of the right frame
    def _frame(self, x: Tensor) -> Tensor:
        """``x`` with the projected side last (a view)."""
        return x.t() if self.side == "left" else x

    def _block_sums(self, grad: Tensor) -> Tensor:
        x = self._frame(grad)
        d = x.shape[1]
        pad = self.coefficients(d) * self.block - d
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(x.shape[0], -1, self.block).sum(dim=2)

    def spread(self, low: Tensor) -> Tensor:
        """Each coefficient's value over the entries of its block: an m×n tensor from one shaped like R."""
        x = self._frame(low).repeat_interleave(self.block, dim=1)[:, : self._state["dim"]]
        return x.t() if self.side == "left" else x

    def project(self, grad: Tensor) -> Tensor:
        low = self._block_sums(grad).mul_(self.entry)
        return low.t().contiguous() if self.side == "left" else low

    def project_back(self, low: Tensor) -> Tensor:
        return self.spread(low).mul(self.entry)

    def residual(self, grad: Tensor, low: Tensor) -> Tensor:
        return grad.to(low.dtype).sub(self.spread(low), alpha=self.entry)

    def apply_back(self, weight: Tensor, low: Tensor, alpha: float, beta: float = 1.0) -> None:
        if beta != 1.0:
            weight.mul_(beta)
        weight.add_(self.spread(low.to(weight.dtype)), alpha=alpha * self.entry)

    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """H (r×d) on the right side, Hᵀ (d×r) on the left; float32 on the CPU unless told."""
        d = self._state["dim"]
        r = self.coefficients(d)
        cols = torch.arange(d, device=device)
        h = torch.zeros(r, d, dtype=dtype or torch.float32, device=device)
        h[cols // self.block, cols] = self.entry
        return h.t() if self.side == "left" else h
