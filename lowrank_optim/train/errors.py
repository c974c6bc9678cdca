"""The one error type the training commands raise for bad input, and the lazy-import helper."""

from __future__ import annotations

import importlib
from types import ModuleType


class TrainError(Exception):
    """Bad input to ``pretrain`` / ``compare`` (config, data, output folder, checkpoint): the CLI
    prints its message on one line and exits with status 2."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be read, or that belongs to another run."""


def require(module: str, why: str) -> ModuleType:
    """Import an optional dependency of the ``train`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrainError(f'{why} needs the {module} package: pip install "lowrank-optim[train]"') from None
