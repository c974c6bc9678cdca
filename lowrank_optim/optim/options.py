"""The optimizer's options: their defaults and their validation.

The core's own keys are here; a registered part (rule, update, projector) declares the group keys it
reads in its ``defaults`` and validates them in its ``check``, so a part defined outside the package
brings its own keys. Every message names the option and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .. import projectors as _projectors
from .. import rules as _rules
from .. import updates as _updates
from ..projectors import PROJ_TYPES
from . import policies

STATE_BITS = (32, 8)
PROJ_BITS = (32, 4)
#: torch.optim.AdamW's flags: accepted as False, refused by name as True (see :func:`check_flags`).
ADAMW_FLAGS = ("amsgrad", "capturable", "differentiable", "fused")
#: ``rank="auto"``: the group takes the constructor's rank, else its preset's (``optim.groups.auto_rank``);
#: ``scale="auto"``: the preset's scale for the group's width (``optim.groups.auto_scale``).
AUTO_RANK = "auto"

#: The core's keys and their defaults (the method keys a preset may override, then torch's flags).
CORE_DEFAULTS: dict[str, Any] = dict(
    update_proj_gap=200,
    scale=1.0,
    proj_type="std",
    projector="svd",
    projector_options={},
    residual="drop",
    residual_lr_scale=1.0,
    scaling=None,
    limiter=None,
    on_refresh="keep",
    refresh="fixed",
    lazy_threshold=0.4,
    lazy_growth=2,
    stagger=True,
    state_bits=32,
    min_8bit_size=4096,
    proj_bits=32,
    stochastic_rounding=None,
    rule="adam",
    momentum=None,
    nonfinite="raise",
    match_adamw_rms=False,
    max_dim=None,
)
#: What a step does with a gradient that holds inf or NaN (see :mod:`.nonfinite`).
NONFINITE = ("raise", "skip", "ignore")


def part_defaults() -> dict[str, Any]:
    """The group keys every registered rule and update declares, with their defaults."""
    out: dict[str, Any] = {}
    for part in (*_rules.REGISTRY.values(), *_updates.REGISTRY.values()):
        for key, value in part.defaults.items():
            out.setdefault(key, value)
    return out


def is_number(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.is_complex()
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _failer(group: dict[str, Any], where: str) -> Callable[[str, str], None]:
    def fail(key: str, why: str) -> None:
        raise ValueError(f"{where}: invalid {key}={group[key]!r}: {why}")

    return fail


def check_group(group: dict[str, Any], where: str) -> None:
    """Validate one parameter group's options (the core's, then every registered part's)."""
    fail = _failer(group, where)
    _check_adam(group, fail)
    _check_projection(group, fail)
    _check_method(group, fail)
    _check_storage(group, fail)
    for part in (*_rules.REGISTRY.values(), *_updates.REGISTRY.values()):
        part.check(group, fail)
    _check_projector_options(group, fail)  # last: the group keys it derives options from are checked by now


def _check_adam(group: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    lr = group["lr"]
    if not is_number(lr) or not float(lr) >= 0.0 or not math.isfinite(float(lr)):
        fail("lr", "the learning rate must be a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        fail("betas", "pass a pair (beta1, beta2), each in [0, 1)")
    for i, b in enumerate(betas):
        if not is_number(b) or not 0.0 <= float(b) < 1.0:
            fail("betas", f"beta{i + 1} must be in [0, 1), got {b!r}")
    if not is_number(group["eps"]) or not 0.0 <= float(group["eps"]) < math.inf:
        fail("eps", "eps must be a finite number >= 0")
    if not is_number(group["weight_decay"]) or not 0.0 <= float(group["weight_decay"]) < math.inf:
        fail("weight_decay", "weight_decay must be a finite number >= 0")
    if group["foreach"] not in (None, True, False):
        fail("foreach", "foreach must be None, True or False")
    if group.get("maximize", False) not in (True, False):
        fail("maximize", "maximize must be True or False")
    if group.get("nonfinite", "raise") not in NONFINITE:
        fail("nonfinite", "choose 'raise' (refuse the step, nothing changed), 'skip' (skip the step and count it) "
             "or 'ignore' (step anyway, as torch.optim.AdamW does)")


def _check_projection(group: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    rank = group.get("rank")
    if rank is not None and rank != AUTO_RANK and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        fail("rank", "rank must be an integer >= 1, 'auto' (the preset's rank for the weights' width) or None "
             "(plain AdamW)")
    if group.get("match_adamw_rms", False) not in (True, False):
        fail("match_adamw_rms", "pass True (the low-rank update scaled to AdamW's update RMS, so AdamW's lr "
             "carries over) or False (the preset's scale)")
    max_dim = group.get("max_dim")
    if max_dim is not None and (isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 2):
        fail("max_dim", "pass None (project every 2-D weight) or an integer >= 2: weights with a dimension of at "
             "least max_dim are stepped as plain AdamW (DCTAdamW: 32000, the embeddings and output heads)")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        fail("update_proj_gap", "the refresh interval must be an integer >= 1 (steps between refreshes)")
    scale = group["scale"]
    if scale != AUTO_RANK and (not is_number(scale) or not 0.0 < float(scale) < math.inf):
        fail("scale", "scale must be a finite number > 0 (GaLore uses 0.25), or 'auto' where the preset sets it by "
             "width (APOLLOMini)")
    if group["proj_type"] not in PROJ_TYPES:
        fail("proj_type", f"choose one of {', '.join(PROJ_TYPES)}")
    if group["projector"] not in _projectors.REGISTRY:
        fail("projector", f"choose one of {', '.join(_projectors.available())}")
    if not isinstance(group["projector_options"], dict):
        fail("projector_options", "pass a dict of keyword options for the projector, e.g. {'power_iters': 1}")
    if group["on_refresh"] not in policies.ON_REFRESH:
        fail("on_refresh", f"choose one of {', '.join(policies.ON_REFRESH)}")
    if group["refresh"] not in policies.REFRESH:
        fail("refresh", f"choose one of {', '.join(policies.REFRESH)}")
    threshold, growth = group["lazy_threshold"], group["lazy_growth"]
    if not is_number(threshold) or not math.isfinite(float(threshold)):
        fail("lazy_threshold", "the lazy refresh's threshold is a finite number: a layer's gap grows once the mean "
             "|cos| of its top singular vector over 5 refreshes reaches it (Q-GaLore: 0.4; above 1: never)")
    if isinstance(growth, bool) or not isinstance(growth, int) or growth < 1:
        fail("lazy_growth", "the lazy refresh multiplies a still layer's gap by this integer >= 1 (Q-GaLore: 2)")
    if group["stagger"] not in (True, False):
        fail("stagger", "choose True (each weight renews its subspace on its own phase of the gap) or False "
             "(all together at multiples of the gap, as galore-torch)")


def _check_projector_options(group: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    """Build the group's projector once (no tensors) so that a bad ``projector_options`` entry is refused now, not
    at the first step."""
    rank, cls = group.get("rank"), _projectors.REGISTRY[group["projector"]]
    if isinstance(rank, bool) or not isinstance(rank, int):
        return
    derived = cls.options_from_group(group)
    # group keys the projector reads (Grass's selection, the gap as online PCA's lr) are blamed by their names
    for key, options in ((next(iter(derived), "projector_options"), derived),
                         ("projector_options", {**derived, **group["projector_options"]})):
        try:
            cls(rank, proj_type=group["proj_type"], **options)
        except TypeError as err:
            fail(key, f"projector {group['projector']!r} does not take these options: {err}")
        except ValueError as err:
            fail(key, f"projector {group['projector']!r} refuses it: {err}")


def _check_method(group: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    residuals, scalings = _updates.available("residual"), _updates.available("scaling")
    if group["residual"] not in residuals:
        fail("residual", f"choose one of {', '.join(residuals)}")
    rls = group["residual_lr_scale"]
    if not is_number(rls) or not 0.0 <= float(rls) < math.inf:
        fail("residual_lr_scale", "residual_lr_scale must be a finite number >= 0")
    if group["scaling"] is not None and group["scaling"] not in scalings:
        fail("scaling", f"choose None, {' or '.join(repr(s) for s in scalings)}")
    projector = _projectors.REGISTRY[group["projector"]]
    built_with = {**projector.options_from_group(group), **group["projector_options"]}
    if _updates.REGISTRY[group["residual"]].uses_residual and not projector.orthonormal_with(built_with):
        ortho = [n for n, c in sorted(_projectors.REGISTRY.items()) if c.orthonormal]
        fail("residual", f"the residual G - project_back(project(G)) needs an orthonormal basis, and "
             f"projector={group['projector']!r} has none; use residual='drop' or one of {', '.join(ortho)}")
    if group["scaling"] is not None and _updates.REGISTRY[group["residual"]].uses_residual:
        fail("scaling", f"scaling rescales the whole gradient, so it leaves no residual; it needs "
             f"residual='drop', got residual={group['residual']!r}")
    limiter = group["limiter"]
    if limiter is not None and (not is_number(limiter) or not 1.0 <= float(limiter) < math.inf):
        fail("limiter", "the norm-growth limit must be None (off) or a number >= 1 (APOLLO and Fira use 1.01)")
    if group["rule"] not in _rules.REGISTRY:
        fail("rule", f"choose one of {', '.join(_rules.available())}")
    if group["on_refresh"] == "transfer" and not type(_rules.get(group["rule"])).transfers():
        able = [n for n in _rules.available() if type(_rules.get(n)).transfers()]
        fail("on_refresh", f"rule={group['rule']!r} has no projection-aware transfer (LDAdam's is Adam's); use "
             f"on_refresh='rotate', or rule= one of {', '.join(able)}")
    momentum = group["momentum"]
    if momentum is not None and (not is_number(momentum) or not 0.0 <= float(momentum) < 1.0):
        fail("momentum", "the momentum (first-moment) coefficient must be in [0, 1), or None for the rule's "
             "default (orthogonal: 0.95; adafactor: no first moment)")


def _check_storage(group: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    if group["state_bits"] not in STATE_BITS or isinstance(group["state_bits"], bool):
        fail("state_bits", "choose 32 (float32 moments) or 8 (blockwise INT8 moments)")
    mins = group["min_8bit_size"]
    if isinstance(mins, bool) or not isinstance(mins, int) or mins < 0:
        fail("min_8bit_size", "the smallest moment (in elements) kept as INT8 must be an integer >= 0 (default 4096)")
    projector = _projectors.REGISTRY[group["projector"]]
    if group["proj_bits"] not in PROJ_BITS or isinstance(group["proj_bits"], bool):
        fail("proj_bits", "choose 32 (the basis in the gradient's dtype) or 4 (INT4, as Q-GaLore)")
    if group["proj_bits"] == 4 and not getattr(projector, "quantizable", False):
        dense = [n for n, c in sorted(_projectors.REGISTRY.items()) if getattr(c, "quantizable", False)]
        fail("proj_bits", f"projector={group['projector']!r} stores no dense basis to quantize; INT4 "
             f"projections need one of {', '.join(dense)}")
    if group["stochastic_rounding"] not in (None, True, False):
        fail("stochastic_rounding", "choose None (INT8 weights only), True (also bf16 weights) or False (round to nearest)")
    rule = _rules.REGISTRY.get(group["rule"])
    if rule is not None and rule.int8_keys == () and group["state_bits"] == 8:
        fail("state_bits", f"rule={group['rule']!r} keeps no state that INT8 storage is built for (its statistics "
             "stay float32). Use state_bits=32 with this rule, or rule='adam'")


def check_flags(owner: str, flags: dict[str, Any]) -> None:
    """torch.optim.AdamW's flags: False (or None for ``fused``) is what we do; True is refused by name."""
    why = {
        "amsgrad": "AMSGrad's running maximum of V is not built; use amsgrad=False",
        "capturable": "steps are not CUDA-graph capturable (refreshes decide on the host); use capturable=False",
        "differentiable": "the step is not differentiable (it runs under no_grad); use differentiable=False",
        "fused": "there is no fused AdamW kernel for the low-rank step; use fused=None or False "
                 "(the plain parameters already take torch's foreach path)",
    }
    for name, value in flags.items():
        if value not in (None, False, True):
            raise ValueError(f"{owner}: invalid {name}={value!r}: pass True or False")
        if value:
            raise ValueError(f"{owner}: {name}=True is not supported: {why[name]}")


def option_value(text: str) -> Any:
    """A value written as text (``key=value`` on the command line, Trainer's ``optim_args``): None, a bool,
    an int, a float, or the text itself."""
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
