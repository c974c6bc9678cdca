"""Loading a state dict: the saved groups and every parameter's state are checked against this optimizer
before anything changes, so a refused checkpoint leaves the optimizer as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from .. import rules as _rules
from . import options
from . import state as _state

if TYPE_CHECKING:
    from .lowrank import LowRankAdamW


def loaded_groups(opt: "LowRankAdamW", saved_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = opt.param_groups
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(groups)}")
    new_groups = []
    for k, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(f"param group {k}: loaded state dict has {len(sg['params'])} parameters, "
                             f"this optimizer has {len(g['params'])}")
        ng = {**options.part_defaults(), **opt.defaults, **sg, "params": g["params"]}
        if "param_names" in g and "param_names" not in sg:
            ng["param_names"] = g["param_names"]
        options.check_group(ng, f"{type(opt).__name__} loaded param group {k}")
        new_groups.append(ng)
    return new_groups


def check_loaded_state(opt: "LowRankAdamW", p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
    i = next(k for k, q in enumerate(group["params"]) if q is p)
    where = f"{type(opt).__name__}.load_state_dict: parameter {opt._label(group, i)}"
    if not state:
        return
    if not isinstance(state.get("step"), Tensor):
        raise ValueError(f"{where}: state has no tensor 'step'")
    rule = _rules.get(group["rule"])
    if opt.is_low_rank(p, group):
        if "projector" not in state:
            raise ValueError(f"{where}: the group projects this parameter, but its saved state has no "
                             "projector (was it saved by a plain AdamW, or with another rank?)")
        proj = opt._new_projector(group, p)
        try:
            proj.load_state_dict(proj.import_state(state["projector"]))
            proj.check_fits(tuple(p.shape))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{where}: {err}") from None
        shape = proj.low_rank_shape(tuple(p.shape))
    else:
        if "projector" in state:
            raise ValueError(f"{where}: saved state is low-rank, but this group updates the parameter as "
                             "plain AdamW (check rank and the parameter's shape)")
        rule, shape = _rules.get(rule.plain_rule), tuple(p.shape)
    _state.check_loaded(where, rule, group, state, shape)
