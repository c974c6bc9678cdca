"""The projector interface every low-rank method shares.

A projector maps an m×n gradient G into a low-rank tensor and back:

* ``left``  side: R = Pᵀ G   (P is m×r, R is r×n)
* ``right`` side: R = G Qᵀ   (Q is r×n, R is m×r)

``proj_type`` picks the side from the shape, with galore-torch's names:

=============  ===================  ==================
proj_type      m >= n               m < n
=============  ===================  ==================
``std``        right (Q is r×n)     left (P is m×r)
``reverse_std`` left (P is m×r)     right (Q is r×n)
``left``       left                 left
``right``      right                right
=============  ===================  ==================

So ``std`` keeps the projection matrix on the *short* side (r × min(m, n) floats) and moments of
max(m, n) × r; ``reverse_std`` keeps the smallest moments (r × min(m, n)) and a larger basis.

The side is fixed when the projector first sees a gradient and is stored in its state, so
``project_back`` never guesses it from the low-rank tensor's shape (galore-torch does, which
breaks when the rank equals the short side).

*When* to call :meth:`Projector.update` is the optimizer's policy, not the projector's.

**Shards.** A projector is bound to its parameter's seam (``comm``: :data:`lowrank_optim.distributed.LOCAL`,
or the FSDP2 :class:`~lowrank_optim.distributed.RowShard`). The dense maps below then use this rank's
piece of the basis (its rows of P; the whole Q), sum Pᵀ G over the ranks, and a refresh runs
:meth:`Projector._refresh_sharded` from this rank's rows of G: a projector that can be refreshed on
shards overrides it (the Gram matrix for ``svd``, column scores for ``sparse``, ...), and
:meth:`Projector.shard_error` says why one cannot.
Implementations must *rebind* their state tensors in ``update`` rather than write into them, so that
:meth:`Projector.refreshed` can build the refreshed projector from a shallow copy while the old one
stays valid until the optimizer commits the step.
"""

from __future__ import annotations

import abc
import copy
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..distributed import LOCAL, Local, RowShard, local

PROJ_TYPES = ("std", "reverse_std", "left", "right")
SIDES = ("left", "right")
#: A basis whose Gram matrix Γ has ‖Γ − I‖_F at most this counts as orthonormal (:meth:`Projector.basis_gram`)
#: where an update can take Γ = I (Fira's limiter norm): then |xᵀΓx − ‖x‖²| ≤ 1e-3·‖x‖² for every x
#: (‖·‖₂ ≤ ‖·‖_F). A float32 SVD or eigh basis measures 1.4–3.2e-5 (LLaMA shapes up to 4096×1024, ranks 128
#: and 256; about the rounding of Γ itself in float32), so it passes with room at 7B ranks; a bfloat16 basis
#: (~1e-2 per entry) or a Gaussian sketch does not.
NEAR_IDENTITY = 1e-3


class NonFiniteGradientError(FloatingPointError):
    """A gradient that a projector must be refreshed from holds inf or NaN."""


def choose_side(shape: tuple[int, ...] | torch.Size, proj_type: str) -> str:
    """Which side to project for an m×n matrix under ``proj_type`` (see the module docstring)."""
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def check_index_state(name: str, state: dict[str, Any], rank: int, repeats: bool = False) -> None:
    """Validate a selection projector's state: ``dim`` (the projected side's length) and ``idx``,
    ``rank`` strictly increasing int64 indices into it (non-decreasing with ``repeats``: a draw with
    replacement may pick an index twice)."""
    idx, dim = state.get("idx"), state.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < rank:
        raise ValueError(f"{name} projector state needs an integer 'dim' >= rank {rank}, got {dim!r}")
    if not isinstance(idx, Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(f"{name} projector state needs a 1-D int64 tensor 'idx'")
    if idx.numel() != rank:
        raise ValueError(f"{name} projector state holds {idx.numel()} indices but this projector has rank {rank}")
    unordered = (idx[1:] < idx[:-1]) if repeats else (idx[1:] <= idx[:-1])
    if bool((idx < 0).any()) or bool((idx >= dim).any()) or bool(unordered.any()):
        order = "non-decreasing" if repeats else "strictly increasing"
        raise ValueError(f"{name} projector state 'idx' must be {order} indices in [0, {dim})")


def check_rank(rank: Any, owner: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{owner} must be an integer >= 1, got {rank!r}")
    return rank


class Projector(abc.ABC):
    """Base class: a low-rank subspace of an m×n matrix, refreshed from gradients.

    Subclasses set ``name`` and implement :meth:`_refresh`, :meth:`project`,
    :meth:`project_back` (and may override :meth:`apply_back` with a fused kernel).
    All persistent state lives in ``self._state`` as tensors and plain values.
    """

    name: ClassVar[str] = ""
    #: True for projectors that move their subspace a little every step (online PCA): the optimizer
    #: then calls :meth:`update` at every step, and ``update_proj_gap`` is theirs to interpret.
    refresh_every_step: ClassVar[bool] = False
    #: Whether ``basis()`` has orthonormal columns (left) / rows (right), so that
    #: G − project_back(project(G)) is the part of G outside the subspace. A method that uses that
    #: residual (FRUGAL, Fira) refuses a projector without it.
    orthonormal: ClassVar[bool] = True
    #: True for a subspace that never changes once built (haar): the optimizer refreshes it at the
    #: first step only, whatever ``update_proj_gap`` and ``on_refresh`` say.
    fixed: ClassVar[bool] = False
    #: True for projectors whose refresh reads the rule's first moment M (COAP's correlation term): the
    #: optimizer then passes it to :meth:`refreshed` (the rule's ``first_moment`` key, as a float tensor
    #: shaped like R in the old subspace's coordinates; None at the first refresh or for a rule without one).
    #: It is read only: under float storage it is the rule's own tensor.
    reads_moment: ClassVar[bool] = False
    #: True for projectors that learn their basis *after* a step has used it (Online Subspace Descent): the
    #: optimizer builds the subspace with :meth:`refreshed` at the first step only, and after every later
    #: step has applied its update it replaces the projector by :meth:`learned` from that step's gradient.
    learns_after_use: ClassVar[bool] = False
    #: Whether the subspace is built from the gradient (False: drawn from a seed, or fixed). For those that
    #: are, an all-zero gradient says nothing about where the next ones lie: the optimizer does not renew
    #: the subspace from one, and tries again at the next step (``optim.step._refresh``).
    reads_gradient: ClassVar[bool] = True

    def __init__(self, rank: int, proj_type: str = "std", seed: int = 0) -> None:
        """``seed`` is where projectors that draw random matrices start (``random``, ``rsvd``): the
        optimizer gives each parameter its own, the same on every rank. Others ignore it."""
        self.rank = check_rank(rank)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed
        if proj_type not in PROJ_TYPES:
            raise ValueError(
                f"proj_type must be one of {', '.join(PROJ_TYPES)}, got {proj_type!r}"
            )
        self.proj_type = proj_type
        self._state: dict[str, Any] = {}
        #: The seam the maps and refreshes use: LOCAL, or an FSDP2 RowShard (see :meth:`bind`).
        self.comm: Local | RowShard = LOCAL

    def bind(self, comm: Local | RowShard) -> "Projector":
        """Use ``comm`` for the parameter this projector serves (its rows on FSDP2); returns self."""
        self.comm = comm
        return self

    @classmethod
    def orthonormal_with(cls, options: dict[str, Any]) -> bool:
        """Whether this projector, built with these constructor options, has an orthonormal basis (see
        ``orthonormal``; the default ignores the options)."""
        return cls.orthonormal

    @classmethod
    def shard_error(cls, side: str, options: dict[str, Any]) -> str | None:
        """Why this projector cannot serve an FSDP2 row shard on ``side`` with these constructor options
        (None: it can)."""
        if cls._refresh_sharded is Projector._refresh_sharded:
            return f"projector={cls.name!r} (it has no refresh on row shards)"
        return None

    # ----------------------------------------------------------------- state
    @property
    def side(self) -> str | None:
        """``"left"`` or ``"right"`` once the projector has seen a gradient, else ``None``."""
        return self._state.get("side")

    @property
    def initialized(self) -> bool:
        return "side" in self._state

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: loadable with ``torch.load(weights_only=True)``."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__}.load_state_dict expects a dict, got {type(state).__name__}")
        if state:
            side = state.get("side")
            if side not in SIDES:
                raise ValueError(
                    f"{type(self).__name__} state has side={side!r}; expected one of {SIDES}"
                )
            self._check_state(state)
        self._state = dict(state)

    def _check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError when a loaded state does not fit this projector's configuration."""

    def check_fits(self, shape: tuple[int, int] | torch.Size) -> None:
        """Raise ValueError when the (loaded) state cannot project an m×n matrix of ``shape``.

        The default checks the ``dim`` entry that projectors without a stored matrix keep (the
        length of the projected side: m for the left side, n for the right)."""
        dim = self._state.get("dim")
        if dim is None:
            return
        m, n = shape
        want = m if self.side == "left" else n
        if dim != want:
            raise ValueError(
                f"{self.name} projector was built for a projected side of length {dim}, but the "
                f"{self.side} side of a {m}x{n} matrix has length {want}"
            )

    def nbytes(self) -> int:
        """Bytes this projector keeps between steps."""
        return sum(v.numel() * v.element_size() for v in self._state.values() if isinstance(v, Tensor))

    # ----------------------------------------------------------------- refresh
    def update(self, grad: Tensor, moment: Tensor | None = None) -> None:
        """Refresh the subspace from ``grad`` (an m×n matrix with finite values; on shards this rank's rows);
        ``moment`` is the rule's first moment for projectors that read it (``reads_moment``), else ignored."""
        if grad.dim() != 2:
            raise ValueError(f"{type(self).__name__} projects 2-D matrices, got shape {tuple(grad.shape)}")
        if not self.comm.all_finite(grad):
            raise NonFiniteGradientError(
                "non-finite values (inf or NaN) in the gradient the subspace would be refreshed from"
            )
        side = self.side or choose_side(self.comm.global_shape(grad), self.proj_type)
        if self.comm.whole:
            self._refresh_from(grad, side, moment)
        else:
            self._refresh_sharded(grad, side)
        self._state["side"] = side

    def _refresh_from(self, grad: Tensor, side: str, moment: Tensor | None) -> None:
        """:meth:`_refresh`, given also the rule's first moment (see ``reads_moment``); the default ignores it."""
        self._refresh(grad, side)

    def _refresh_sharded(self, grad: Tensor, side: str) -> None:
        """:meth:`_refresh` from this rank's rows of a row-sharded gradient (``self.comm`` sums over the
        ranks); every rank must end with the same subspace. Projectors that support FSDP2 override it."""
        raise TypeError(self.shard_error(side, {}) or f"{self.name} cannot refresh on shards")

    def export_state(self) -> dict[str, Any]:
        """The state as ``optimizer.state`` keeps it: on shards, entries split by rows or columns become
        DTensors (so distributed checkpoints hold every rank's piece). The default: :meth:`state_dict`."""
        return self.state_dict()

    def import_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`export_state`: this rank's piece of a saved state, to ``load_state_dict``."""
        return {k: local(v) for k, v in saved.items()}

    def allocate(self, shape: tuple[int, int] | torch.Size, dtype: torch.dtype, device: torch.device | str) -> None:
        """Create the state a refresh from an m×n gradient of ``dtype`` on ``device`` would keep,
        with placeholder values and without computing anything (works on the meta device).

        For memory reports and eagerly built optimizer state; the optimizer never projects with
        placeholders: a parameter's first step starts from a fresh projector.
        """
        side = self.side or choose_side(shape, self.proj_type)
        self._state = {**self._placeholder(tuple(shape), side, dtype, torch.device(device)), "side": side}

    def local_basis(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """The basis this rank projects with: :meth:`basis`, or its piece of it on shards (this rank's
        rows of P on the left side, the whole Q on the right)."""
        return self.comm.basis_piece(self.basis(device=device, dtype=dtype), self.side)

    def basis_gram(self, device: torch.device | str, dtype: torch.dtype) -> tuple[Tensor, bool]:
        """The Gram matrix Γ of the basis project_back uses (Bᵀ B for the left side's m×r B, summed over the
        ranks that hold its rows; B Bᵀ for the right side's r×n), and whether it is the identity to within
        :data:`NEAR_IDENTITY` (‖Γ − I‖_F). Computed once per basis: cached on this projector until any entry
        of its state changes (a refresh, a learning step, a load), the same on every rank."""
        key = (tuple((k, id(v), v._version) if isinstance(v, Tensor) else (k, v) for k, v in self._state.items()),
               torch.device(device), dtype, id(self.comm))
        cached = self.__dict__.get("_gram_cache")
        if cached is not None and cached[0] == key:
            return cached[2]
        b = self.local_basis(device, dtype)
        gram = b.t() @ b if self.side == "left" else b @ b.t()
        if self.side == "left" and not self.comm.whole:
            gram = self.comm.all_reduce_(gram, "norms")
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        out = gram, bool(torch.linalg.matrix_norm(gram - eye) <= NEAR_IDENTITY)
        # the state's tensors ride along so that their ids stay theirs while the key holds them
        self.__dict__["_gram_cache"] = (key, list(self._state.values()), out)
        return out

    @abc.abstractmethod
    def _placeholder(self, shape: tuple[int, int], side: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """The state entries (besides ``side``) that :meth:`_refresh` would set, as placeholders."""

    def refreshed(self, grad: Tensor, moment: Tensor | None = None) -> "Projector":
        """A new projector refreshed from ``grad`` (and ``moment``, see :meth:`update`); ``self`` is left untouched."""
        new = copy.copy(self)
        new._state = dict(self._state)
        new.update(grad, moment)
        return new

    def learned(self, grad: Tensor, lr_ratio: float = 1.0) -> "Projector":
        """For ``learns_after_use`` projectors: a new one moved by ``grad``, the gradient this one was just
        used on (``lr_ratio``: the weight lr's schedule, lr_t / lr_0); ``self`` is left untouched."""
        raise TypeError(f"projector {self.name!r} does not learn after use (learns_after_use is False)")

    @classmethod
    def options_from_group(cls, group: dict[str, Any]) -> dict[str, Any]:
        """Constructor options this projector derives from a param group (besides rank, proj_type
        and seed), e.g. online PCA's step size from ``update_proj_gap``. None by default."""
        return {}

    @abc.abstractmethod
    def _refresh(self, grad: Tensor, side: str) -> None:
        """Recompute the subspace from ``grad`` for the given side (rebind, never write in place)."""

    # ----------------------------------------------------------------- maps
    @abc.abstractmethod
    def basis(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """The subspace as a dense matrix: m×r (left side) or r×n (right side).

        On ``device`` and in ``dtype`` when given (projectors that keep no matrix, like ``random``,
        build it there), else where and how the projector keeps or last used it.

        ``project`` is ``basis()ᵀ G`` or ``G basis()ᵀ`` for every projector whose basis is
        orthonormal; the ``rotate`` refresh policy maps moments between two bases with it.
        """

    # The maps below are the dense-basis ones (R = Bᵀ G or G Bᵀ); a projector with a cheaper form
    # (sparse: a gather and a scatter) overrides them.
    def project(self, grad: Tensor) -> Tensor:
        """m×n → r×n (left) or m×r (right), in the gradient's dtype. On shards: Σ_k P_kᵀ G_k over the
        ranks (in float32 at least), or this rank's rows of G Qᵀ."""
        b = self.local_basis(grad.device, grad.dtype)
        if self.side != "left":
            return grad @ b.t()
        low = b.t() @ grad
        if self.comm.whole:
            return low
        return self.comm.all_reduce_(low.to(torch.promote_types(low.dtype, torch.float32)), "project")

    def project_back(self, low: Tensor) -> Tensor:
        """The inverse map of :meth:`project`, times nothing else (this rank's rows on shards)."""
        b = self.local_basis(low.device, low.dtype)
        return b @ low if self.side == "left" else low @ b

    def residual(self, grad: Tensor, low: Tensor) -> Tensor:
        """G − project_back(low) in ``low``'s dtype, as one fused ``addmm`` (no m×n temporary beside it)."""
        b = self.local_basis(low.device, low.dtype)
        g = grad.to(low.dtype)
        return torch.addmm(g, b, low, alpha=-1.0) if self.side == "left" else torch.addmm(g, low, b, alpha=-1.0)

    def apply_back(self, weight: Tensor, low: Tensor, alpha: float, beta: float = 1.0) -> None:
        """In place: ``weight ← beta·weight + alpha·project_back(low)``, as one ``addmm_``: no m×n
        temporary, and one rounding into the weight's dtype."""
        b = self.local_basis(weight.device, weight.dtype)
        low = low.to(weight.dtype)
        if self.side == "left":
            weight.addmm_(b, low, beta=beta, alpha=alpha)
        else:
            weight.addmm_(low, b, beta=beta, alpha=alpha)

    def low_rank_shape(self, shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
        """Shape of :meth:`project`'s output for an m×n input."""
        m, n = shape
        side = self.side or choose_side(shape, self.proj_type)
        return (self.rank, n) if side == "left" else (m, self.rank)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, proj_type={self.proj_type!r}, side={self.side!r})"

