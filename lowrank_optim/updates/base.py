"""The update interface: what a low-rank step adds to the weight, from W, G, R and N, and its registry.

After the rule has turned R = project(G) into N, an update writes the step into W (one rank's rows on
FSDP2 shards), with decoupled weight decay ``W ← (1 − lr·wd)·W``. Two group keys choose one:

* ``residual=`` (``kind = "residual"``): what happens to the part of G the subspace misses,
  G − project_back(R): ``drop`` (GaLore), ``sign`` / ``sgd`` (FRUGAL), ``fira`` (Fira);
* ``scaling=`` (``kind = "scaling"``): instead of project_back(N), the raw gradient scaled by what Adam
  did in the subspace: ``channel`` / ``tensor`` (APOLLO, APOLLO-Mini). A scaling leaves no residual, so it
  needs ``residual="drop"``.

An update declares its state like a rule does (``keys`` and ``init``); the norm-growth limiter
(:class:`Limiter`, ``limiter=γ``) is one shared piece that updates with ``limited = True`` apply to their
full-rank term, keeping one scalar, ``limiter_norm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..distributed import Local, RowShard, Split
from ..reductions import norms
from ..projectors import Projector

KINDS = ("residual", "scaling")


@dataclass
class Context:
    """One parameter's step, as an update sees it. On FSDP2 shards ``weight`` and ``grad`` are this rank's
    rows; ``low`` (R) and ``direction`` (N) are whole on the left side and this rank's rows on the right."""

    weight: Tensor
    grad: Tensor
    low: Tensor
    direction: Tensor
    state: dict[str, Any]
    group: dict[str, Any]
    projector: Projector
    comm: Local | RowShard
    split: Split

    @property
    def lr(self) -> float:
        return float(self.group["lr"])

    @property
    def scale(self) -> float:
        return float(self.group["scale"])

    @property
    def decay(self) -> float:
        return 1.0 - self.lr * float(self.group["weight_decay"])

    @property
    def side(self) -> str:
        return self.projector.side

    def apply_back(self, low: Tensor, alpha: float, beta: float) -> None:
        """W ← β·W + α·project_back(low), in one fused ``addmm_``."""
        self.projector.apply_back(self.weight, low, alpha=alpha, beta=beta)

    def residual(self) -> Tensor:
        """G − project_back(R), in R's dtype (a fresh tensor of W's local shape)."""
        return self.projector.residual(self.grad, self.low)

    def norm(self, x: Tensor, *, rows: str | None = None, dim: int | None = None,
             dtype: torch.dtype | None = None) -> Tensor:
        """The 2-norm of ``x`` (along ``dim``, kept) where its rows may be split over the ranks: ``rows=
        "weight"`` for a tensor of W's rows, ``"low"`` for one of R's rows, None for a whole tensor."""
        if rows == "weight":
            total = None if self.comm.whole else self.comm
        elif rows == "low":
            total = None if self.split.whole or self.split.axis != 0 else self.comm
        else:
            total = None
        return norm(x, total, dim, dtype)


def norm(x: Tensor, total: Local | RowShard | None, dim: int | None = None,
         dtype: torch.dtype | None = None) -> Tensor:
    """The 2-norm of ``x`` (along ``dim``, kept), or, with ``total``, of the tensor whose rows the ranks
    hold: the squares summed locally, summed over the ranks, then the root."""
    if total is None:
        return x.norm(dtype=dtype) if dim is None else norms(x, dim, dtype)
    sq = x.to(dtype or x.dtype).square()
    sq = sq.sum() if dim is None else sq.sum(dim=dim, keepdim=True)
    return total.all_reduce_(sq, "norms").sqrt_()


class Limiter:
    """The norm-growth limiter (APOLLO, Fira): a factor 1, or γ‖U_{t−1}‖/‖U_t‖ when ‖U_t‖ > γ‖U_{t−1}‖.

    ``state["limiter_norm"]`` keeps ‖U_t‖ after limiting, one scalar per parameter (NaN: no previous
    step). 1e-8 guards the division, as both reference packages write it. Tensor arithmetic: no sync."""

    key = "limiter_norm"

    @staticmethod
    def init(low: Tensor) -> dict[str, Tensor]:
        return {Limiter.key: torch.full((), float("nan"), dtype=low.dtype, device=low.device)}

    @staticmethod
    def factor(norm: Tensor, state: dict[str, Any], gamma: float) -> Tensor:
        prev = state.get(Limiter.key)
        if prev is None:
            factor = torch.ones_like(norm)
        else:
            prev = prev.to(norm)
            factor = gamma / torch.clamp(norm / (prev + 1e-8), min=gamma)
            factor = torch.where(torch.isnan(prev), torch.ones_like(factor), factor)
        if isinstance(state.get(Limiter.key), Tensor) and state[Limiter.key].shape == norm.shape:
            state[Limiter.key].copy_(norm * factor)
        else:
            state[Limiter.key] = norm * factor
        return factor


class Update:
    """Base class of the updates (see the module docstring)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "residual"
    #: State it keeps (besides the limiter's, which ``limited`` brings).
    keys: ClassVar[tuple[str, ...]] = ()
    #: Whether the norm-growth limiter applies to its full-rank term (``limiter=γ``).
    limited: ClassVar[bool] = False
    #: Whether it uses G − project_back(R), which needs an orthonormal basis.
    uses_residual: ClassVar[bool] = False
    #: Group keys it reads, with their defaults.
    defaults: ClassVar[dict[str, Any]] = {}

    def init(self, low: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Its state for a parameter whose low-rank tensor is like ``low``."""
        return Limiter.init(low) if self.limited and group["limiter"] is not None else {}

    def check(self, group: dict[str, Any], fail: Any) -> None:
        """Validate its own group keys; ``fail(key, why)`` raises."""

    def kept_bytes(self, projector: Projector, group: dict[str, Any], p: Tensor) -> int:
        """Bytes this update keeps between steps for ``p`` outside the state: none by default. Fira's limiter
        and error feedback keep the basis' r×r Gram matrix (:meth:`Projector.basis_gram`'s cache)."""
        return 0

    def adamw_rms_keys(self, group: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        """Group keys that ``match_adamw_rms=True`` sets for a projected group, besides ``scale``, so that
        this update's own term has the RMS of an AdamW update; keys in ``explicit`` (given by the user,
        to the group or the constructor) are left as given. None by default."""
        return {}

    # Updates that keep a buffer shaped like the weight (error feedback) override the three below.
    def prepare(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """The gradient the projector refreshes from and projects, and that ``apply`` sees as ``ctx.grad``:
        G itself by default (error feedback: G + E). Reads the state, writes nothing (the plan may still fail)."""
        return grad

    def init_rows(self, rows: Tensor, comm: Local | RowShard, group: dict[str, Any]) -> dict[str, Any]:
        """Its state shaped like this rank's rows of G (``rows`` is like them), wrapped for shards; none by default."""
        return {}

    def shard_error(self, group: dict[str, Any]) -> str | None:
        """Why these options cannot serve an FSDP2 row shard (None: they can)."""
        return None

    def apply(self, ctx: Context) -> None:
        """Write the step into ``ctx.weight``."""
        raise TypeError(f"update {self.name!r} defines no apply(ctx)")

    def limit(self, ctx: Context, norm: Tensor) -> Tensor | None:
        """The limiter's factor for a full-rank term of norm ``norm`` (None: no limiter in this group)."""
        gamma = ctx.group["limiter"]
        return None if gamma is None or not self.limited else Limiter.factor(norm, ctx.state, float(gamma))

    def __repr__(self) -> str:
        return f"<update {self.name!r}>"


REGISTRY: dict[str, Update] = {}


def register(cls: type[Update]) -> type[Update]:
    """Add an :class:`Update` subclass to the registry under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Update)):
        raise TypeError(f"register expects an Update subclass, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")
    if cls.name in REGISTRY and type(REGISTRY[cls.name]) is not cls:
        raise ValueError(f"an update named {cls.name!r} is already registered ({type(REGISTRY[cls.name]).__name__})")
    REGISTRY[cls.name] = cls()
    return cls


def available(kind: str) -> list[str]:
    """The registered updates of ``kind`` (``"residual"`` or ``"scaling"``)."""
    return [name for name, u in REGISTRY.items() if u.kind == kind]


def basis_gram_bytes(projector: Projector, p: Tensor) -> int:
    """The bytes of :meth:`Projector.basis_gram`'s cached r×r matrix (float64 for float64 weights)."""
    return projector.rank * projector.rank * (8 if p.dtype == torch.float64 else 4)


def for_group(group: dict[str, Any]) -> Update:
    """The update a group's ``residual`` and ``scaling`` keys choose."""
    return REGISTRY[group["scaling"]] if group["scaling"] is not None else REGISTRY[group["residual"]]


def sqrt_scale(group: dict[str, Any]) -> float:
    return math.sqrt(float(group["scale"]))
