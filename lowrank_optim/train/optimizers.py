"""One way to build every optimizer the training commands know: ``build_optimizer(name, model)``.

``DEFAULTS`` holds each name's settings (learning rate, rank, refresh gap, scale, weight decay);
anything passed to :func:`build_optimizer` overrides them. A preset added to ``lro.PRESETS`` later
works at once with the ``"*"`` entry (the GaLore paper's low-rank settings) and needs a table entry
only if it wants other defaults.

``rank=None`` in the table means a quarter of the model's hidden size, the rule the GaLore paper's
ranks follow (128/256/512/1024 for hidden 512/1024/2048/4096: LLaMA 60M/350M/1B/7B; its 130M model,
hidden 768, uses 256 rather than 192); 32 for ``configs/llama_tiny.json``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .errors import TrainError

# Constructor arguments; every other option is a key of the low-rank parameter group.
_CONSTRUCTOR = ("lr", "weight_decay", "betas", "eps")

#: Each optimizer's defaults (see the module docstring and README "Pretraining"). The learning
#: rates were tuned on configs/llama_tiny.json (the README gives the sweep); the papers' values at
#: LLaMA-60M and above are lr 1e-3 for AdamW and 1e-2 for the low-rank methods.
DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "weight_decay": 0.0},
    # GaLore paper: lr 0.01, scale 0.25, gap 200, rank hidden/4.
    "galore": {"lr": 1e-2, "rank": None, "update_proj_gap": 200, "scale": 0.25, "weight_decay": 0.0},
    # APOLLO paper: lr 0.01, scale 1, gap 200, rank hidden/4; APOLLO-Mini rank 1, scale 128.
    "apollo": {"lr": 1e-2, "rank": None, "update_proj_gap": 200, "scale": 1.0, "weight_decay": 0.0},
    "apollo_mini": {"lr": 1e-2, "rank": 1, "update_proj_gap": 200, "scale": 128.0, "weight_decay": 0.0},
    # FRUGAL and Fira: their papers' GaLore-like settings, scale 1.
    "frugal": {"lr": 1e-2, "rank": None, "update_proj_gap": 200, "scale": 1.0, "weight_decay": 0.0},
    "fira": {"lr": 1e-2, "rank": None, "update_proj_gap": 200, "scale": 1.0, "weight_decay": 0.0},
    "lowrank": {"lr": 1e-2, "rank": None, "update_proj_gap": 200, "weight_decay": 0.0},
    # Any preset without an entry of its own.
    "*": {"lr": 1e-2, "rank": None, "update_proj_gap": 200, "weight_decay": 0.0},
}


def available() -> list[str]:
    """Every name :func:`build_optimizer` accepts: ``adamw`` and the keys of ``lro.PRESETS``."""
    from .. import PRESETS

    return ["adamw", *PRESETS]


def _hidden_size(model: nn.Module | None) -> int | None:
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    if hidden is None and isinstance(config, dict):
        hidden = config.get("hidden_size")
    return int(hidden) if hidden else None


def optimizer_settings(name: str, model: nn.Module | None = None, **options: Any) -> dict[str, Any]:
    """The settings :func:`build_optimizer` would use: the table's entry, then ``options`` on top.
    Options given as None are left at the default. ``rank=None`` resolves to the model's hidden
    size // 4 (128 when the model has no ``config.hidden_size``)."""
    from .. import PRESETS

    if name != "adamw" and name not in PRESETS:
        raise TrainError(f"unknown optimizer {name!r}; choose one of: {', '.join(available())}")
    settings = dict(DEFAULTS.get(name, DEFAULTS["*"]))
    settings.update({k: v for k, v in options.items() if v is not None})
    if name == "adamw":
        extra = sorted(set(settings) - set(_CONSTRUCTOR))
        if extra:
            raise TrainError(f"adamw takes no low-rank options ({', '.join(extra)}); it has lr, weight_decay, betas, eps")
        return settings
    if settings.get("rank") is None:
        hidden = _hidden_size(model)
        settings["rank"] = max(1, hidden // 4) if hidden else 128
    return settings


def build_optimizer(name: str, model: nn.Module, **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (``adamw`` or a key of ``lro.PRESETS``) for ``model``'s parameters.

    Low-rank presets get ``lro.param_groups(model, rank=..., update_proj_gap=..., scale=..., <other
    group keys>)``: every linear layer except the output head is projected; embeddings, norms and the
    head are plain AdamW in the same optimizer, at the same lr. ``adamw`` is ``torch.optim.AdamW``
    over all parameters. Options override :data:`DEFAULTS` (``lr``, ``weight_decay``, ``betas``,
    ``eps``, ``rank``, ``update_proj_gap``, ``scale``, ``projector``, ``proj_type``, ...).
    """
    from .. import PRESETS, param_groups
    from ..optim import RankFallbackWarning

    settings = optimizer_settings(name, model, **options)
    ctor = {k: settings[k] for k in _CONSTRUCTOR if k in settings}
    if "betas" in ctor:
        ctor["betas"] = tuple(ctor["betas"])
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **ctor)
    keys = {k: v for k, v in settings.items() if k not in _CONSTRUCTOR}
    rank = keys.pop("rank")
    try:
        groups = param_groups(model, rank=rank, **keys)
        with warnings.catch_warnings():
            # a short side <= rank (llama_tiny's 128-wide layers at rank 128) is plain AdamW, by design
            warnings.simplefilter("ignore", RankFallbackWarning)
            return PRESETS[name](groups, **ctor)
    except (TypeError, ValueError) as err:
        raise TrainError(f"{name}: {err}") from None


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state kept between steps: ``state_nbytes()`` for ours, the state tensors'
    bytes for any other ``torch.optim`` optimizer."""
    nbytes = getattr(opt, "state_nbytes", None)
    if callable(nbytes):
        return int(sum(nbytes().values()))
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


__all__ = ["DEFAULTS", "available", "build_optimizer", "optimizer_settings", "state_bytes"]
