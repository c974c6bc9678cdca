"""Pretraining LLaMA models with our optimizers: ``lowrank-optim pretrain`` and ``compare``.

>>> from lowrank_optim.train import TrainArgs, build_optimizer, pretrain
>>> opt = build_optimizer("galore", model)                   # the defaults table, overridable
>>> result = pretrain(TrainArgs("configs/llama_tiny.json", optimizer="apollo_mini", max_steps=200, out="runs/x"))

Importing this package needs only torch and numpy; transformers (the model), datasets (C4) and
matplotlib (``compare.png``) are imported when used, and their absence is reported as
``pip install "lowrank-optim[train]"``.
"""

from .checkpoint import CHECKPOINT_NAME
from .compare import compare, parse_optimizers
from .data import Corpus, local_corpus, stdlib_corpus
from .errors import CheckpointError, TrainError
from .loop import RunResult, TrainArgs, build_model, evaluate, pretrain, schedule
from .optimizers import DEFAULTS, available, build_optimizer, optimizer_settings, state_bytes

__all__ = [
    "CHECKPOINT_NAME",
    "DEFAULTS",
    "CheckpointError",
    "Corpus",
    "RunResult",
    "TrainArgs",
    "TrainError",
    "available",
    "build_model",
    "build_optimizer",
    "compare",
    "evaluate",
    "local_corpus",
    "optimizer_settings",
    "parse_optimizers",
    "pretrain",
    "schedule",
    "state_bytes",
    "stdlib_corpus",
]
