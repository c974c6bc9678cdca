"""DCT projector: r columns of a fixed orthonormal DCT basis, chosen by the gradient
(Modoranu et al. 2025, "SVD-free low-rank adaptive gradient optimization for large language
models", arXiv:2505.17967; ISTA-DASLab's DCTAdamW, ``ista_daslab_optimizers.DCTAdamW``).

Let D be the d×d orthonormal DCT-II matrix of the projected dimension (d = m left, d = n right), with
the DCT-II basis vectors as its *columns*:

    D[i, k] = c_k · cos(π (2i + 1) k / (2d)),   c_0 = √(1/d),  c_k = √(2/d) for k > 0

(so ``D == scipy.fft.dct(np.eye(d), norm="ortho")``, and ``Dᵀ x`` is the DCT-II of a vector x). The
official code offers two candidate bases, chosen here by ``dct_variant``:

* ``"makhoul"``: the columns of D (the DCT-II vectors; the official ``sim_type="makhoul"``, whose
  Q is its ``dct3_matrix``ᵀ). A refresh computes S = G D (right) or Dᵀ G (left) as the orthonormal
  DCT-II of G's rows (columns) by Makhoul's N-point FFT algorithm: reorder the row to
  (x₀, x₂, x₄, …, x₅, x₃, x₁), take its FFT V; then y_k = c_k·Re(e^{−iπk/(2d)} V_k): O(mn log d)
  instead of O(mnd).
* ``"matmul"`` (the official default, ``sim_type="matmul"``): the columns of Dᵀ, i.e. the rows of D,
  which are the DCT-III basis vectors (the official Q is ``dct3_matrix`` = Dᵀ, used as Q[:, idx]).
  A refresh computes S = G Dᵀ (right) or D G (left) by one m×n×d matmul.

Either way each of the d candidates is scored by the ℓ1 norm of its column (right) or row (left) of S
(the official ``ell_norm=1``), and the r best indices are kept, sorted ascending. Then, with B the
variant's basis and B_r = B[:, idx]:

* left  side: basis P = B_r (m×r), R = B_rᵀ G (r×n), project_back(R) = B_r R
* right side: basis Q = B_rᵀ (r×n), R = G B_r (m×r), project_back(R) = R B_rᵀ

D depends only on (d, dtype, device), so it is built once (in float64 from the cosine formula, then
cast) in a module-level cache shared by every layer of that size and by both variants (``matmul``
reads its transpose); ``shared_basis_nbytes()`` reports those bytes once for the whole model. A
projector keeps only its indices: state ``{"side", "idx", "dim", "variant"}`` with ``idx`` an int64
tensor of r, ``dim`` = d and ``variant`` the basis the indices point into (a checkpoint without it
is ``makhoul``'s, the only basis of earlier versions); ``nbytes()`` = 8·r.

Refresh cost: the DCT of G (FFT or one matmul) and a top-k. The step's projection is a second, m×n×r
matmul (r/d of a matmul refresh's cost): DCTAdamW reuses S's selected columns instead, but our
optimizer refreshes every layer before it steps any (so a failing refresh changes nothing), and
holding those columns would keep an extra moment's worth of memory alive for all layers at once.

Departures from the official code: the indices are sorted ascending (its ``torch.topk(sorted=False)``
order is the backend's: a heap order on CPU, another on CUDA), so the slot a kept moment sits in
(``on_refresh="keep"``) is the same on every device; with ``rotate`` or between refreshes the order
changes nothing. Each layer's side has its own basis of its own size (the official optimizer builds one
Q, of the first layer's size, and right-projects 512/1024×3584/4096 layers to fit it).
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


#: ``dct_variant``: which orthonormal basis the columns are chosen from (module docstring).
VARIANTS = ("makhoul", "matmul")


def dct2_rows(x: Tensor) -> Tensor:
    """The orthonormal DCT-II of each row of ``x`` (``x @ dct_basis(n)``), by Makhoul's FFT algorithm."""
    n = x.shape[-1]
    order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)]).to(x.device)
    spectrum = torch.fft.fft(x.index_select(-1, order), dim=-1)
    k = torch.arange(n, device=x.device, dtype=torch.float64)
    twiddle = torch.polar(torch.full_like(k, math.sqrt(2.0 / n)), -math.pi * k / (2 * n))
    twiddle[0] = math.sqrt(1.0 / n)
    return (spectrum * twiddle.to(spectrum.dtype)).real


def variant_basis(d: int, variant: str, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The d×d candidate basis (vectors as columns): D for ``makhoul``, Dᵀ (a view) for ``matmul``."""
    basis = dct_basis(d, dtype, device)
    return basis if variant == "makhoul" else basis.t()


def coefficients(work: Tensor, side: str, variant: str) -> Tensor:
    """S: G B (right) or Bᵀ G (left) for the variant's basis B; ``makhoul`` by FFT along the projected side."""
    if variant == "makhoul":
        return dct2_rows(work) if side == "right" else dct2_rows(work.t()).t()
    d = work.shape[0] if side == "left" else work.shape[1]
    basis = variant_basis(d, variant, work.dtype, work.device)
    return basis.t() @ work if side == "left" else work @ basis


class DCTProjector(Projector):
    name = "dct"

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0, dct_variant: str = "makhoul") -> None:
        if dct_variant not in VARIANTS:
            raise ValueError(f"dct_variant must be one of {', '.join(map(repr, VARIANTS))} (the official DCTAdamW's "
                             f"sim_type; 'matmul' is its default), got {dct_variant!r}")
        super().__init__(rank, proj_type=proj_type, seed=seed)
        self.variant = dct_variant
        # basis()'s default dtype: the last gradient's (a loaded projector has seen none: float32)
        self._seen_dtype: torch.dtype | None = None

    @classmethod
    def options_from_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        """A group's ``dct_variant`` key (``lro.DCTAdamW`` sets ``"matmul"``), so a preset chooses the basis
        without ``projector_options`` (which override it) and still works with any other projector."""
        return {"dct_variant": group["dct_variant"]} if group.get("dct_variant") is not None else {}

    def _select(self, scores: Tensor, d: int, grad: Tensor) -> None:
        self._state["idx"] = torch.topk(scores, self.rank, sorted=False).indices.sort().values
        self._state["dim"] = d
        self._state["variant"] = self.variant
        self._seen_dtype = grad.dtype

    def _refresh(self, grad: Tensor, side: str) -> None:
        m, n = grad.shape
        d = m if side == "left" else n
        if self.rank > d:
            raise ValueError(
                f"dct projector of rank {self.rank} cannot pick from the {d} DCT vectors of a "
                f"{side}-side projection of a {m}x{n} matrix"
            )
        work = grad if grad.dtype == torch.float64 else grad.float()
        scores = coefficients(work, side, self.variant).abs().sum(dim=1 if side == "left" else 0)
        self._select(scores, d, grad)

    @classmethod
    def shard_error(cls, side: str, options: dict[str, Any]) -> str | None:
        if side == "left":
            return ("projector='dct' on the left side (its scores need the DCT of every row: an m×n all-reduce; "
                    "use proj_type='right' or 'sparse')")
        return super().shard_error(side, options)

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        """Right side only: the ℓ1 scores of the columns of S (this rank's rows of it), summed over the ranks."""
        n = self.comm.shape[1]
        if self.rank > n:
            raise ValueError(f"dct projector of rank {self.rank} cannot select from {n} columns")
        work = grad.double() if grad.dtype == torch.float64 else grad.float()
        scores = self.comm.all_reduce_(coefficients(work, "right", self.variant).abs().sum(dim=0), "refresh")
        self._select(scores, n, grad)

    def _check_state(self, state: dict[str, Any]) -> None:
        check_index_state(self.name, state, self.rank)
        saved = state.get("variant", "makhoul")
        if saved != self.variant:
            raise ValueError(f"dct projector state was built with dct_variant={saved!r}, but this projector has "
                             f"dct_variant={self.variant!r}: its indices point into another basis; build the "
                             f"optimizer with projector_options={{'dct_variant': {saved!r}}}")

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        d = shape[0] if side == "left" else shape[1]
        return {"idx": torch.arange(self.rank, dtype=torch.int64, device=device), "dim": d, "variant": self.variant}

    def _columns(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """B[:, idx] (d×r) in ``dtype``: gathered from the shared float32/float64 basis, so a bf16
        model caches no second copy of D."""
        idx = self._state["idx"].to(device)
        basis = variant_basis(self._state["dim"], self.variant, _compute_dtype(dtype), device)
        return basis.index_select(1, idx).to(dtype)

    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """B[:, idx] (m×r) left, its transpose (r×n) right; on the indices' device and in the last
        gradient's dtype unless told (float32 if it has seen none)."""
        device = torch.device(device) if device is not None else self._state["idx"].device
        cols = self._columns(device, dtype or self._seen_dtype or torch.float32)
        return cols if self.side == "left" else cols.t()

    def project(self, grad: Tensor) -> Tensor:
        self._seen_dtype = grad.dtype
        return super().project(grad)
