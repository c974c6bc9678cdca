"""Loading a state dict: the saved groups and every parameter's state are checked against this optimizer
before anything changes, so a refused checkpoint leaves the optimizer as it was.

What is refused, naming the group or parameter and the key:

* a state dict of another method or rank: a saved group whose ``rank``, ``projector``, ``rule``, residual,
  scaling, refresh policy or storage differs from this optimizer's (a group saved without these keys, as
  ``torch.optim.AdamW`` saves them, loads only into a group that has their defaults: an unprojected one);
* a state that does not fit: a projected parameter's state without a projector or the reverse, a basis of
  another shape or rank, the rule's keys missing or of another shape;
* malformed values: a ``step`` (or ``next_refresh``, the step of the next subspace refresh) that is not a
  finite integer ≥ 0, moments of another dtype than the step keeps them in, non-finite moments or bases,
  negative second moments.

Hyperparameters (``lr``, ``betas``, ``scale``, ``update_proj_gap``, ...) are taken from the state dict, as
``torch.optim.Optimizer.load_state_dict`` does.
"""

from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import distributed
from .. import rules as _rules
from . import options
from . import state as _state
from .groups import plain_numbers
from .nonfinite import SKIPPED

if TYPE_CHECKING:
    from .lowrank import LowRankAdamW

#: Group keys that choose the method and the layout of its state: a state dict must agree on them.
METHOD_KEYS = ("rank", "projector", "proj_type", "rule", "residual", "scaling", "on_refresh", "refresh",
               "state_bits", "proj_bits", "ef_bits")


def _method_default(key: str) -> Any:
    return options.part_defaults()[key] if key in options.part_defaults() else options.CORE_DEFAULTS.get(key)


def check_unchanged(opt: "LowRankAdamW") -> None:
    """Refuse a step after a :data:`METHOD_KEYS` entry of a group with state was edited in place (say
    ``param_groups[0]["rank"] = 4`` for a rank schedule): the state was built for the old value, so the
    step would ignore the new one (the projector's rank, the moments' storage) or fail half-way, and its
    checkpoints would load nowhere. Raised before anything changes; lr, betas, decay, scale and the gap
    may change (the gap from each weight's next refresh on). Each group's keys are recorded at its
    first step, and again after ``load_state_dict`` and ``add_param_group``."""
    seen = opt._cache().setdefault("method_keys", {})
    defaults = [_method_default(key) for key in METHOD_KEYS]  # once: layer-wise updates call this per weight
    for i, group in enumerate(opt.param_groups):
        now = tuple(group.get(key, default) for key, default in zip(METHOD_KEYS, defaults))
        before = seen.get(i)
        if before is not None and before != now and any(opt.state.get(p) for p in group["params"]):
            j = next(j for j in range(len(METHOD_KEYS)) if before[j] != now[j])
            key, before, now = METHOD_KEYS[j], dict(zip(METHOD_KEYS, before)), dict(zip(METHOD_KEYS, now))
            raise ValueError(
                f"{type(opt).__name__}: param_groups[{i}][{key!r}] is {now[key]!r}, but the group's state was built "
                f"with {key}={before[key]!r}; nothing was changed. A group's {', '.join(METHOD_KEYS)} cannot change "
                f"during a run: put {key}={before[key]!r} back, or build a new optimizer with {key}={now[key]!r} "
                "(its state starts afresh)")
        seen[i] = now
        _check_edited(opt, i, group)


#: Group entries that change without an edit: the skip counter, and the parameters and their names.
_NOT_SETTINGS = frozenset({"params", "param_names", SKIPPED})


def _check_edited(opt: "LowRankAdamW", i: int, group: dict[str, Any]) -> None:
    """Validate group ``i`` again when one of its settings changed since the last step (an lr, betas or gap
    written into ``param_groups`` mid-run): a bad value is refused with the constructor's message, before
    anything changes, instead of failing half-way through the step. A tensor lr counts by identity (a
    scheduler writes into it in place, as torch's do)."""
    values = opt._cache().setdefault("group_values", {})
    if values.get(i) != _settings(group):
        group.update(plain_numbers({k: v for k, v in group.items() if k not in _NOT_SETTINGS}))  # np.float32 lr
        options.check_group(group, f"{type(opt).__name__} param_groups[{i}]")
        values[i] = _settings(group)


def _settings(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The group's settings as compared between steps (a tensor by identity)."""
    return tuple((k, ("tensor", id(v)) if isinstance(v, Tensor) else v) for k, v in group.items()
                 if k not in _NOT_SETTINGS)


def loaded(opt: "LowRankAdamW", state_dict: Any) -> dict[str, Any]:
    """The ``{"state", "param_groups"}`` that loading ``state_dict`` into ``opt`` gives, every part checked
    (ValueError naming what does not fit); ``opt`` is not touched."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError("an optimizer state_dict is a dict with a dict 'state' and a list 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if not all(isinstance(sg, dict) and isinstance(sg.get("params"), list) for sg in saved_groups):
        raise ValueError("each of the state dict's param_groups must be a dict with a list 'params'")
    new_groups = loaded_groups(opt, deepcopy(saved_groups))
    id_map = dict(zip(chain.from_iterable(sg["params"] for sg in saved_groups),
                      chain.from_iterable(g["params"] for g in opt.param_groups)))
    group_of = {p: ng for ng in new_groups for p in ng["params"]}
    new_state: defaultdict[Any, Any] = defaultdict(dict)
    for key, value in state_dict["state"].items():
        if key in id_map:
            p = id_map[key]
            if not isinstance(value, dict):
                raise ValueError(f"{type(opt).__name__}.load_state_dict: the state of parameter {key!r} is a "
                                 f"{type(value).__name__}, not a dict")
            value = _state.normalize_step(_state.to_device(value, distributed.local(p).device))
            check_loaded_state(opt, p, group_of[p], value)
            new_state[p] = value
        else:
            new_state[key] = value
    return {"state": new_state, "param_groups": new_groups}


#: The group entry ``state_dict()`` writes where the group holds INT8 moments: the number of ranks whose
#: pieces they were quantized in. Their blocks of 256 are cut inside each rank's piece, so they load only on
#: that number: on another, the scales may even count the same and load into the wrong blocks, silently.
INT8_RANKS = "int8_ranks"


def ranks_of(group: dict[str, Any]) -> int:
    """How many ranks the group's parameters are sharded over (1: none is)."""
    return max((p.device_mesh.size() for p in group["params"] if distributed.is_sharded(p)), default=1)


def with_int8_ranks(opt: "LowRankAdamW", saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a ``state_dict()``) with :data:`INT8_RANKS` in every group that holds INT8 moments."""
    for group, entry in zip(opt.param_groups, saved["param_groups"]):
        if any(isinstance(v, Tensor) and v.dtype == torch.uint8 for p in group["params"]
               for v in opt.state.get(p, {}).values()):
            entry[INT8_RANKS] = ranks_of(group)
    return saved


def loaded_groups(opt: "LowRankAdamW", saved_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = opt.param_groups
    if len(groups) != len(saved_groups):
        ours = any(isinstance(sg, dict) and "rank" in sg for sg in saved_groups)
        origin = ("" if ours else " (its groups have no 'rank': it was saved by another optimizer, e.g. "
                  "torch.optim.AdamW, Trainer's default)")
        raise ValueError(
            f"{type(opt).__name__}.load_state_dict: the state dict has {len(saved_groups)} parameter groups{origin}, "
            f"this optimizer has {len(groups)}; nothing was loaded. Build the optimizer with the groups it was "
            "saved with (lro.param_groups with the same options: match_adamw_rms=True makes one low-rank group per "
            "short side), or start its state fresh (under Trainer: delete optimizer.pt and scheduler.pt from the "
            "checkpoint folder)")
    new_groups = []
    for k, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(f"param group {k}: loaded state dict has {len(sg['params'])} parameters, "
                             f"this optimizer has {len(g['params'])}")
        ng = {**options.part_defaults(), **opt.defaults, **sg, "params": g["params"]}
        saved_ranks = ng.pop(INT8_RANKS, None)
        if saved_ranks is not None and int(saved_ranks) != ranks_of(g):
            raise ValueError(f"{type(opt).__name__}.load_state_dict: param group {k} holds INT8 moments saved on "
                             f"{int(saved_ranks)} ranks, and this optimizer's parameters are on {ranks_of(g)}: INT8 "
                             "moments resume on the number of ranks that saved them (their blocks are cut inside "
                             "each rank's piece); float moments reshard freely")
        if "param_names" in g and "param_names" not in sg:
            ng["param_names"] = g["param_names"]
        options.check_group(ng, f"{type(opt).__name__} loaded param group {k}")
        _check_same_method(f"{type(opt).__name__}.load_state_dict: param group {k}", g, sg)
        new_groups.append(ng)
    return new_groups


def _check_same_method(where: str, group: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse a saved group of another method, rank or storage than ``group`` (see :data:`METHOD_KEYS`)."""
    for key in METHOD_KEYS:
        ours = group.get(key, _method_default(key))
        if key in saved:
            if saved[key] != ours:
                raise ValueError(
                    f"{where}: the state dict has {key}={saved[key]!r}, this optimizer {key}={ours!r}; a state "
                    f"dict of another method or rank does not load. Build the optimizer with {key}={saved[key]!r} "
                    "to resume it")
        elif ours != _method_default(key):
            raise ValueError(
                f"{where}: the state dict has no {key!r} (it was saved by another optimizer, e.g. "
                f"torch.optim.AdamW), and this group has {key}={ours!r}; its state cannot be loaded here")


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
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"{where}: {err}") from None
        _state.check_finite_entries(where, "its projector's", state["projector"])
        shape, dtype = proj.low_rank_shape(tuple(p.shape)), _state.state_dtype(p.dtype)
    else:
        if "projector" in state:
            raise ValueError(f"{where}: saved state is low-rank, but this group updates the parameter as "
                             "plain AdamW (check rank and the parameter's shape)")
        rule, shape, dtype = _rules.get(rule.plain_rule), tuple(p.shape), opt._plain_moment_dtype(group, p)
    _state.check_loaded(where, rule, group, state, shape)
    _state.check_values(where, rule, state, dtype)
