"""Sums of squares along one dimension, fast on CPU.

``torch.linalg.vector_norm(x, dim=0)`` on a CPU tensor reduces along the strided dimension element by
element: 158 ms for a 32000×512 float32 tensor at one thread, against 4 ms along its rows, and 4.3 ms
for a 1376×512 gradient against 0.5 ms for ``x.square().sum(0)`` (``bench``-style timing, this VM,
torch 2.13). The low-rank updates take such norms every step (channel norms of G, R and N for APOLLO,
Fira and FRUGAL's round-off test; Adafactor's column statistics, also on an embedding), so on CPU they
are computed here as sums of squares over row tiles of about 2^17 elements (a tile's square stays in
cache; no temporary as large as the tensor). The sum is torch's pairwise ``sum`` within a tile and a
running sum over tiles: relative error about 1e-7 in float32, below the 1e-6 of ``vector_norm`` along
a strided dimension (measured against float64). Elsewhere, and along the last dimension, it is
``vector_norm``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Elements per tile of the CPU path.
TILE = 1 << 17


def _work_dtype(x: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype``, or x's own dtype with half precision widened to float32."""
    return dtype or (torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)


def sum_squares(x: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """Σ x² along ``dim``, kept, computed in ``dtype`` (None: x's dtype, float32 for half precision)
    and returned in ``dtype`` or x's dtype."""
    out_dtype = dtype or x.dtype
    work = _work_dtype(x, dtype)
    d = dim % x.dim()
    if x.device.type != "cpu" or d == x.dim() - 1 or x.numel() == 0:
        return torch.linalg.vector_norm(x, dim=d, keepdim=True, dtype=work).square_().to(out_dtype)
    per = max(1, TILE // max(1, x.numel() // x.shape[d]))  # positions of dim per tile
    total = None
    for start in range(0, x.shape[d], per):
        part = x.narrow(d, start, min(per, x.shape[d] - start))
        part = (part.to(work).square_() if part.dtype != work else part.square()).sum(d, keepdim=True)
        total = part if total is None else total.add_(part)
    return total.to(out_dtype)


def norms(x: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """The 2-norms of ``x`` along ``dim``, kept (as ``x.norm(dim=dim, keepdim=True, dtype=dtype)``)."""
    return sum_squares(x, dim, _work_dtype(x, dtype)).sqrt_().to(dtype or x.dtype)
