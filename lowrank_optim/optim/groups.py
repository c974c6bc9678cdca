"""A parameter group's checks when it joins the optimizer: names, parameters, FSDP2 layouts, fallbacks.

Every refusal names the parameter and the fix, and is raised before the group is added.
"""

from __future__ import annotations

import difflib
import warnings
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .. import distributed
from .. import projectors as _projectors
from .. import rules as _rules
from ..projectors.base import choose_side
from . import options
from .nonfinite import SKIPPED

if TYPE_CHECKING:
    from .lowrank import LowRankAdamW


class RankFallbackWarning(UserWarning):
    """A parameter in a rank group is too small to project and is updated as plain AdamW."""


def normalized(opt: "LowRankAdamW", param_group: dict[str, Any]) -> dict[str, Any]:
    """A copy with ``params`` as a list and ``betas`` a tuple; a near-miss of one of our keys is an error."""
    param_group = dict(param_group)
    params = param_group.get("params")
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError("parameters must be given in an ordered collection (a list), not a set")
    elif params is None:
        raise ValueError("a parameter group needs a 'params' entry")
    param_group["params"] = list(params)
    if "betas" in param_group and isinstance(param_group["betas"], list):
        param_group["betas"] = tuple(param_group["betas"])
    param_group.setdefault(SKIPPED, 0)  # steps skipped for a non-finite gradient (nonfinite="skip")
    known = [*opt.defaults, *options.part_defaults()]
    for key in param_group:
        if key in known or key in ("params", "param_names"):
            continue
        # Other keys pass through as metadata (frameworks attach names, lr multipliers...), but a
        # near-miss of one of ours is a typo that would silently change nothing.
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        if close:
            raise ValueError(f"{type(opt).__name__} param group {len(opt.param_groups)}: unknown option "
                             f"{key!r}; did you mean {close[0]!r}?")
    return param_group


def check_parameters(group: dict[str, Any], params: list[Any], where: str) -> None:
    """Refuse, naming the parameter, what the group's parts cannot step: complex tensors, unsupported
    FSDP2 layouts and options, a rule's own refusals."""
    rule = _rules.get(group["rule"])
    for k, item in enumerate(params):
        tensor = item[1] if isinstance(item, tuple) else item
        name = f"'{item[0]}'" if isinstance(item, tuple) else f"#{k}"
        if not isinstance(tensor, Tensor):
            continue
        if tensor.is_complex():
            raise ValueError(f"{where}: parameter {name} is complex; only real floating-point parameters "
                             "are supported")
        if distributed.is_sharded(tensor):
            why = distributed.layout_error(tensor, name) or shard_error(group, tensor, name)
            if why:
                raise ValueError(f"{where}: {why}")
        if group["rank"] is not None and tensor.dim() == 2:
            why = rule.check_parameter(tuple(tensor.shape), group)
            if why:
                raise ValueError(f"{where}: parameter {name} {why}")


def shard_error(group: dict[str, Any], p: Tensor, name: str) -> str | None:
    """Why ``group``'s options cannot step the row-sharded ``p`` (None: they can)."""
    parts = []
    if group["stochastic_rounding"]:
        parts.append("stochastic_rounding=True")
    if is_low_rank(p, group):
        side = choose_side(tuple(p.shape), group["proj_type"])
        why = _projectors.REGISTRY[group["projector"]].shard_error(side, group["projector_options"])
        if why:
            parts.append(why)
    if not parts:
        return None
    return (f"parameter {name} is an FSDP2 shard, and {', '.join(parts)} {'is' if len(parts) == 1 else 'are'} "
            "not built for FSDP2 shards yet; on FSDP2 use another projector or option, and no stochastic "
            "rounding (or train without FSDP2)")


def warn_fallbacks(opt: "LowRankAdamW", group: dict[str, Any]) -> None:
    if group["rank"] is None:
        return
    for i, p in enumerate(group["params"]):
        if p.dim() == 2 and min(p.shape) <= group["rank"]:
            warnings.warn(
                f"{type(opt).__name__}: parameter {opt._label(group, i)} has shape "
                f"{tuple(p.shape)}; its short side {min(p.shape)} is not larger than rank "
                f"{group['rank']}, so it is updated as plain AdamW. Use a rank below "
                f"{min(p.shape)} to project it.",
                RankFallbackWarning,
                stacklevel=4,
            )


def is_low_rank(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``p`` is stepped in a subspace under ``group``'s options."""
    rank = group["rank"]
    return rank is not None and p.dim() == 2 and min(p.shape) > rank
