"""One way to build every optimizer the training commands know: ``build_optimizer(name, model)``.

``DEFAULTS`` holds each name's settings (learning rate, rank, refresh gap, scale, weight decay);
anything passed to :func:`build_optimizer` overrides them. A preset added to ``lro.PRESETS`` later
works at once with the ``"*"`` entry (the GaLore paper's low-rank settings) and needs a table entry
only if it wants other defaults. A value may be a function of the model's hidden size (None when the
model has no ``config.hidden_size``).

Two regimes, by width:

* **hidden >= 512** (``configs/llama_60m.json`` and up): the papers' own pretraining settings, from
  their LLaMA 60M-7B scripts: AdamW lr 1e-3; GaLore lr 0.01, scale 0.25; APOLLO lr 0.01, scale 1;
  APOLLO-Mini lr 0.01, rank 1, scale 128; FRUGAL lr 1e-3, scale 1, signSGD residual; Fira lr 0.01,
  scale 0.25; all with refresh gap 200 and weight decay 0.
* **hidden < 512** (``configs/llama_tiny.json``): the same, except where a sweep on llama_tiny found a
  clearly better value (README, "Pretraining: defaults and tuning"): GaLore lr 0.03, APOLLO-Mini lr 0.03
  with scale 4. Both keep the projected weights' step near the papers' relative size and raise the
  shared lr, which on this model mostly speeds up the embeddings, output head and norms.

``rank`` is a quarter of the hidden size in both, the rule the GaLore paper's ranks follow (128/256/
512/1024 for hidden 512/1024/2048/4096; its 130M model, hidden 768, uses 256 rather than 192, and
APOLLO uses the same ranks); 32 for llama_tiny.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import TrainError

# Constructor arguments; every other option is a key of the low-rank parameter group.
_CONSTRUCTOR = ("lr", "weight_decay", "betas", "eps")
#: Below this hidden size the llama_tiny-tuned values apply (LLaMA-60M, the papers' smallest, has 512).
SMALL_WIDTH = 512


def quarter_hidden(hidden: int | None) -> int:
    """The default rank: hidden size // 4 (128 when the width is unknown)."""
    return max(1, hidden // 4) if hidden else 128


def by_width(small: Any, paper: Any) -> Callable[[int | None], Any]:
    """``small`` for models narrower than LLaMA-60M (hidden < 512), else the paper's ``paper``."""

    def pick(hidden: int | None) -> Any:
        return small if hidden is not None and hidden < SMALL_WIDTH else paper

    pick.small, pick.paper = small, paper  # for the README table and `lowrank-optim` listings
    return pick


_LOW_RANK = {"rank": quarter_hidden, "update_proj_gap": 200, "weight_decay": 0.0}

#: Each optimizer's defaults (see the module docstring and README "Pretraining").
DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "weight_decay": 0.0},
    "galore": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "scale": 0.25},
    # 8-bit GaLore and Q-GaLore: GaLore's settings, as in their papers. Q-GaLore's INT8 weights are not
    # used by the training commands (the model stays in --dtype); its INT4 bases, lazy refresh and
    # INT8 moments are.
    "galore8bit": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "scale": 0.25},
    "qgalore": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "scale": 0.25},
    "apollo": {**_LOW_RANK, "lr": 1e-2, "scale": 1.0},
    "apollo_mini": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "rank": 1, "scale": by_width(4.0, 128.0)},
    # FRUGAL's signSGD residual moves every coordinate by lr per step, so it takes AdamW's lr
    "frugal": {**_LOW_RANK, "lr": 1e-3, "scale": 1.0},
    "fira": {**_LOW_RANK, "lr": 1e-2, "scale": 0.25},
    "lowrank": {**_LOW_RANK, "lr": 1e-2},
    # any preset without an entry of its own
    "*": {**_LOW_RANK, "lr": 1e-2},
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
    Options given as None are left at the default; defaults that depend on the width are resolved
    from ``model.config.hidden_size``."""
    from .. import PRESETS

    if name != "adamw" and name not in PRESETS:
        raise TrainError(f"unknown optimizer {name!r}; choose one of: {', '.join(available())}")
    settings = dict(DEFAULTS.get(name, DEFAULTS["*"]))
    settings.update({k: v for k, v in options.items() if v is not None})
    if name == "adamw":
        extra = sorted(set(settings) - set(_CONSTRUCTOR))
        if extra:
            raise TrainError(f"adamw takes no low-rank options ({', '.join(extra)}); it has lr, weight_decay, betas, eps")
    hidden = _hidden_size(model)
    return {k: (v(hidden) if callable(v) else v) for k, v in settings.items()}


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
