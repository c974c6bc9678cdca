"""The methods' reference packages as optimizers: ``ref:PRESET`` in ``compare`` and ``bench/nanogpt_lr.py``.

An entry ``ref:galore`` (``ref:apollo``, ``ref:apollo_mini``, ``ref:fira``) trains with the paper's own
package from the package index (galore-torch, apollo-torch, fira) at the settings our preset resolves
to: our optimizer is built first (:func:`lowrank_optim.train.build_optimizer`, or a preset class), and
each of its groups is handed over with its lr, betas, ε and weight decay, the projected ones with their
rank, ``update_proj_gap``, ``proj_type``, scale, scaling, projection and limiter. So a gap to AdamW can be
told apart as the method's (its own code has it too) or ours::

    lowrank-optim compare --config configs/llama_tiny.json --optimizers adamw,apollo,ref:apollo

What the package keeps its own way: its refresh schedule (every weight on the same step; ours staggers
them), its random projection (another seed), its Adam (ε added to √v before the bias correction) and its
limiter (on the uncorrected ratio, where ours follows the papers: tests/test_parity_apollo_fira.py). The
runs agree in distribution, not bit for bit. Settings a package has no word for (a residual other than
its own, another rule, a limiter it does not run) are refused by name, and the packages' states hold
Python objects, so ``ref:`` entries neither save nor resume (``compare`` never checkpoints).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from .errors import TrainError

PREFIX = "ref:"

#: The presets whose paper ships a package on the index: (module, pip name, optimizer class, the projected
#: group's keys in that package's words from our resolved group ``g``, lr and decay where they differ).
REFERENCES: dict[str, tuple[str, str, str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "galore": ("galore_torch", "galore-torch", "GaLoreAdamW", lambda g: {"scale": g["scale"]}),
    "apollo": ("apollo_torch", "apollo-torch", "APOLLOAdamW",
               lambda g: {"scale": g["scale"], "scale_type": g["scaling"],
                          "proj": "random" if g["projector"] == "random" else "svd"}),
    # the fira package subtracts alpha·project_back(R) from G, the residual only at alpha = 1 (our documented
    # departure, lro.Fira): our scale·(project_back(N) + k·S) is alpha = 1 at lr·scale, decay wd/scale
    "fira": ("fira", "fira", "FiraAdamW", lambda g: {"alpha": 1.0, "lr": g["lr"] * g["scale"],
                                                   "weight_decay": g["weight_decay"] / g["scale"]}),
}
REFERENCES["apollo_mini"] = REFERENCES["apollo"]
#: Our group settings the packages have no word for, with the only value each package runs.
FIXED: dict[str, dict[str, Any]] = {
    "galore": {"limiter": None, "residual": "drop", "rule": "adam"},
    "apollo": {"residual": "drop", "rule": "adam"},
    "fira": {"limiter": 1.01, "residual": "fira", "rule": "adam"},
}
FIXED["apollo_mini"] = FIXED["apollo"]
#: apollo-torch's norm-growth limiter: γ = 1.01, or off (``disable_nl``).
APOLLO_LIMITERS = (None, 1.01)


def preset_of(name: str) -> str | None:
    """The preset a ``ref:PRESET`` name stands for (None for any other name); refuses one without a package."""
    if not name.startswith(PREFIX):
        return None
    preset = name[len(PREFIX):]
    if preset not in REFERENCES:
        raise TrainError(f"{name}: no reference package on the index for {preset!r}; "
                         f"there is one for {', '.join(PREFIX + k for k in sorted(REFERENCES))}")
    return preset


def reference_twin(preset: str, ours: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Preset ``preset``'s reference package, given the groups and resolved settings of ``ours``."""
    module, pip_name, cls, keys = REFERENCES[preset]
    groups, limiters = [], set()
    for g in ours.param_groups:
        group = {"params": list(g["params"]), "lr": g["lr"], "weight_decay": g["weight_decay"],
                 "betas": tuple(g["betas"]), "eps": g["eps"]}  # every package reads these per group
        if g.get("rank") is not None:
            for key, value in FIXED[preset].items():
                if g[key] != value:
                    raise TrainError(f"{PREFIX}{preset}: {pip_name} runs {key}={value!r} only, this entry has {g[key]!r}")
            if module == "apollo_torch" and g["limiter"] not in APOLLO_LIMITERS:
                raise TrainError(f"{PREFIX}{preset}: apollo-torch's limiter is 1.01 or off, this entry has "
                                 f"limiter={g['limiter']!r}")
            limiters.add(g["limiter"])
            group.update(rank=g["rank"], update_proj_gap=g["update_proj_gap"], proj_type=g["proj_type"])
            group.update(keys(g))
        groups.append(group)
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise TrainError(f"{PREFIX}{preset} needs {pip_name} (pip install {pip_name}, or the dev extra)") from None
    if module == "apollo_torch" and len(limiters) > 1:  # its limiter is one switch for the whole optimizer
        raise TrainError(f"{PREFIX}{preset}: apollo-torch's limiter is on or off for every group at once, these "
                         f"groups have limiter={sorted(limiters, key=repr)}")
    extra = {"disable_nl": None in limiters} if module == "apollo_torch" else {}
    first = ours.param_groups[0]
    return getattr(package, cls)(groups, lr=first["lr"], betas=first["betas"], eps=first["eps"],
                                 no_deprecation_warning=True, **extra)


__all__ = ["FIXED", "PREFIX", "REFERENCES", "preset_of", "reference_twin"]
