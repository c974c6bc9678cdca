"""The sharding seam: what a part needs to sum or gather, for one process (:class:`Local`) or FSDP2 rows
(:class:`RowShard`), chosen once per parameter. Every part of a step (projector, rule, update) runs the
same code on both; on one process every sum and gather below is the identity.

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
rule state             m×r, sharded by rows like W                 r×n, sharded by columns
project, per step      local                                       Σ_k P_kᵀ G_k: all-reduce of r×n
rule                   on this rank's rows of R (a :class:`Split`  on this rank's columns of R, then an
                       along dim 0)                                all-gather of N (r×n)
project back           local                                       local (every rank holds N)
svd / rsvd refresh     Gram GᵀG = Σ_k G_kᵀ G_k: all-reduce of n×n, then eigh (exact top r; P_k = G_k V Σ⁻¹)
random refresh         nothing: every rank draws the same matrix from the shared seed
sparse refresh         all-reduce of the n column norms²       all-reduce of the m row norms²
dct refresh            all-reduce of the n ℓ1 scores of G D    refused: the scores need Dᵀ G whole
online_pca, each step  ‖G‖², n×r and r×r all-reduces           ‖G‖², n×r and r×r all-reduces
norms                  sums of squares all-reduced (APOLLO's tensor ratio, the limiter, Fira, Adafactor)
=====================  ==========================================  ==================================

A rule sees only its piece of R and of its state. An elementwise rule (Adam) runs on the piece as it is;
any other rule by default gathers the whole R and state, steps, and keeps its piece (the orthogonal
rule); a rule may instead use the :class:`Split`'s sums (Adafactor's row and column statistics).

Singular vectors have no sign of their own: every refresh, in one process or on shards, fixes each pair's
sign so that the largest entry of its right singular vector is positive (:func:`canonical_signs`), so a
run is the same run on one process, on shards and with any LAPACK.

Supported: FSDP2 (``fully_shard``) on a 1-D mesh with the default ``Shard(0)``. Refused, with an error
naming the parameter, when the optimizer is built: 2-D meshes (HSDP), other placements (tensor
parallel, ``Shard(1)``, ``Replicate``), and what a part declares it cannot do on shards (``dct`` on the
left side, LAPACK's singular-vector signs, stochastic rounding into bf16 or INT8 weights).

INT8 states and INT4 bases keep their blocks and groups inside each rank's piece; their scale vectors
(and the packed codes) are padded to the largest piece's length, so such a checkpoint resumes on the
same number of ranks (float states reshard freely).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:
    import torch.distributed as dist
except ImportError:  # a torch built without distributed support
    dist = None  # type: ignore[assignment]


def _dtensor_module() -> Any:
    """``torch.distributed.tensor`` once something has imported it, else None.

    A DTensor exists only after that module is imported (``fully_shard`` imports it), so a process that
    never imported it has none to find: ``import lowrank_optim`` does not pay the module's ~0.5 s itself."""
    return sys.modules.get("torch.distributed.tensor")

#: Bytes this process sent through the optimizer's collectives, by purpose ("project", "refresh", "norms").
COMM_BYTES: Counter[str] = Counter()


def is_sharded(t: Any) -> bool:
    module = _dtensor_module()
    return module is not None and isinstance(t, module.DTensor)


def local(t: Any) -> Any:
    """This rank's piece of a DTensor; anything else as it is."""
    return t.to_local() if is_sharded(t) else t


class Local:
    """One process: the whole tensor is here, every sum and gather is the identity."""

    whole = True
    world = 1
    rank = 0

    def all_reduce_(self, t: Tensor, purpose: str) -> Tensor:
        return t

    def all_finite(self, t: Tensor) -> bool:
        return bool(torch.isfinite(t).all())

    def all_zero(self, t: Tensor) -> bool:
        return not bool(t.any())

    def global_shape(self, t: Tensor) -> tuple[int, ...]:
        return tuple(t.shape)

    def local_rows(self, rows: int) -> tuple[int, int]:
        return 0, rows

    def cols(self, n: int) -> tuple[int, int]:
        return 0, n

    def gather(self, t: Tensor, dim: int, length: int, purpose: str) -> Tensor:
        return t

    def basis_piece(self, b: Tensor, side: str) -> Tensor:
        return b

    def wrap(self, t: Tensor, dim: int, length: int) -> Tensor:
        return t

    def split(self, side: str | None, shape: tuple[int, ...]) -> "Split":
        return Split(self, None, 0, 0, 0)


LOCAL = Local()


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
    whole = False

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def all_reduce_(self, t: Tensor, purpose: str) -> Tensor:
        """Sum ``t`` over the ranks, in place."""
        COMM_BYTES[purpose] += t.numel() * t.element_size()
        dist.all_reduce(t, group=self.group)
        return t

    def all_finite(self, t: Tensor) -> bool:
        return self._ranks_where(bool(torch.isfinite(t).all()), t.device) == self.world

    def all_zero(self, t: Tensor) -> bool:
        """Whether every rank's piece of ``t`` is zero (the same answer on every rank)."""
        return self._ranks_where(bool(t.any()), t.device) == 0

    def _ranks_where(self, holds: bool, device: torch.device) -> int:
        """How many ranks found ``holds`` true (one all-reduce)."""
        count = torch.tensor(float(holds), dtype=torch.float32, device=device)
        return int(self.all_reduce_(count, "refresh"))

    def global_shape(self, t: Tensor) -> tuple[int, ...]:
        return self.shape

    def local_rows(self, rows: int) -> tuple[int, int]:
        """This rank's rows [start, stop) of a tensor with ``rows`` rows laid out like the parameter."""
        return (self.start, self.stop) if rows == self.shape[0] else _chunk(rows, self.world, self.rank)

    def cols(self, n: int) -> tuple[int, int]:
        """This rank's columns [start, stop) of an r×n tensor kept sharded by columns (torch.chunk's layout)."""
        return _chunk(n, self.world, self.rank)

    def gather(self, t: Tensor, dim: int, length: int, purpose: str) -> Tensor:
        """All ranks' pieces of a tensor split along ``dim`` (torch.chunk's layout, ``length`` in all), in order."""
        dim = dim % t.dim()
        chunk = -(-length // self.world)
        shape = list(t.shape)
        shape[dim] = chunk
        padded = t.new_zeros(shape)
        padded.narrow(dim, 0, t.shape[dim]).copy_(t)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        COMM_BYTES[purpose] += padded.numel() * padded.element_size() * (self.world - 1)
        dist.all_gather(out, padded, group=self.group)
        return torch.cat(out, dim=dim).narrow(dim, 0, length)

    def basis_piece(self, b: Tensor, side: str) -> Tensor:
        """The basis this rank projects with: its rows of an m×r P (left side); the whole r×n Q (right),
        gathered when it is kept sharded by columns."""
        if side == "left" and b.shape[0] == self.shape[0] and self.rows != self.shape[0]:
            return b[self.start:self.stop]
        if side == "right" and b.shape[1] != self.shape[1]:
            return self.gather(b, 1, self.shape[1], "project")
        return b

    def wrap(self, t: Tensor, dim: int, length: int) -> Tensor:
        """A DTensor ``Shard(dim)`` of a tensor with ``length`` along ``dim``, from this rank's piece ``t``."""
        from torch.distributed.tensor import DTensor, Shard

        shape = list(t.shape)
        shape[dim] = length
        stride = torch.empty(shape, device="meta").stride()
        placements = self.placements if dim == 0 else (Shard(dim),)
        return DTensor.from_local(t, self.mesh, placements, run_check=False, shape=tuple(shape), stride=stride)

    def split(self, side: str | None, shape: tuple[int, ...]) -> "Split":
        """The piece of a tensor of global ``shape`` that this rank's rule steps: rows for the right side
        (and a plain parameter, ``side=None``), columns for the left side."""
        if side == "left":
            start, stop = self.cols(shape[-1])
            return Split(self, 1, start, stop, shape[-1])
        start, stop = self.local_rows(shape[0])
        return Split(self, 0, start, stop, shape[0])


def _chunk(n: int, world: int, rank: int) -> tuple[int, int]:
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


@dataclass
class Split:
    """This rank's piece of a tensor: positions [start, stop) of ``length`` along ``axis``, or the whole
    tensor (``axis`` None). Rules see their piece of R and of their state through it."""

    comm: Local | RowShard
    axis: int | None
    start: int
    stop: int
    length: int
    #: The whole tensor, where every rank holds it anyway (the left side's R): gathering it costs nothing.
    whole_value: Tensor | None = None
    #: The state keys split like the piece (the others every rank holds whole).
    pieces: frozenset[str] = frozenset()

    @property
    def whole(self) -> bool:
        return self.axis is None

    @classmethod
    def of_whole(cls) -> "Split":
        """The whole tensor on one process (a fresh object: step code sets ``pieces`` on its splits)."""
        return cls(LOCAL, None, 0, 0, 0)

    def take(self, whole: Tensor) -> Tensor:
        """This rank's piece of a whole tensor."""
        return whole if self.axis is None else whole.narrow(self.axis, self.start, self.stop - self.start)

    def gather(self, piece: Tensor, purpose: str = "rule") -> Tensor:
        """The whole tensor from every rank's piece."""
        return piece if self.axis is None else self.comm.gather(piece, self.axis, self.length, purpose)

    def gather_low(self, piece: Tensor) -> Tensor:
        """The whole low-rank tensor from this rank's piece of it (free where every rank holds it)."""
        return self.whole_value if self.whole_value is not None else self.gather(piece)

    def sum_(self, t: Tensor, purpose: str = "norms") -> Tensor:
        """Sum a statistic over the pieces (in place)."""
        return t if self.axis is None else self.comm.all_reduce_(t, purpose)

    def mean(self, x: Tensor, dim: int) -> Tensor:
        """``x.mean(dim, keepdim=True)`` of the whole tensor, where ``dim`` may be the split axis."""
        if self.axis is None or dim % x.dim() != self.axis:
            return x.mean(dim=dim, keepdim=True)
        return self.sum_(x.sum(dim=dim, keepdim=True)).div_(self.length)

    def numel(self, x: Tensor) -> int:
        """The whole tensor's number of elements, from this piece."""
        return x.numel() if self.axis is None else x.numel() // max(x.shape[self.axis], 1) * self.length


def layout_error(p: Tensor, name: str) -> str | None:
    """Why ``p`` (a DTensor) cannot be stepped, or None when it is a row shard we support."""
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1:
        return (f"parameter {name} lives on a {mesh.ndim}-D device mesh (HSDP or FSDP with tensor parallelism); "
                "lowrank-optim steps FSDP2 parameters on a 1-D mesh, sharded on dim 0 (fully_shard's default)")
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        return (f"parameter {name} is a DTensor with placements {placements}; lowrank-optim supports FSDP2's "
                "Shard(0) (rows) only, not tensor parallelism, Shard(1) or Replicate. Shard it with "
                "torch.distributed.fsdp.fully_shard and its default placement")
    return None


def comm_of(p: Tensor) -> Local | RowShard:
    """The seam for parameter ``p``: :data:`LOCAL`, or the :class:`RowShard` of a row-sharded DTensor."""
    if not is_sharded(p):
        return LOCAL
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    m = p.shape[0]
    start, stop = _chunk(m, world, rank)
    rows = p.to_local().shape[0]
    if rows != stop - start:
        raise RuntimeError(f"unexpected shard layout: {rows} local rows, expected {stop - start} (torch.chunk's)")
    return RowShard(mesh.get_group(), world, rank, start, stop, tuple(p.shape), mesh, tuple(p.placements))


def row_shard(p: Tensor) -> RowShard:
    """The :class:`RowShard` of a row-sharded DTensor parameter."""
    comm = comm_of(p)
    if not isinstance(comm, RowShard):
        raise TypeError("row_shard needs a DTensor parameter")
    return comm


def canonical_signs(v: Tensor) -> Tensor:
    """Flip each column of ``v`` so that its largest-magnitude entry is positive (ties: the first)."""
    idx = v.abs().argmax(dim=0, keepdim=True)
    sign = torch.sign(torch.gather(v, 0, idx))
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def top_right_singular(grad: Tensor, comm: Local | RowShard, rank: int) -> tuple[Tensor, Tensor]:
    """(V n×r, σ r) of the top-r singular triplets of the row-sharded G, from its Gram matrix.

    GᵀG = Σ_k G_kᵀ G_k (an n×n all-reduce, in float64), then ``eigh``; signs are canonical. Every rank
    gets the same V and σ: the same reduced input and the same deterministic eigensolver."""
    # float64: the Gram matrix squares the condition number, and an fp32 one loses the small singular
    # directions that an fp32 SVD of G keeps (ill-conditioned gradients at initialization)
    work = grad.double()
    gram = comm.all_reduce_(work.t() @ work, "refresh")
    evals, evecs = torch.linalg.eigh(gram)
    v = evecs[:, -rank:].flip(-1)
    sigma = evals[-rank:].flip(-1).clamp(min=0).sqrt()
    return canonical_signs(v), sigma
