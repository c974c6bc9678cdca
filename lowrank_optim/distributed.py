"""FSDP2 support: parameters that are DTensors sharded by rows, and what the low-rank step communicates.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a DTensor ``Shard(0)`` on a 1-D device
mesh; rank k holds rows [a_k, b_k) of W and, after the reduce-scatter, of the (averaged) gradient G, in
``torch.chunk``'s layout (ceil(m / world) rows per rank, the last ranks shorter or empty). The optimizer
keeps every piece of state that follows W's rows as a DTensor with the same placement, and nothing of
W's size is ever gathered. Per parameter and projector side (W m×n, rank r):

=====================  ==========================================  ==================================
piece                  right side, R = G Qᵀ (m×r)                    left side, R = Pᵀ G (r×n)
=====================  ==========================================  ==================================
basis                  Q r×n, sharded by columns; all-gather       P m×r, sharded by rows like W
                       of r×n when used
moments (rule state)   m×r, sharded by rows like W                 r×n, sharded by columns
project, per step      local                                       Σ_k P_kᵀ G_k: all-reduce of r×n
rule (Adam)            local                                       local on its columns, then an
                                                                   all-gather of N (r×n)
rule (orthogonal)      all-gather of R and M (m×r)                 all-gather of M (r×n)
project back           local                                       local (every rank holds N)
svd / rsvd refresh     Gram GᵀG = Σ_k G_kᵀ G_k: all-reduce of n×n, then eigh (exact top r; P_k = G_k V Σ⁻¹)
random refresh         nothing: every rank draws the same matrix from the shared seed
sparse refresh         all-reduce of the n column norms²       all-reduce of the m row norms² (each
                                                                   rank fills its rows)
dct refresh            all-reduce of the n ℓ1 scores of G D    refused: the scores need Dᵀ G whole,
                                                                   an m×n all-reduce
online_pca, each step  ‖G‖², n×r and r×r all-reduces           ‖G‖², n×r and r×r all-reduces
norms                  APOLLO's tensor-wise ratio, the limiter, Fira's residual: all-reduce of scalars;
                       channel-wise ratios are local (right side) or from the replicated R (left side)
=====================  ==========================================  ==================================

Singular vectors have no sign of their own, and the Gram matrix's eigenvectors come with other signs
than LAPACK's SVD: a refresh on shards fixes each pair's sign so that the largest entry of its right
singular vector is positive (``canonical_signs``). A single-process run with
``projector_options={"canonical_signs": True}`` picks the same basis, which is how the tests compare a
2-rank run with one process.

Supported: HF/torch FSDP2 (``fully_shard``) on a 1-D mesh with the default ``Shard(0)``. Refused, with
an error naming the parameter, when the optimizer is built: 2-D meshes (HSDP), other placements (tensor
parallel, ``Shard(1)``, ``Replicate``), and the pieces not built for shards yet (``dct`` on the left
side, stochastic rounding into bf16 or INT8 weights).

INT8 moments (``state_bits=8``) and INT4 bases (``proj_bits=4``) work on shards with their blocks and
groups of 256 inside each rank's piece; their scale vectors (and the packed codes) are padded to the
largest piece's length, so such a checkpoint resumes on the same number of ranks (float states reshard
freely: saved on 2 ranks, loaded on 1). Q-GaLore's lazy schedule takes the cosine of the top basis
vectors from three all-reduced sums on the left side.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed support
    dist = None  # type: ignore[assignment]
    DTensor = ()  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment]

#: Projectors whose refresh is built for row shards.
SHARDED_PROJECTORS = ("svd", "rsvd", "random", "sparse", "dct", "online_pca")

#: Bytes this process sent through the optimizer's collectives, by purpose ("project", "refresh", "norms").
COMM_BYTES: Counter[str] = Counter()


def is_sharded(t: Any) -> bool:
    return isinstance(t, DTensor) if DTensor else False


@dataclass(frozen=True)
class RowShard:
    """Where this rank's rows of a row-sharded m×n parameter lie, and the group to reduce over."""

    group: Any
    world: int
    rank: int
    start: int
    stop: int
    shape: tuple[int, ...]
    mesh: Any
    placements: tuple[Any, ...]

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def all_reduce_(self, t: Tensor, purpose: str) -> Tensor:
        """Sum ``t`` over the ranks, in place."""
        COMM_BYTES[purpose] += t.numel() * t.element_size()
        dist.all_reduce(t, group=self.group)
        return t

    def cols(self, n: int) -> tuple[int, int]:
        """This rank's columns [start, stop) of an r×n tensor kept sharded by columns (torch.chunk's layout)."""
        chunk = -(-n // self.world)
        start = min(self.rank * chunk, n)
        return start, min(start + chunk, n)

    def wrap_cols(self, local: Tensor, n: int) -> Tensor:
        """A DTensor ``Shard(1)`` of an r×n tensor from this rank's columns."""
        shape = (*local.shape[:-1], n)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, (Shard(1),), run_check=False, shape=shape, stride=stride)

    def gather_cols(self, local: Tensor, n: int, purpose: str) -> Tensor:
        """All ranks' columns of an r×n tensor kept sharded by columns, in order (an all-gather)."""
        chunk = -(-n // self.world)
        padded = local.new_zeros((*local.shape[:-1], chunk))
        padded[..., : local.shape[-1]] = local
        out = [torch.empty_like(padded) for _ in range(self.world)]
        COMM_BYTES[purpose] += padded.numel() * padded.element_size() * (self.world - 1)
        dist.all_gather(out, padded.contiguous(), group=self.group)
        return torch.cat(out, dim=-1)[..., :n]

    def wrap(self, local: Tensor, global_rows: int) -> Tensor:
        """A DTensor sharded like the parameter by rows, from this rank's rows ``local``."""
        shape = (global_rows, *local.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=shape, stride=stride)


def layout_error(p: Tensor, name: str) -> str | None:
    """Why ``p`` (a DTensor) cannot be stepped, or None when it is a row shard we support."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1:
        return (f"parameter {name} lives on a {mesh.ndim}-D device mesh (HSDP or FSDP with tensor parallelism); "
                "lowrank-optim steps FSDP2 parameters on a 1-D mesh, sharded on dim 0 (fully_shard's default)")
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        return (f"parameter {name} is a DTensor with placements {placements}; lowrank-optim supports FSDP2's "
                "Shard(0) (rows) only, not tensor parallelism, Shard(1) or Replicate. Shard it with "
                "torch.distributed.fsdp.fully_shard and its default placement")
    return None


def row_shard(p: Tensor) -> RowShard:
    """The :class:`RowShard` of a row-sharded DTensor parameter (its layout checked by :func:`layout_error`)."""
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    m = p.shape[0]
    chunk = -(-m // world)
    start = min(rank * chunk, m)
    stop = min(start + chunk, m)
    local = p.to_local().shape[0]
    if local != stop - start:
        raise RuntimeError(f"unexpected shard layout: {local} local rows, expected {stop - start} (torch.chunk's)")
    return RowShard(mesh.get_group(), world, rank, start, stop, tuple(p.shape), mesh, tuple(p.placements))


def top_right_singular(grad: Tensor, shard: RowShard, rank: int) -> tuple[Tensor, Tensor]:
    """(V n×r, σ r) of the top-r singular triplets of the row-sharded G, from its Gram matrix.

    GᵀG = Σ_k G_kᵀ G_k (an n×n all-reduce, in float64), then ``eigh``; signs are
    canonical (:func:`canonical_signs`). Every rank gets the same V and σ: the same reduced input and
    the same deterministic eigensolver."""
    # float64: the Gram matrix squares the condition number, and an fp32 one loses the small singular
    # directions that an fp32 SVD of G keeps (ill-conditioned gradients at initialization)
    work = grad.double()
    gram = work.t() @ work
    shard.all_reduce_(gram, "refresh")
    evals, evecs = torch.linalg.eigh(gram)
    v = evecs[:, -rank:].flip(-1)
    sigma = evals[-rank:].flip(-1).clamp(min=0).sqrt()
    return canonical_signs(v), sigma


def canonical_signs(v: Tensor) -> Tensor:
    """Flip each column of ``v`` so that its largest-magnitude entry is positive (ties: the first)."""
    idx = v.abs().argmax(dim=0, keepdim=True)
    sign = torch.sign(torch.gather(v, 0, idx))
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def refresh_sharded(proj: Any, grad: Tensor, shard: RowShard) -> Any:
    """A new projector refreshed from this rank's rows ``grad`` of a row-sharded gradient; ``proj`` is
    left untouched (as :meth:`Projector.refreshed`). The basis it keeps: Q (r×n, replicated) on the
    right side, this rank's rows of P on the left."""
    import copy

    from .projectors.base import NonFiniteGradientError, choose_side

    finite = torch.tensor(float(bool(torch.isfinite(grad).all())), dtype=torch.float32, device=grad.device)
    shard.all_reduce_(finite, "refresh")
    if float(finite) != shard.world:
        raise NonFiniteGradientError("non-finite values (inf or NaN) in the gradient the subspace would be refreshed from")
    new = copy.copy(proj)
    new._state = dict(proj._state)
    side = new.side or choose_side(shard.shape, new.proj_type)
    m, n = shard.shape
    d = m if side == "left" else n
    if new.name in ("sparse", "dct") and new.rank > d:
        raise ValueError(f"{new.name} projector of rank {new.rank} cannot select from {d} {'rows' if side == 'left' else 'columns'}")
    if new.name == "random":
        new._refresh(torch.empty(shard.shape, device="meta"), side)
    elif new.name == "online_pca" and "P" in new._state:
        _online_pca_step(new, grad, shard, side)
    elif new.name in ("sparse", "dct"):
        work = grad.double() if grad.dtype == torch.float64 else grad.float()
        if new.name == "sparse" and side == "right":
            scores = work.square().sum(dim=0)  # ‖G[:, j]‖², summed over the ranks' rows
        elif new.name == "sparse":
            scores = work.new_zeros(m)
            scores[shard.start:shard.stop] = work.square().sum(dim=1)  # each rank fills its rows
        else:  # dct, right side: ℓ1 scores of the columns of G D, summed over the ranks' rows
            from .projectors.dct import dct_basis

            scores = (work @ dct_basis(n, work.dtype, work.device)).abs().sum(dim=0)
        shard.all_reduce_(scores, "refresh")
        new._state["idx"] = torch.topk(scores, new.rank, sorted=False).indices.sort().values
        new._state["dim"] = d
        new._seen_dtype = grad.dtype
    else:
        if new.rank > min(m, n):
            raise ValueError(f"{new.name} projector of rank {new.rank} cannot refresh from a {m}x{n} matrix")
        v, sigma = top_right_singular(grad, shard, new.rank)
        if side == "right":
            start, stop = shard.cols(n)
            basis = v.t()[:, start:stop]  # Q is kept sharded by columns, gathered when used
        else:
            basis = (grad.double() @ v) / sigma.clamp(min=torch.finfo(sigma.dtype).tiny)
        new._store_basis(basis.to(grad.dtype).contiguous())
        if "refreshes" in new._state or new.name == "rsvd":
            new._state["refreshes"] = int(new._state.get("refreshes", 0)) + 1
    new._state["side"] = side
    return new


def _online_pca_step(proj: Any, grad: Tensor, shard: RowShard, side: str) -> None:
    """Online PCA's step on P (``lro.projectors.online_pca``) from row shards of G: the products that
    run over W's rows are all-reduced (‖G‖², then n×r or r×r), the rest stays local."""
    m, n = shard.shape
    work = grad.double() if grad.dtype == torch.float64 else grad.float()
    stored = proj._state["P"].to(work.dtype)
    norm_sq = work.square().sum()
    shard.all_reduce_(norm_sq, "refresh")
    inv_norm = 1.0 / norm_sq.sqrt().clamp_min(torch.finfo(work.dtype).tiny)
    eye = torch.eye(proj.rank, dtype=work.dtype, device=work.device)
    if side == "left":  # x = G (rows here), p = P (rows here)
        p = stored
        w = shard.all_reduce_(work.t() @ p, "refresh") * inv_norm  # n×r
        ap = (work @ w) * inv_norm  # this rank's rows
        gram = shard.all_reduce_(p.t() @ p, "refresh")
        new = p - (2 * proj.lr) * (ap @ (gram - 2 * eye) + p @ (w.t() @ w))
    else:  # x = Gᵀ, p = Qᵀ (n×r, gathered from its column pieces)
        p = shard.gather_cols(stored, n, "refresh").t()
        w = (work @ p) * inv_norm  # this rank's rows of G Qᵀ / ‖G‖
        ap = shard.all_reduce_(work.t() @ w, "refresh") * inv_norm  # n×r
        wtw = shard.all_reduce_(w.t() @ w, "refresh")
        full = p - (2 * proj.lr) * (ap @ (p.t() @ p - 2 * eye) + p @ wtw)
        start, stop = shard.cols(n)
        new = full.t()[:, start:stop]
    proj._state["P"] = new.to(proj.basis_dtype(grad.dtype), copy=True, memory_format=torch.contiguous_format)


def local_basis(proj: Any, shard: RowShard, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The basis this rank projects with: Q (r×n) on the right side; this rank's rows of P on the left
    (dense projectors keep only those; ``random`` draws the whole m×r and keeps its rows)."""
    b = proj.basis(device=device, dtype=dtype)
    if proj.side == "left" and b.shape[0] == shard.shape[0] and shard.rows != shard.shape[0]:
        b = b[shard.start:shard.stop]
    if proj.side == "right" and b.shape[1] != shard.shape[1]:
        b = shard.gather_cols(b, shard.shape[1], "project")
    return b
