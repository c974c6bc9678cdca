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

**Signs.** A singular vector has no sign of its own, and LAPACK builds (MKL, OpenBLAS, cuSOLVER) and
the Gram-matrix refresh on FSDP2 shards pick different ones. By default (``canonical_signs=True``)
each pair is flipped so that the largest-magnitude entry of its right singular vector is positive, so
the basis is the same wherever it is computed and a run is the same run everywhere.
``canonical_signs=False`` keeps LAPACK's signs, which is what galore-torch uses (our parity tests
compare against it that way); it cannot be used on shards.

**Shards** (FSDP2 rows): the top-r right singular vectors V and values σ come from the all-reduced
Gram matrix GᵀG = Σ_k G_kᵀ G_k (n×n, float64) and ``eigh``; the right side keeps this rank's columns
of Q = Vᵀ, the left side its rows of P = G V Σ⁻¹ (computed from its own rows of G; where fewer than r
singular values are resolved, the rest of P is an orthonormal completion: :func:`sharded_left`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..distributed import Local, RowShard, canonical_signs, top_right_singular
from ..quant.storage import INT4
from .base import Projector


class SVDProjector(Projector):
    name = "svd"
    #: Whether the basis may be stored as INT4 (``bits=4``).
    quantizable: ClassVar[bool] = True

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0, bits: int = 32,
                 canonical_signs: bool = True) -> None:
        super().__init__(rank, proj_type=proj_type, seed=seed)
        if bits not in (32, 4) or isinstance(bits, bool):
            raise ValueError(f"bits must be 32 or 4 (INT4-stored basis), got {bits!r}")
        if bits == 4 and not self.quantizable:
            raise ValueError(f"the {self.name} projector cannot store its basis as INT4")
        if canonical_signs not in (True, False):
            raise ValueError(f"canonical_signs must be True or False, got {canonical_signs!r}")
        self.bits = bits
        #: Each singular pair's sign fixed by its right singular vector (see the module docstring);
        #: False keeps LAPACK's signs, as galore-torch.
        self.canonical_signs = canonical_signs

    @classmethod
    def options_from_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        bits = group.get("proj_bits", 32)
        return {"bits": bits} if bits != 32 and cls.quantizable else {}

    @classmethod
    def shard_error(cls, side: str, options: dict[str, Any]) -> str | None:
        if options.get("canonical_signs", True) is False:
            return (f"projector={cls.name!r} with canonical_signs=False (LAPACK's singular-vector signs: shards "
                    "refresh from the Gram matrix, whose eigenvectors have other signs)")
        return super().shard_error(side, options)

    def _store_basis(self, basis: Tensor) -> None:
        """Keep ``basis`` (already in its storage dtype) as P, or as INT4 entries when bits=4."""
        for key in [k for k in self._state if k.startswith("P_")]:
            del self._state[key]
        if self.bits == 4:
            self._state.pop("P", None)
            INT4.store(self._state, "P", basis)
        else:
            self._state["P"] = basis

    def _refresh(self, grad: Tensor, side: str) -> None:
        work = grad if grad.dtype == torch.float64 else grad.float()
        if self.canonical_signs:
            u, v = top_singular_pairs(work, self.rank)
        else:
            u, _, vh = torch.linalg.svd(work, full_matrices=False)
            u, v = u[:, : self.rank], vh[: self.rank].t()
        # clone: keep r vectors, not the whole factorization they are views of
        basis = u if side == "left" else v.t()
        self._store_basis(basis.to(self.basis_dtype(grad.dtype), copy=True).contiguous())

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        m, n = self.comm.shape
        if self.rank > min(m, n):
            raise ValueError(f"{self.name} projector of rank {self.rank} cannot refresh from a {m}x{n} matrix")
        v, sigma = top_right_singular(grad, self.comm, self.rank)
        if side == "right":
            start, stop = self.comm.cols(n)
            basis = v.t()[:, start:stop]  # Q is kept sharded by columns, gathered when used
        else:
            basis = sharded_left(grad, v, sigma, self.comm)  # this rank's rows of P
        self._store_basis(basis.to(self.basis_dtype(grad.dtype)).contiguous())

    @staticmethod
    def basis_dtype(grad_dtype: torch.dtype) -> torch.dtype:
        """The dtype P is kept in for gradients of ``grad_dtype``: the gradient's own."""
        return grad_dtype

    def stored_shape(self, shape: tuple[int, int] | torch.Size, side: str) -> tuple[int, int]:
        """The shape of the basis this rank keeps for an m×n weight: P (m×r, its rows on shards) or Q
        (r×n, its columns on shards)."""
        m, n = shape
        if side == "left":
            start, stop = self.comm.local_rows(m)
            return (stop - start, self.rank)
        start, stop = self.comm.cols(n)
        return (self.rank, stop - start)

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        basis = torch.zeros(self.stored_shape(shape, side), dtype=self.basis_dtype(dtype), device=device)
        return INT4.zeros("P", basis) if self.bits == 4 else {"P": basis}

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
        want = self.stored_shape(shape, self.side)
        have = self.basis_shape()
        if have != want:
            full = (m, self.rank) if self.side == "left" else (self.rank, n)
            raise ValueError(
                f"{self.name} projector basis has shape {have}, but a {self.side}-side "
                f"projection of a {m}x{n} matrix needs {want if self.comm.whole else f'{want} of {full}'}"
            )

    def basis_shape(self) -> tuple[int, ...]:
        if INT4.holds(self._state, "P"):
            return INT4.shape(self._state, "P")
        return tuple(self._state["P"].shape)

    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        if INT4.holds(self._state, "P"):
            return INT4.load(self._state, "P", dtype=dtype, device=device)
        return self._state["P"].to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ FSDP2 checkpoints
    def export_state(self) -> dict[str, Any]:
        """On shards: P (this rank's rows) or Q (its columns) as a DTensor; an INT4 basis's arrays padded
        to the largest piece's lengths on every rank (an even ``Shard(0)``), its shape the whole basis's."""
        out = self.state_dict()
        comm = self.comm
        if comm.whole or not self.initialized:
            return out
        m, n = comm.shape
        if isinstance(out.get("P"), Tensor):
            dim, length = (0, m) if self.side == "left" else (1, n)
            out["P"] = comm.wrap(out["P"], dim, length)
        elif INT4.holds(out, "P"):
            largest = (-(-m // comm.world), self.rank) if self.side == "left" else (self.rank, -(-n // comm.world))
            numel, group = math.prod(largest), int(out["P_group"])
            for key, count in (("P_packed", -(-numel // 2)), ("P_scale", -(-numel // group)),
                               ("P_zero", -(-numel // group))):
                padded = out[key].new_zeros(count)
                padded[: out[key].numel()] = out[key]
                out[key] = comm.wrap(padded, 0, comm.world * count)
            out["P_shape"] = [m, self.rank] if self.side == "left" else [self.rank, n]
        return out

    def import_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        saved = super().import_state(saved)
        if self.comm.whole or not INT4.holds(saved, "P") or saved.get("side") not in ("left", "right"):
            return saved
        local = self.stored_shape(self.comm.shape, saved["side"])
        numel, group = math.prod(local), int(saved["P_group"])
        saved["P_packed"] = saved["P_packed"][: -(-numel // 2)]
        saved["P_scale"] = saved["P_scale"][: -(-numel // group)]
        saved["P_zero"] = saved["P_zero"][: -(-numel // group)]
        saved["P_shape"] = list(local)
        return saved


#: The Gram matrix's eigenvalues carry rounding of about eps·λ₁: below this many of them (relative to
#: λ₁) the r-th pair is not resolved in the working precision, and the refresh redoes it more exactly.
RESOLVED = 1e3


class CountedSVDProjector(SVDProjector):
    """An SVD-family projector that counts its refreshes in its state (``refreshes``, an int: 8 bytes once
    built), for a schedule or a random stream that depends on it (``rsvd``'s seeds, ``coap``'s re-SVDs)."""

    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        return {**super()._placeholder(shape, side, dtype, device), "refreshes": 0}

    def _check_state(self, state: dict[str, Any]) -> None:
        super()._check_state(state)
        count = state.get("refreshes")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{self.name} projector state needs an integer 'refreshes' >= 0, got {count!r}")

    def nbytes(self) -> int:
        stored = super().nbytes()
        return stored + 8 if stored else 0


def top_singular_pairs(g: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The top-``rank`` singular pairs (U m×r, V n×r) of ``g`` with canonical signs, from the Gram matrix
    of its short side and ``eigh``: GᵀG V = V Σ² (or G Gᵀ U = U Σ²), the other side's vectors G V Σ⁻¹
    (Gᵀ U Σ⁻¹). An m×n×min(m, n) matmul and a min(m, n)² eigh, against the SVD's larger constant (0.25–0.4x
    its time on LLaMA shapes, this CPU). Where the r-th squared singular value is within ``RESOLVED``·eps of
    the first (the Gram matrix squares the condition number) it is done in float64: a working-precision
    Gram of a well-conditioned gradient gives the SVD's subspace to rounding, but real gradients are rarely
    that (LLaMA-60M's at r = 128 of 512: 51–56 of 56 weights need float64 over a run's first 600 steps). Where the
    gradient has fewer than r singular values that float64 resolves (above ~1.5e-6·σ₁: a rank-deficient
    gradient, e.g. fewer distinct inputs than r), the long side's vectors for the rest are an orthonormal
    completion (:func:`_gram_pairs`), as arbitrary as an SVD's for a zero singular value; only a
    non-finite gradient takes LAPACK's SVD. Whether to try the working precision at all is read off the
    spectrum's steepness (:func:`_steep`), so a gradient that would need float64 does not pay for a
    float32 ``eigh`` first; the choice depends on ``g`` alone, so a resumed run makes the same one."""
    tall = g.shape[0] >= g.shape[1]
    x = g if tall else g.t()  # the short side is x's second
    gram = x.t() @ x
    pairs = None
    if g.dtype == torch.float64 or not _steep(gram, rank):
        pairs = _gram_pairs(x, gram, rank, tall, complete=g.dtype == torch.float64)
    if pairs is None and g.dtype != torch.float64:
        x64 = x.double()
        pairs = _gram_pairs(x64, x64.t() @ x64, rank, tall, complete=True)
        pairs = None if pairs is None else (pairs[0].to(g.dtype), pairs[1].to(g.dtype))
    if pairs is None:
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        pairs = _canonical_pairs(u[:, :rank], vh[:rank].t())
    return pairs


def _steep(gram: Tensor, rank: int) -> bool:
    """Whether the working precision is unlikely to resolve ``rank`` eigenpairs of ``gram``: its
    participation ratio (Σλ)²/Σλ² = tr(A)²/‖A‖_F² (cheap: no eigensolve) is below that of the geometric
    spectrum λ_i = λ₁ρ^(i−1) whose r-th eigenvalue sits at the resolution limit, ρ^(r−1) = RESOLVED·eps,
    which is (1 + ρ)/(1 − ρ) (28 at r = 128 in float32). Only the order of the attempts depends on it: a
    steep gradient goes to float64 first, a flat one tries float32 and falls back if unresolved. On
    LLaMA-60M gradients every weight needing float64 had a ratio ≤ 8, Gaussian matrices 256–373."""
    if rank < 2:
        return False
    rho = (RESOLVED * torch.finfo(gram.dtype).eps) ** (1 / (rank - 1))
    trace, squares = float(gram.diagonal().sum()), float(gram.double().square().sum())
    return trace * trace < (1 + rho) / (1 - rho) * squares  # False for NaN: the usual attempts


def _gram_pairs(x: Tensor, gram: Tensor, rank: int, tall: bool, complete: bool) -> tuple[Tensor, Tensor] | None:
    """The pairs from the short side's Gram matrix ``gram`` = xᵀx, or None where the r-th is unresolved
    and not ``complete`` (or the matrix is not finite). With ``complete`` the pairs past the last resolved
    one keep their short-side vectors (``eigh``'s, orthonormal) and take long-side ones that complete the
    resolved ones' orthonormally: Householder QR of [x V_resolved Σ⁻¹, x V_rest] keeps the span of the
    first and orthonormalizes what x maps the rest to, however small (zero columns give unit vectors)."""
    evals, evecs = torch.linalg.eigh(gram)
    evals, short = evals[-rank:].flip(0), evecs[:, -rank:].flip(-1)
    resolved = evals > RESOLVED * torch.finfo(x.dtype).eps * evals[0]  # a prefix: evals descend
    if not bool(resolved[-1]) and not (complete and bool(torch.isfinite(evals[0]))):
        return None
    j = int(resolved.sum())
    long = x @ short
    long[:, :j] /= evals[:j].sqrt()
    if j < rank:
        long[:, j:] = torch.linalg.qr(long).Q[:, j:]
    u, v = (long, short) if tall else (short, long)
    return _canonical_pairs(u, v)


def sharded_left(grad: Tensor, v: Tensor, sigma: Tensor, comm: Local | RowShard) -> Tensor:
    """This rank's rows of the left singular vectors G V Σ⁻¹ (float64) of a row-sharded G, from the top
    right pairs (V, σ) that every rank holds (:func:`~lowrank_optim.distributed.top_right_singular`).
    Where σ² is not resolved in float64 (at or below ``RESOLVED``·eps·σ₁²: a rank-deficient gradient),
    G v / σ would be rounding divided by almost nothing, columns of any size; those columns are completed
    orthonormally instead, as on one process (:func:`_gram_pairs`): the whole m×r G V is gathered, only
    in that case, and every rank runs the same QR and keeps its rows. Every rank takes the same branch:
    σ is the same on all of them."""
    long = grad.double() @ v
    power = sigma.square()
    j = int((power > RESOLVED * torch.finfo(torch.float64).eps * power[0]).sum())  # a prefix: σ descends
    long[:, :j] /= sigma[:j]
    if j < sigma.numel() and bool(torch.isfinite(power[0])):
        whole = comm.gather(long, 0, comm.global_shape(grad)[0], "refresh")
        start, stop = comm.local_rows(whole.shape[0])
        long[:, j:] = torch.linalg.qr(whole).Q[start:stop, j:]
    return long


def _canonical_pairs(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Singular pairs (columns of U m×r and V n×r) with canonical signs: the largest entry of each v positive."""
    fixed = canonical_signs(v)
    sign = torch.sign((fixed * v).sum(0))  # +1 where kept, -1 where flipped
    return u * sign, fixed
