"""Projectors by name: ``make(name, rank, **kw)`` and a registry that new projectors join.

>>> import lowrank_optim as lro
>>> proj = lro.projectors.make("svd", rank=4)
"""

from __future__ import annotations

from typing import Any

from .base import PROJ_TYPES, NonFiniteGradientError, Projector, choose_side
from .dct import DCTProjector
from .online_pca import OnlinePCAProjector
from .random_proj import RandomProjector
from .rsvd import RSVDProjector
from .sparse import SparseProjector
from .svd import SVDProjector

REGISTRY: dict[str, type[Projector]] = {}


def register(cls: type[Projector]) -> type[Projector]:
    """Add a Projector subclass to the registry under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Projector)):
        raise TypeError(f"register expects a Projector subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"a projector named {cls.name!r} is already registered ({REGISTRY[cls.name].__name__})")
    REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(REGISTRY)


def make(name: str, rank: int, **kw: Any) -> Projector:
    """Build the projector registered as ``name`` with the given rank and options."""
    try:
        cls = REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown projector {name!r}; available: {', '.join(available())}"
        ) from None
    return cls(rank, **kw)


for _cls in (SVDProjector, RSVDProjector, DCTProjector, RandomProjector, SparseProjector, OnlinePCAProjector):
    register(_cls)
del _cls

# COAP (correlation-aware SGD steps on P, occasional warm-started re-SVD) and Haar (GWT's fixed basis)
from .coap import COAPProjector
from .haar import HaarProjector

register(COAPProjector)
register(HaarProjector)

# GoLore: a random orthonormal (Stiefel) basis, and the schedule that switches to it late in training
from .golore import GoLoreProjector, StiefelProjector

register(StiefelProjector)
register(GoLoreProjector)

# GaLore+: one head's randomized-SVD basis shared by every head of an attention weight
from .heads import SharedHeadProjector, split_head_groups

register(SharedHeadProjector)

__all__ = [
    "PROJ_TYPES",
    "REGISTRY",
    "COAPProjector",
    "DCTProjector",
    "GoLoreProjector",
    "HaarProjector",
    "NonFiniteGradientError",
    "OnlinePCAProjector",
    "Projector",
    "RSVDProjector",
    "RandomProjector",
    "SVDProjector",
    "SharedHeadProjector",
    "SparseProjector",
    "StiefelProjector",
    "available",
    "choose_side",
    "make",
    "register",
    "split_head_groups",
]
