"""A parameter group's checks when it joins the optimizer: names, parameters, FSDP2 layouts, fallbacks.

Every refusal names the parameter and the fix, and is raised before the group is added.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import distributed
from .. import projectors as _projectors
from .. import rules as _rules
from .. import updates as _updates
from ..projectors.base import choose_side
from . import options
from .nonfinite import SKIPPED

if TYPE_CHECKING:
    from .lowrank import LowRankAdamW


class RankFallbackWarning(UserWarning):
    """A parameter in a rank group is too small to project and is updated as plain AdamW."""


class ConstructorRankWarning(UserWarning):
    """The constructor's ``rank`` reaches groups built without one, so every 2-D tensor in them is projected,
    embeddings and output heads included."""


#: Parameter names that mark an embedding or an output head, which no method here projects.
_EMBEDDING_OR_HEAD = re.compile(r"(^|\.)(wte|wpe|tok_embeddings|embed_tokens|embed_out|embeddings?|\w*_embeddings?|lm_head)"
                                r"(\.|$)|^(output|head)\.")


def materialized(params: Any) -> Any:
    """``params`` with iterators (``model.parameters()``, a group's generator) read into lists once here, as
    torch's constructor would read them, so they can be looked at before the optimizer takes them; what
    torch or :func:`normalized` refuse (a tensor, a set, a group without ``params``) is left as it is."""
    def listed(x: Any) -> Any:
        return x if isinstance(x, (list, tuple, set, dict, Tensor)) or not hasattr(x, "__iter__") else list(x)

    items = listed(params)
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return [{**g, "params": listed(g["params"])} if isinstance(g, dict) and "params" in g else g for g in items]
    return items


def _outside_the_package() -> int:
    """The ``stacklevel`` of the first caller outside lowrank_optim (presets add constructor frames)."""
    root = Path(__file__).resolve().parent.parent
    frame, level = sys._getframe(1), 1
    while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(root):
        frame, level = frame.f_back, level + 1
    return level


def warn_constructor_rank(params: list[Any], rank: Any, cls: str) -> None:
    """Warn once when the constructor's integer ``rank`` reaches groups without their own ``rank`` that hold
    2-D tensors which are embeddings or heads by their names, or unnamed ones given with a model's norms or
    biases (so likely its embeddings too): nanoGPT's ``configure_optimizers`` groups, Trainer's
    ``optimizer_cls_and_kwargs``, ``model.parameters()``. GaLore's code sets the rank per group."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        return
    if not isinstance(params, (list, tuple)):
        return  # torch refuses it (a tensor, a set)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    # unnamed tensors are a whole model's (embeddings likely among them) when norms or biases come with them;
    # a list of chosen weights alone is taken as chosen
    whole_model = any(isinstance(t, Tensor) and t.dim() < 2 for g in groups if isinstance(g, dict)
                      for t in (x[1] if isinstance(x, tuple) else x for x in g.get("params", ())
                                if isinstance(g.get("params"), (list, tuple))))
    named, unnamed = [], 0
    for g in groups:
        if not isinstance(g, dict) or "rank" in g or not isinstance(g.get("params"), (list, tuple)):
            continue
        for item in g["params"]:
            name, t = item if isinstance(item, tuple) else (None, item)
            if isinstance(t, Tensor) and t.dim() == 2:
                if name is None:
                    unnamed += whole_model
                elif _EMBEDDING_OR_HEAD.search(str(name)):
                    named.append(str(name))
    if not (named or unnamed):
        return
    what = (f"the 2-D parameters {named[:4]}" if named else
            f"{unnamed} unnamed 2-D parameters (which may be embeddings or the output head)")
    warnings.warn(f"{cls}: rank={rank} given to the constructor reaches groups without a 'rank' of their own, so "
                  f"{what} are projected; no method here projects embeddings or heads (GaLore's code projects the "
                  f"attention and MLP weights only). Pass the model ({cls}(model, rank={rank})) or "
                  f"lro.param_groups(model, rank={rank}), or give each group its own 'rank' (None: plain AdamW)",
                  ConstructorRankWarning, stacklevel=_outside_the_package())


def plain_numbers(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with NumPy scalars (``np.float32(1e-3)``, ``np.int64(8)``, in ``betas`` too) as Python numbers,
    which torch.optim.AdamW takes and a ``torch.load(weights_only=True)`` of the checkpoint reads back."""
    def plain(v: Any) -> Any:
        if type(v).__module__ == "numpy" and isinstance(v, numbers.Number) and hasattr(v, "item"):
            return v.item()
        return tuple(plain(x) for x in v) if isinstance(v, tuple) else v

    return {k: plain(v) for k, v in values.items()}


#: Group keys of the reference packages and ours that they mean: (our key, {their value: ours} or None for the
#: value as it is, the package). A group dict written for galore-torch, apollo-torch, fira or q-galore-torch
#: works here unchanged; galore-torch's own keys (rank, update_proj_gap, scale, proj_type) are ours already.
REFERENCE_KEYS: dict[str, tuple[str, dict[Any, Any] | None, str]] = {
    "proj": ("projector", {"random": "random", "svd": "svd"}, "apollo-torch"),
    "scale_type": ("scaling", {"channel": "channel", "tensor": "tensor"}, "apollo-torch"),
    "alpha": ("scale", None, "fira"),
    "cos_threshold": ("lazy_threshold", None, "q-galore-torch"),
    "gamma_proj": ("lazy_growth", None, "q-galore-torch"),
    "quant": ("proj_bits", {True: 4, False: 32}, "q-galore-torch"),
}
#: Reference keys taken only at the one value that is ours: (that value, why, the package).
REFERENCE_FIXED: dict[str, tuple[Any, str, str]] = {
    "correct_bias": (True, "Adam's bias is always corrected here, as torch.optim.AdamW does", "apollo-torch, fira"),
    "queue_size": (5, "the lazy refresh averages the last 5 similarities (lazy_threshold and lazy_growth are "
                      "options)", "q-galore-torch"),
    "quant_n_bit": (4, "the projection is stored in 4 bits (proj_bits=4) or in float32 (proj_bits=32)",
                    "q-galore-torch"),
    "quant_group_size": (256, "the INT4 basis has a scale and zero point per 256 elements", "q-galore-torch"),
}


def reference_keys(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` (a group, or options) with the reference packages' keys (:data:`REFERENCE_KEYS`) as ours; a
    reference key at a value we cannot honour (:data:`REFERENCE_FIXED`), or beside our own key at another value,
    is refused by name. Without this they passed through as metadata: ``scale_type="tensor"`` trained with
    channel-wise scaling, ``alpha=0.5`` at scale 1, ``correct_bias=False`` with the bias corrected."""
    out = dict(values)
    for key, (value, why, package) in REFERENCE_FIXED.items():
        if key not in out:
            continue
        given = out.pop(key)
        if key == "quant_n_bit" and values.get("quant") is False:
            continue  # no quantized projection: its bit width means nothing
        if not _same_value(given, value):
            raise ValueError(f"{where}: {package}'s {key}={given!r} cannot be honoured: {why}; remove the key "
                             f"(or set it to {value!r})")
    for key, (ours, mapping, package) in REFERENCE_KEYS.items():
        if key not in out:
            continue
        given = out.pop(key)
        if mapping is not None and not any(_same_value(given, k) for k in mapping):
            raise ValueError(f"{where}: {package}'s {key}={given!r}: choose one of "
                             f"{', '.join(repr(k) for k in mapping)} (it sets our {ours!r})")
        value = given if mapping is None else next(v for k, v in mapping.items() if _same_value(given, k))
        if ours in out and out[ours] != value:
            raise ValueError(f"{where}: {package}'s {key}={given!r} means {ours}={value!r}, but {ours}="
                             f"{out[ours]!r} is given too; give one of them")
        out[ours] = value
    return out


def _same_value(given: Any, value: Any) -> bool:
    """``given == value`` of the same kind: ``True`` is not ``1``, and an unhashable or array-like value is no match."""
    if isinstance(value, bool) or isinstance(given, bool):
        return given is value
    return type(given) in (int, float, str) and given == value


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
    param_group = reference_keys(param_group, f"{type(opt).__name__} param group {len(opt.param_groups)}")
    if "betas" in param_group and isinstance(param_group["betas"], list):
        param_group["betas"] = tuple(param_group["betas"])
    param_group.update(plain_numbers({k: v for k, v in param_group.items() if k in known_options(opt)}))
    param_group.setdefault(SKIPPED, 0)  # steps skipped for a non-finite gradient (nonfinite="skip")
    known = known_options(opt)
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


def known_options(opt: "LowRankAdamW") -> list[str]:
    """The group keys ``opt`` reads: its defaults' and every registered rule's and update's, sorted."""
    return sorted({*opt.defaults, *options.part_defaults()})


def check_options(opt: "LowRankAdamW", given: Any, where: str) -> None:
    """Refuse option names ``opt`` does not know among ``given``, the keys a user named as optimizer options
    (``lro.hf``'s ``optim_args``, ``compare``'s ``preset:key=value``). Group keys in general pass through as
    metadata (:func:`normalized`), which there would be a typo that changes nothing while the run is
    labelled with it (``galore:proj_gap=4`` trained at the default gap). ``where`` (may be empty) leads the
    message."""
    known = known_options(opt)
    for key in given:
        if key not in known:
            # a key inside one of ours (proj_gap: update_proj_gap) first, then the closest spelling
            close = [k for k in known if str(key) in k] or difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"{type(opt).__name__} takes {', '.join(known)}"
            raise ValueError(f"{where + ': ' if where else ''}unknown option {key!r}; {hint}")


def as_params(params: Any, where: str, given: dict[str, Any]) -> Any:
    """The constructor's ``params``: a model (``nn.Module``) becomes ``lro.param_groups(model)``. Refuses a
    ``scale`` given beside ``match_adamw_rms=True`` (both set the update's size)."""
    if given.get("match_adamw_rms") is True and "scale" in given:
        raise ValueError(f"{where}: scale={given['scale']!r} and match_adamw_rms=True both set the update's size; "
                         "give one of them (match_adamw_rms=True sets scale from the rank and the width)")
    if isinstance(params, nn.Module):
        from ..groups import param_groups

        # match_adamw_rms scales each short side on its own (lro.param_groups: one group per short side)
        return param_groups(params, **({"match_adamw_rms": True} if given.get("match_adamw_rms") is True else {}))
    return params


def resolved(opt: "LowRankAdamW", param_group: dict[str, Any]) -> dict[str, Any]:
    """``param_group`` with ``rank="auto"``, ``match_adamw_rms`` and ``scale="auto"`` turned into numbers, once,
    when it joins.

    ``rank="auto"`` (``lro.param_groups``' default) takes an integer ``rank`` given to the constructor,
    else the preset's :func:`auto_rank` of the group's weights. ``match_adamw_rms=True`` sets ``scale``
    to :func:`adamw_rms_scale`, so that the group's low-rank update has the RMS of an AdamW update and
    AdamW's learning rate carries over; a ``scale`` given beside it is an error. ``scale="auto"`` (APOLLO-Mini's
    default) is the preset's :func:`auto_scale` of the group's width. What is stored (and
    saved in ``state_dict()``) is the numbers, so a checkpoint loads into any optimizer built the same way.
    """
    merged = {**options.part_defaults(), **opt.defaults, **param_group}
    where = f"{type(opt).__name__} param group {len(opt.param_groups)}"
    if merged.get("rank") == options.AUTO_RANK:
        ctor = opt.defaults.get("rank")
        fixed = ctor if isinstance(ctor, int) and not isinstance(ctor, bool) else None
        param_group = {**param_group, "rank": fixed or auto_rank(type(opt), _short_side(param_group["params"]))}
    if merged.get("match_adamw_rms") is True and merged.get("rule") in _rules.REGISTRY:
        param_group = {**param_group, **_rules.get(merged["rule"]).adamw_rms_keys(merged)}
    rank = param_group.get("rank", merged.get("rank"))
    # an invalid rank (0, negative, not an integer) is left for check_group's error naming it
    valid = isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1
    if merged.get("match_adamw_rms") is True and valid:
        if "scale" in param_group:
            raise ValueError(f"{where}: scale={param_group['scale']!r} and match_adamw_rms=True both set the update's "
                             "size; give one of them (match_adamw_rms=True sets scale from the rank and the width)")
        d = _short_side(param_group["params"])
        explicit = frozenset(param_group) | getattr(opt, "_given", frozenset())
        param_group = {**param_group, "scale": adamw_rms_scale(merged, d, rank),
                       **_updates.for_group(merged).adamw_rms_keys(merged, explicit)}
    if param_group.get("scale", merged.get("scale")) == options.AUTO_RANK:
        param_group = {**param_group, "scale": auto_scale(type(opt), _short_side(param_group["params"]), where)}
    projector = _projectors.REGISTRY.get(merged.get("projector"))
    if projector is not None and projector.learns_after_use and "osd_lr0" not in param_group:
        lr = merged.get("lr")  # an invalid lr is left for check_group's error
        if isinstance(lr, (int, float, Tensor)) and not isinstance(lr, bool):
            param_group = {**param_group, "osd_lr0": float(lr)}  # policies.lr_ratio's lr_0
    return param_group


def _short_side(params: list[Any]) -> int:
    """The most common short side among the group's 2-D parameters (the model's width for the linear
    layers of a transformer; ties go to the larger), 0 without any."""
    sides = Counter(min(t.shape) for t in (x[1] if isinstance(x, tuple) else x for x in params)
                    if isinstance(t, Tensor) and t.dim() == 2)
    if not sides:
        return 0
    return max(sides, key=lambda s: (sides[s], s))


def auto_rank(cls: type, short_side: int) -> int:
    """The rank a preset gives a group that asks for one without a number: its ``default_rank`` if it
    fixes one (APOLLO-Mini: 1), else a quarter of the weights' short side, the GaLore and APOLLO papers'
    ranks (128, 256, 512, 1024 at widths 512, 1024, 2048, 4096), which also fits any smaller width."""
    fixed = getattr(cls, "default_rank", None)
    if fixed is not None:
        return int(fixed)
    return max(1, short_side // 4)


def auto_scale(cls: type, short_side: int, where: str) -> float:
    """The ``scale`` of a group with ``scale="auto"``: the preset's ``width_scale(short_side)`` (APOLLO-Mini's
    default); a preset without one refuses it."""
    rule = getattr(cls, "width_scale", None)
    if rule is None:
        raise ValueError(f"{where}: scale='auto' is for presets with a width rule (APOLLOMini); give "
                         f"{cls.__name__} a number (its default is {cls.method_defaults()['scale']!r})")
    return float(rule(short_side))


def adamw_rms_scale(group: dict[str, Any], short_side: int, rank: int) -> float:
    """The ``scale`` that gives a d×n weight's low-rank update (d the projected short side, r the rank)
    the RMS of the subspace's Adam direction N, which is an AdamW update's.

    project_back(N) spreads the r·n entries of N over d·n: with an orthonormal basis its RMS is
    RMS(N)·√(r/d), so ``scale`` = √(d/r). APOLLO's scaled gradient (``scaling=``) has the norm of N
    (a Gaussian projection keeps norms), so its RMS is RMS(N)·√(r/d) as well; there √scale multiplies
    it, so ``scale`` = d/r. A weight too small to project (d ≤ r) gets 1 (it is stepped as AdamW)."""
    if short_side <= rank:
        return 1.0
    ratio = short_side / rank
    return float(ratio) if group.get("scaling") is not None else math.sqrt(ratio)


def check_parameters(group: dict[str, Any], params: list[Any], where: str) -> None:
    """Refuse, naming the parameter, what the group's parts cannot step: complex tensors, float16 ones
    under ``stochastic_rounding=True``, unsupported FSDP2 layouts and options, a rule's own refusals."""
    rule = _rules.get(group["rule"])
    for k, item in enumerate(params):
        tensor = item[1] if isinstance(item, tuple) else item
        name = f"'{item[0]}'" if isinstance(item, tuple) else f"#{k}"
        if not isinstance(tensor, Tensor):
            continue
        if tensor.is_complex():
            raise ValueError(f"{where}: parameter {name} is complex; lowrank-optim steps real floating-point "
                             "parameters only, plain groups included (its projections, 8-bit states and kernels "
                             "are real). Give complex parameters a torch.optim.AdamW of their own, or keep them "
                             "as real pairs (torch.view_as_real)")
        if group["stochastic_rounding"] is True and tensor.dtype == torch.float16:
            raise ValueError(f"{where}: parameter {name} is float16, and stochastic_rounding=True rounds updates "
                             "into bf16 (and INT8) weights only; a float16 weight would be rounded to nearest. "
                             "Use bf16 weights, or leave stochastic_rounding at None for this group")
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
    rounding = bool(group["stochastic_rounding"])
    if rounding:
        parts.append("stochastic_rounding=True")
    if is_low_rank(p, group):
        side = choose_side(tuple(p.shape), group["proj_type"])
        why = _projectors.REGISTRY[group["projector"]].shard_error(side, group["projector_options"])
        if why:
            parts.append(why)
        why = _updates.for_group(group).shard_error(group)
        if why:
            parts.append(why)
    if not parts:
        return None
    fixes = [fix for fix, needed in (("another projector or option", len(parts) > rounding),
                                     ("no stochastic rounding", rounding)) if needed]
    return (f"parameter {name} is an FSDP2 shard, and {' and '.join(parts)} {'is' if len(parts) == 1 else 'are'} "
            f"not built for FSDP2 shards yet; on FSDP2 use {' and '.join(fixes)} (or train without FSDP2)")


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
    """Whether ``p`` is stepped in a subspace under ``group``'s options: 2-D, its short side above ``rank``
    and, with ``max_dim`` (DCTAdamW's 32000: embeddings and heads), its long side below ``max_dim``."""
    rank, max_dim = group["rank"], group.get("max_dim")
    return (rank is not None and p.dim() == 2 and min(p.shape) > rank
            and (max_dim is None or max(p.shape) < max_dim))
