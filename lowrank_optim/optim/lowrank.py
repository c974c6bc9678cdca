"""LowRankAdamW: the core optimizer every preset configures.

For a parameter W (m×n) in a group with ``rank`` r < min(m, n), step t does::

    if (t − 1) % update_proj_gap == 0:  P ← projector.update(G)     # refresh, before the increment
    R = project(G)                                                  # r×n or m×r
    N = Adam(R)  =  M̂ / (√V̂ + ε)                                     # moments of R's shape, fp32
    W ← (1 − lr·wd)·W − lr·scale·project_back(N)                    # one fused addmm_

Every other parameter (no ``rank`` in its group, not 2-D, or a short side ≤ rank) is updated by
torch's own AdamW, so it gets the same numbers as ``torch.optim.AdamW``.

Weight decay is decoupled and taken from the weights before the update, as in Loshchilov & Hutter
and ``torch.optim.AdamW``; galore-torch decays the already-updated weights instead (a difference of
order lr²·wd per step).

Dtypes: low-rank moments are float32 whatever the parameter's dtype (they are small); the SVD runs
in float32; the basis is kept and the projections run in the parameter's dtype. Plain parameters are
torch's AdamW exactly, moments in their own dtype (bf16 for bf16), except float16 parameters, which
keep float32 moments and are stepped through a float32 copy rounded once.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from copy import deepcopy
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import distributed, kernels
from .. import projectors as _projectors
from ..projectors import PROJ_TYPES, NonFiniteGradientError, Projector
from ..projectors.base import choose_side
from ..projectors.random_proj import mix_seed
from ..quant.weights import Int8Weight
from ..rules import RULES, adafactor, adam_direction, adamw_plain, orthogonal
from . import policies
from .policies import ON_REFRESH, REFRESH, RESIDUAL, SCALING

# Low-rank tensors are stepped in chunks of about this many bytes: foreach kernels amortise launch
# cost across small layers, while a 7B model never holds every layer's R and N at once.
CHUNK_BYTES = 64 * 2**20

STATE_BITS = (32, 8)
PROJ_BITS = (32, 4)

def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low-rank moments are kept in float32 at least: float64 weights keep float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def plain_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Plain parameters' moments: the parameter's dtype, as torch.optim.AdamW keeps them (bf16 for
    bf16 weights), except float16, whose range would flush Adam's V = g² to zero: float32 there."""
    return torch.float32 if dtype == torch.float16 else dtype


def uses_8bit(group: dict[str, Any], moment_numel: int) -> bool:
    """Whether a moment of ``moment_numel`` elements is stored as blockwise INT8 in ``group``."""
    return group["state_bits"] == 8 and moment_numel >= group["min_8bit_size"]


def rounds_stochastically(group: dict[str, Any], p: Tensor) -> bool:
    """Whether ``p``'s updates are written by stochastic rounding: INT8 weights unless the group
    says ``stochastic_rounding=False``; bf16 weights when it says True."""
    flag = group["stochastic_rounding"]
    if isinstance(p, Int8Weight):
        return flag is not False
    return bool(flag) and p.dtype == torch.bfloat16


class RankFallbackWarning(UserWarning):
    """A parameter in a rank group is too small to project and is updated as plain AdamW."""


@dataclass
class _LowRankItem:
    param: Tensor
    projector: Projector
    previous: Projector | None  # the projector before this step's refresh, if it refreshed


class _PresetDefault:
    """Marks a constructor argument left to the preset (``None`` is a real value for some keys)."""

    def __repr__(self) -> str:
        return "<preset default>"


PRESET_DEFAULT: Any = _PresetDefault()


def _is_number(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.is_complex()
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_hyperparameters(group: dict[str, Any], where: str) -> None:
    """Validate one parameter group's options; every message names the option and the fix."""

    def fail(key: str, why: str) -> None:
        raise ValueError(f"{where}: invalid {key}={group[key]!r}: {why}")

    lr = group["lr"]
    if not _is_number(lr) or not float(lr) >= 0.0 or not math.isfinite(float(lr)):
        fail("lr", "the learning rate must be a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        fail("betas", "pass a pair (beta1, beta2), each in [0, 1)")
    for i, b in enumerate(betas):
        if not _is_number(b) or not 0.0 <= float(b) < 1.0:
            fail("betas", f"beta{i + 1} must be in [0, 1), got {b!r}")
    if not _is_number(group["eps"]) or not 0.0 <= float(group["eps"]) < math.inf:
        fail("eps", "eps must be a finite number >= 0")
    if not _is_number(group["weight_decay"]) or not 0.0 <= float(group["weight_decay"]) < math.inf:
        fail("weight_decay", "weight_decay must be a finite number >= 0")
    rank = group.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        fail("rank", "rank must be an integer >= 1 (or None for plain AdamW)")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        fail("update_proj_gap", "the refresh interval must be an integer >= 1 (steps between refreshes)")
    scale = group["scale"]
    if not _is_number(scale) or not 0.0 < float(scale) < math.inf:
        fail("scale", "scale must be a finite number > 0 (GaLore uses 0.25)")
    if group["proj_type"] not in PROJ_TYPES:
        fail("proj_type", f"choose one of {', '.join(PROJ_TYPES)}")
    if group["projector"] not in _projectors.REGISTRY:
        fail("projector", f"choose one of {', '.join(_projectors.available())}")
    if group["foreach"] not in (None, True, False):
        fail("foreach", "foreach must be None, True or False")
    if group["residual"] not in RESIDUAL:
        fail("residual", f"choose one of {', '.join(RESIDUAL)}")
    rls = group["residual_lr_scale"]
    if not _is_number(rls) or not 0.0 <= float(rls) < math.inf:
        fail("residual_lr_scale", "residual_lr_scale must be a finite number >= 0")
    if group["scaling"] not in SCALING:
        fail("scaling", "choose None, 'channel' or 'tensor'")
    if group["residual"] != "drop" and not _projectors.REGISTRY[group["projector"]].orthonormal:
        fail("residual", f"the residual G - project_back(project(G)) needs an orthonormal basis, and "
             f"projector={group['projector']!r} has none; use residual='drop' or one of "
             f"{', '.join(n for n, c in sorted(_projectors.REGISTRY.items()) if c.orthonormal)}")
    if group["scaling"] is not None and group["residual"] != "drop":
        fail("scaling", f"scaling rescales the whole gradient, so it leaves no residual; it needs "
             f"residual='drop', got residual={group['residual']!r}")
    limiter = group["limiter"]
    if limiter is not None and (not _is_number(limiter) or not 1.0 <= float(limiter) < math.inf):
        fail("limiter", "the norm-growth limit must be None (off) or a number >= 1 (APOLLO and Fira use 1.01)")
    if group["on_refresh"] not in ON_REFRESH:
        fail("on_refresh", f"choose one of {', '.join(ON_REFRESH)}")
    if group["refresh"] not in REFRESH:
        fail("refresh", f"choose one of {', '.join(REFRESH)}")
    if not isinstance(group["projector_options"], dict):
        fail("projector_options", "pass a dict of keyword options for the projector, e.g. {'power_iters': 1}")
    if group["state_bits"] not in STATE_BITS or isinstance(group["state_bits"], bool):
        fail("state_bits", "choose 32 (float32 moments) or 8 (blockwise INT8 moments)")
    mins = group["min_8bit_size"]
    if isinstance(mins, bool) or not isinstance(mins, int) or mins < 0:
        fail("min_8bit_size", "the smallest moment (in elements) kept as INT8 must be an integer >= 0 (default 4096)")
    if group["proj_bits"] not in PROJ_BITS or isinstance(group["proj_bits"], bool):
        fail("proj_bits", "choose 32 (the basis in the gradient's dtype) or 4 (INT4, as Q-GaLore)")
    if group["proj_bits"] == 4 and not getattr(_projectors.REGISTRY[group["projector"]], "quantizable", False):
        fail("proj_bits", f"projector={group['projector']!r} stores no dense basis to quantize; INT4 "
             f"projections need one of {', '.join(n for n, c in sorted(_projectors.REGISTRY.items()) if getattr(c, 'quantizable', False))}")
    if group["stochastic_rounding"] not in (None, True, False):
        fail("stochastic_rounding", "choose None (INT8 weights only), True (also bf16 weights) or False (round to nearest)")
    rule = group["rule"]
    if rule not in RULES:
        fail("rule", f"choose one of {', '.join(RULES)}")
    if rule != "adam" and group["state_bits"] == 8:
        fail("state_bits", f"INT8 states are built for Adam's two moments; rule={rule!r} keeps "
             f"{'row and column statistics' if rule == 'adafactor' else 'one momentum'} in float32. "
             "Use state_bits=32 with this rule, or rule='adam'")
    momentum = group["momentum"]
    if momentum is not None and (not _is_number(momentum) or not 0.0 <= float(momentum) < 1.0):
        fail("momentum", "the momentum (first-moment) coefficient must be in [0, 1), or None for the rule's default "
             f"(orthogonal: {orthogonal.DEFAULT_MOMENTUM}; adafactor: no first moment)")
    if group["nesterov"] not in (True, False):
        fail("nesterov", "choose True or False")
    if group["orthogonalize"] not in orthogonal.METHODS:
        fail("orthogonalize", f"choose one of {', '.join(orthogonal.METHODS)}")
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
        fail("ns_steps", "the number of Newton-Schulz iterations must be an integer in [1, 100) (Muon uses 5)")
    decay = group["beta2_decay"]
    if not _is_number(decay) or not -math.inf < float(decay) <= 0.0:
        fail("beta2_decay", "Adafactor's decay exponent c (beta2_t = 1 - t^c) must be a finite number <= 0 (the paper uses -0.8)")
    clip = group["clip_threshold"]
    if not _is_number(clip) or not 0.0 < float(clip) < math.inf:
        fail("clip_threshold", "Adafactor's update clipping threshold d must be a finite number > 0 (the paper uses 1)")


class LowRankAdamW(Optimizer):
    """AdamW whose 2-D weights are stepped in a low-rank subspace (the shared core of every preset).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``; a group with an integer
            ``rank`` projects its 2-D weights (``lro.param_groups`` builds such groups), a group
            without one is plain AdamW. ``(name, tensor)`` pairs give warnings and errors names.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (same defaults).
        rank: default rank for groups that do not set one (None: only groups that set it project).
        update_proj_gap: steps between subspace refreshes (refresh when ``step % gap == 0``).
        scale: the low-rank update is multiplied by this (GaLore's α).
        proj_type: ``std``, ``reverse_std``, ``left`` or ``right`` (see ``lro.projectors``).
        projector: a name from ``lro.projectors.available()``; ``projector_options`` a dict of its
            keyword options (e.g. ``{"power_iters": 1}`` for ``rsvd``).
        residual: what happens to G − project_back(project(G)): ``drop`` (GaLore), ``sign``
            (FRUGAL: −lr·residual_lr_scale·sign), ``sgd`` (−lr·residual_lr_scale·residual) or
            ``fira`` (scaled per channel by ‖N‖/‖R‖, added to the update).
        scaling: ``None``, or ``channel`` / ``tensor`` (APOLLO): the update is the raw gradient
            scaled by ‖N‖/‖R‖ per channel or per tensor, times √scale, instead of project_back(N).
        limiter: None, or γ ≥ 1: the full-rank term (APOLLO's scaled gradient, Fira's scaled
            residual) may not grow faster than γ per step.
        on_refresh: what the moments do when the subspace changes: ``keep``, ``reset``, ``rotate``.
        refresh: ``fixed`` (every update_proj_gap steps) or ``lazy`` (Q-GaLore's per-layer schedule).
        state_bits: 32, or 8 for Adam moments stored as blockwise INT8 (a dynamic code book per
            block of 256, dequantized for the update and requantized after it), for every moment of
            at least ``min_8bit_size`` (4096) elements, low-rank and plain alike; smaller ones stay
            float32, as in bitsandbytes' 8-bit Adam.
        proj_bits: 32, or 4 to store the basis of ``svd`` / ``rsvd`` as INT4 (Q-GaLore).
        stochastic_rounding: how updates are written into low-precision weights: ``None`` rounds
            INT8 weights (``lro.quantize_model_int8``) stochastically and bf16 weights to nearest;
            ``True`` rounds both stochastically; ``False`` both to nearest.
        rule: the inner rule on the low-rank tensor: ``adam``, ``adafactor`` (factored second
            moment, update clipping; plain parameters of the group get Adafactor too) or
            ``orthogonal`` (one momentum, orthogonalized; plain parameters stay AdamW, as Muon
            advises). See ``lro.rules``.
        momentum: the rule's first-moment coefficient: ``orthogonal``'s μ (None: 0.95), or
            ``adafactor``'s optional β₁ (None: no first moment). Adam uses ``betas``.
        nesterov: ``orthogonal`` orthogonalizes R + μM instead of M (torch.optim.Muon's default).
        orthogonalize: ``svd`` (exact U Vᵀ, SUMO) or ``newton_schulz`` (Muon's 5-step iteration,
            ``ns_steps``).
        beta2_decay, clip_threshold: Adafactor's decay exponent c (β̂₂ₜ = 1 − t^c, −0.8) and update
            clipping threshold d (1.0); its ε₁ is ``eps``.
        Method keys left at ``<preset default>`` take the class's ``method_defaults()``.
        foreach: torch's multi-tensor AdamW for the plain parameters (None: yes; False: one tensor
            at a time; both give the same numbers on CPU).

    Per-group keys override these defaults. ``state_dict()`` holds tensors and plain values only.
    """

    #: Defaults of the method's own keys; a preset overrides some of them, an argument all.
    preset: ClassVar[dict[str, Any]] = {}
    base_defaults: ClassVar[dict[str, Any]] = dict(
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
        state_bits=32,
        min_8bit_size=4096,
        proj_bits=32,
        stochastic_rounding=None,
        rule="adam",
        momentum=None,
        nesterov=False,
        orthogonalize="svd",
        ns_steps=5,
        beta2_decay=-0.8,
        clip_threshold=1.0,
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = None,
        update_proj_gap: int = PRESET_DEFAULT,
        scale: float = PRESET_DEFAULT,
        proj_type: str = PRESET_DEFAULT,
        projector: str = PRESET_DEFAULT,
        projector_options: dict[str, Any] = PRESET_DEFAULT,
        residual: str = PRESET_DEFAULT,
        residual_lr_scale: float = PRESET_DEFAULT,
        scaling: str | None = PRESET_DEFAULT,
        limiter: float | None = PRESET_DEFAULT,
        on_refresh: str = PRESET_DEFAULT,
        refresh: str = PRESET_DEFAULT,
        state_bits: int = PRESET_DEFAULT,
        min_8bit_size: int = PRESET_DEFAULT,
        proj_bits: int = PRESET_DEFAULT,
        stochastic_rounding: bool | None = PRESET_DEFAULT,
        rule: str = PRESET_DEFAULT,
        momentum: float | None = PRESET_DEFAULT,
        nesterov: bool = PRESET_DEFAULT,
        orthogonalize: str = PRESET_DEFAULT,
        ns_steps: int = PRESET_DEFAULT,
        beta2_decay: float = PRESET_DEFAULT,
        clip_threshold: float = PRESET_DEFAULT,
        foreach: bool | None = None,
    ) -> None:
        given = dict(
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            projector=projector,
            projector_options=projector_options,
            residual=residual,
            residual_lr_scale=residual_lr_scale,
            scaling=scaling,
            limiter=limiter,
            on_refresh=on_refresh,
            refresh=refresh,
            state_bits=state_bits,
            min_8bit_size=min_8bit_size,
            proj_bits=proj_bits,
            stochastic_rounding=stochastic_rounding,
            rule=rule,
            momentum=momentum,
            nesterov=nesterov,
            orthogonalize=orthogonalize,
            ns_steps=ns_steps,
            beta2_decay=beta2_decay,
            clip_threshold=clip_threshold,
        )
        method = {**self.method_defaults(), **{k: v for k, v in given.items() if v is not PRESET_DEFAULT}}
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            foreach=foreach,
            **method,
        )
        check_hyperparameters(defaults, f"{type(self).__name__}()")
        self._projectors: dict[Tensor, Projector] = {}
        super().__init__(params, defaults)
        if not any(g["rank"] is not None for g in self.param_groups):
            warnings.warn(
                f"{type(self).__name__}: no parameter group sets 'rank', so every parameter is "
                f"updated without projection (plain {'Adafactor' if self.defaults['rule'] == 'adafactor' else 'AdamW'}). Build the groups with lro.param_groups(model, rank=...) "
                "or pass rank= to the optimizer.",
                RankFallbackWarning,
                stacklevel=2,
            )

    @classmethod
    def method_defaults(cls) -> dict[str, Any]:
        """This class's defaults for the method keys (``update_proj_gap``, ``scale``, ...)."""
        return deepcopy({**cls.base_defaults, **cls.preset})

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        param_group = dict(param_group)
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("parameters must be given in an ordered collection (a list), not a set")
        elif params is None:
            raise ValueError("a parameter group needs a 'params' entry")
        param_group["params"] = params = list(params)
        if "betas" in param_group and isinstance(param_group["betas"], list):
            param_group["betas"] = tuple(param_group["betas"])

        index = len(self.param_groups)
        for key in param_group:
            if key in self.defaults or key in ("params", "param_names"):
                continue
            # Other keys pass through as metadata (frameworks attach names, lr multipliers...), but a
            # near-miss of one of ours is a typo that would silently change nothing.
            close = difflib.get_close_matches(str(key), list(self.defaults), n=1, cutoff=0.75)
            if close:
                raise ValueError(
                    f"{type(self).__name__} param group {index}: unknown option {key!r}; did you mean {close[0]!r}?"
                )
        merged = {**self.defaults, **param_group}
        check_hyperparameters(merged, f"{type(self).__name__} param group {index}")
        for item in params:
            tensor = item[1] if isinstance(item, tuple) else item
            if isinstance(tensor, Tensor) and tensor.is_complex():
                name = f"'{item[0]}'" if isinstance(item, tuple) else f"#{params.index(item)}"
                raise ValueError(
                    f"{type(self).__name__} param group {index}: parameter {name} is complex; "
                    "only real floating-point parameters are supported"
                )
        for k, item in enumerate(params):
            tensor = item[1] if isinstance(item, tuple) else item
            if distributed.is_sharded(tensor):
                name = f"'{item[0]}'" if isinstance(item, tuple) else f"#{k}"
                why = distributed.layout_error(tensor, name)
                if why is None and (unsupported := self._sharded_unsupported(merged, tensor)):
                    why = f"parameter {name} is an FSDP2 shard, and {unsupported}"
                if why:
                    raise ValueError(f"{type(self).__name__} param group {index}: {why}")
        if merged["rule"] == "orthogonal" and merged["rank"] is not None:
            for k, item in enumerate(params):
                tensor = item[1] if isinstance(item, tuple) else item
                if isinstance(tensor, Tensor) and tensor.dim() == 2 and min(tensor.shape) < merged["rank"]:
                    name = f"'{item[0]}'" if isinstance(item, tuple) else f"#{k}"
                    raise ValueError(
                        f"{type(self).__name__} param group {index}: parameter {name} has shape "
                        f"{tuple(tensor.shape)}, and rank={merged['rank']} is above its short side "
                        f"{min(tensor.shape)}: rule='orthogonal' cannot orthogonalize in a subspace larger "
                        f"than the matrix. Use a rank of at most {min(tensor.shape)}, or leave this "
                        "parameter out of the rank group"
                    )
        super().add_param_group(param_group)

        group = self.param_groups[-1]
        if group["rank"] is None:
            return
        for i, p in enumerate(group["params"]):
            if p.dim() == 2 and min(p.shape) <= group["rank"]:
                warnings.warn(
                    f"{type(self).__name__}: parameter {self._label(group, i)} has shape "
                    f"{tuple(p.shape)}; its short side {min(p.shape)} is not larger than rank "
                    f"{group['rank']}, so it is updated as plain AdamW. Use a rank below "
                    f"{min(p.shape)} to project it.",
                    RankFallbackWarning,
                    stacklevel=3,
                )

    def _sharded_unsupported(self, group: dict[str, Any], p: Tensor) -> str | None:
        """Why ``group``'s options cannot step the row-sharded ``p`` (None: they can)."""
        low = self.is_low_rank(p, group)
        parts = []
        if group["stochastic_rounding"]:
            parts.append("stochastic_rounding=True")
        if low:
            if group["projector"] not in distributed.SHARDED_PROJECTORS:
                parts.append(f"projector={group['projector']!r}")
            elif group["projector"] == "dct" and choose_side(tuple(p.shape), group["proj_type"]) == "left":
                parts.append(f"projector='dct' on the left side of a {tuple(p.shape)} weight (its scores need "
                             "the DCT of every row: an m×n all-reduce; use proj_type='right' or 'sparse')")
        if not parts:
            return None
        return (f"{', '.join(parts)} {'is' if len(parts) == 1 else 'are'} not built for FSDP2 shards yet; on "
                f"FSDP2 use the projectors {', '.join(distributed.SHARDED_PROJECTORS)} and no stochastic rounding "
                "(or train without FSDP2)")

    def _label(self, group: dict[str, Any], i: int) -> str:
        """The parameter's name where the groups carry names, else its position."""
        names = group.get("param_names")
        if names is not None:
            return f"'{names[i]}'"
        gi = next((k for k, g in enumerate(self.param_groups) if g is group), None)
        return f"#{i}" if gi is None else f"#{i} of param group {gi}"

    @staticmethod
    def is_low_rank(p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` is stepped in a subspace under ``group``'s options."""
        rank = group["rank"]
        return rank is not None and p.dim() == 2 and min(p.shape) > rank

    # ------------------------------------------------------------------ projectors
    def _position(self, p: Tensor) -> int:
        """``p``'s index among all parameters: the same on every rank and across a checkpoint."""
        return next(
            (k for k, q in enumerate(chain.from_iterable(g["params"] for g in self.param_groups)) if q is p), 0
        )

    def _rounding_seed(self, p: Tensor) -> int:
        """The seed of this step's stochastic rounding of ``p``: from its position and step count,
        so a resumed run draws the same numbers as an uninterrupted one."""
        return mix_seed(self._position(p), int(self.state[p]["step"]), 0x5EED)

    def _writable(self, group: dict[str, Any], p: Tensor) -> tuple[Tensor, Callable[[], None] | None]:
        """The tensor to apply ``p``'s update to, and what writes it back (None: ``p`` itself).

        An INT8 weight is dequantized to a float32 copy and requantized after; a bf16 weight that
        rounds stochastically is updated in a float32 copy and rounded once."""
        if isinstance(p, Int8Weight):
            work = p.dequantize(torch.float32)
            stochastic = rounds_stochastically(group, p)
            return work, lambda: p.requantize_(work, stochastic=stochastic, seed=self._rounding_seed(p))
        if rounds_stochastically(group, p):
            work = p.detach().float()

            def write() -> None:
                p.detach().copy_(kernels.stochastic_round_bf16(work.view(-1), seed=self._rounding_seed(p)).view(p.shape))

            return work, write
        return p.detach(), None

    def _plain_moment_dtype(self, group: dict[str, Any], p: Tensor) -> torch.dtype:
        """float32 for parameters stepped through a float32 copy (INT8, stochastic bf16), else
        :func:`plain_state_dtype`."""
        if isinstance(p, Int8Weight) or rounds_stochastically(group, p):
            return torch.float32
        return plain_state_dtype(p.dtype)

    def _new_projector(self, group: dict[str, Any], p: Tensor) -> Projector:
        # Each parameter's random projections start from its position in the optimizer, which is the
        # same on every rank and across a checkpoint.
        position = self._position(p)
        cls = _projectors.REGISTRY[group["projector"]]
        options = {**cls.options_from_group(group), **group["projector_options"]}
        try:
            return cls(group["rank"], proj_type=group["proj_type"], seed=position, **options)
        except TypeError as err:
            raise ValueError(f"projector {group['projector']!r} does not take these options: {err}") from None

    def _shard(self, p: Tensor) -> distributed.RowShard | None:
        """Where this rank's rows of an FSDP2 parameter lie (None for an ordinary tensor)."""
        if not distributed.is_sharded(p):
            return None
        shards = self.__dict__.setdefault("_shards", {})
        shard = shards.get(p)
        if shard is None:
            shard = shards[p] = distributed.row_shard(p)
        return shard

    def _export_projector(self, p: Tensor, proj: Projector) -> dict[str, Any]:
        """The projector's state for ``self.state``: on shards, this rank's rows of a left-side basis
        become a DTensor sharded like the parameter (so distributed checkpoints keep every rank's)."""
        out = proj.state_dict()
        shard = self._shard(p)
        if shard is not None and isinstance(out.get("P"), Tensor):
            if proj.side == "left":
                out["P"] = shard.wrap(out["P"], shard.shape[0])
            else:
                out["P"] = shard.wrap_cols(out["P"], shard.shape[1])
        elif shard is not None and isinstance(out.get("P_packed"), Tensor):
            # an INT4 basis quantized in groups inside this rank's piece: its arrays padded to the largest
            # piece's lengths on every rank (an even Shard(0)), its shape the whole basis's
            m, n = shard.shape
            r = proj.rank
            largest = (-(-m // shard.world), r) if proj.side == "left" else (r, -(-n // shard.world))
            numel = math.prod(largest)
            group = int(out["P_group"])
            for key, length in (("P_packed", -(-numel // 2)), ("P_scale", -(-numel // group)), ("P_zero", -(-numel // group))):
                padded = out[key].new_zeros(length)
                padded[: out[key].numel()] = out[key]
                out[key] = shard.wrap(padded, shard.world * length)
            out["P_shape"] = [m, r] if proj.side == "left" else [r, n]
        return out

    def _import_projector(self, p: Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`_export_projector`: this rank's piece of a saved projector state."""
        shard = self._shard(p)
        saved = {k: (v.to_local() if distributed.is_sharded(v) else v) for k, v in saved.items()}
        if shard is not None and isinstance(saved.get("P_packed"), Tensor) and saved.get("side") in ("left", "right"):
            m, n = shard.shape
            rows, cols = saved["P_shape"]
            if saved["side"] == "left":
                local = (shard.rows, cols)
            else:
                start, stop = shard.cols(n)
                local = (rows, stop - start)
            numel = math.prod(local)
            group = int(saved["P_group"])
            saved["P_packed"] = saved["P_packed"][: -(-numel // 2)]
            saved["P_scale"] = saved["P_scale"][: -(-numel // group)]
            saved["P_zero"] = saved["P_zero"][: -(-numel // group)]
            saved["P_shape"] = list(local)
        return saved

    def _projector(self, p: Tensor, group: dict[str, Any]) -> Projector:
        proj = self._projectors.get(p)
        if proj is None:
            proj = self._new_projector(group, p)
            saved = self.state.get(p, {}).get("projector")
            if saved is not None:
                proj.load_state_dict(self._import_projector(p, saved))
            self._projectors[p] = proj
        return proj

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` (re-evaluating the loss) runs with grad enabled.

        Every check (sparse gradients, non-finite gradients at a refresh, the refresh itself) runs
        for all parameters before any weight or state is written, so a step that raises leaves the
        model and the optimizer exactly as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_subset(None)
        return loss

    @torch.no_grad()
    def step_parameters(self, params: Iterable[Tensor]) -> None:
        """Step only ``params`` (those of them with a gradient), exactly as :meth:`step` would.

        For layer-wise updates: a parameter stepped alone gets the same numbers as in a full
        step, and the same guarantee holds: if anything fails, nothing of these parameters changes.
        Step hooks (``register_step_pre_hook``) run only around :meth:`step`.
        """
        self._step_subset({id(p) for p in params})

    def _step_subset(self, only: set[int] | None) -> None:
        plans = [self._plan(group, only) for group in self.param_groups]
        for group, (plain, low) in zip(self.param_groups, plans):
            self._step_plain(group, plain)
            self._step_low_rank(group, low)

    def _plan(self, group: dict[str, Any], only: set[int] | None = None) -> tuple[list[Tensor], list[_LowRankItem]]:
        """Sort the group's parameters and refresh projectors, writing nothing."""
        plain: list[Tensor] = []
        low: list[_LowRankItem] = []
        for i, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None or (only is not None and id(p) not in only):
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__}: parameter {self._label(group, i)} has a sparse gradient, "
                    "which is not supported; use torch.optim.SparseAdam for it or build the "
                    "embedding with sparse=False"
                )
            if not self.is_low_rank(p, group):
                plain.append(p)
                continue
            state = self.state.get(p, {})
            step = int(state["step"]) if "step" in state else 0
            # The first step starts from a fresh projector, whatever init_state() put there.
            proj = self._projector(p, group) if step else self._new_projector(group, p)
            previous = None
            refresh = (
                proj.refresh_every_step
                or step % policies.current_gap(state, group) == 0
                or not proj.initialized
            )
            if refresh:
                previous = proj
                try:
                    shard = self._shard(p)
                    proj = proj.refreshed(grad) if shard is None else distributed.refresh_sharded(proj, grad.to_local(), shard)
                except NonFiniteGradientError as err:
                    raise NonFiniteGradientError(
                        f"{type(self).__name__}: parameter {self._label(group, i)} has a non-finite "
                        f"gradient at a subspace refresh (step {step}): {err}. Weights and optimizer "
                        "state are unchanged; skip this step (torch.amp.GradScaler does) or lower "
                        "the learning rate."
                    ) from None
            low.append(_LowRankItem(p, proj, previous))
        return plain, low

    def _step_plain(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if not params:
            return
        beta1, beta2 = group["betas"]
        hyper = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            foreach=group["foreach"],
        )
        if self.rule_of(group, low_rank=False) == "adafactor":
            self._step_plain_adafactor(group, params)
            return
        full: list[Tensor] = []
        half: list[Tensor] = []
        eight: list[Tensor] = []
        for p in params:
            state = self.state[p]
            if not state:
                state.update(self._fresh_state(group, p, p.shape, self._plain_moment_dtype(group, p)))
            if policies.is_8bit(state):
                eight.append(p)
            elif state["exp_avg"].dtype == p.dtype and not isinstance(p, Int8Weight):
                full.append(p)
            else:
                half.append(p)

        def moments(ps: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
            states = [self.state[p] for p in ps]
            return (
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
            )

        if full:
            adamw_plain(full, [p.grad for p in full], *moments(full), **hyper)
        for chunk in _chunks(half, lambda p: 4 * p.numel()):
            works = [self._writable(group, p) for p in chunk]
            masters = [w if write is not None else p.detach().float() for p, (w, write) in zip(chunk, works)]
            adamw_plain(masters, [p.grad.float() for p in chunk], *moments(chunk), **hyper)
            for p, master, (_, write) in zip(chunk, masters, works):
                if write is not None:
                    write()
                else:
                    p.detach().copy_(master)
        for p in eight:
            # 8-bit AdamW: N from the INT8 moments (updated in place), then the decoupled step
            state = self.state[p]
            state["step"] += 1
            if distributed.is_sharded(p):
                local = {k: (v.to_local() if distributed.is_sharded(v) else v) for k, v in state.items()}
                grad = p.grad.to_local()
                direction = self._adam8bit_local(group, local, grad).view(grad.shape)
                work, write = p.to_local(), None
            else:
                direction = self._adam8bit(group, state, p.grad)
                work, write = self._writable(group, p)
            lr = float(group["lr"])
            if group["weight_decay"]:
                work.mul_(1.0 - lr * float(group["weight_decay"]))
            work.add_(direction.view(work.shape).to(work.dtype), alpha=-lr)
            if write is not None:
                write()

    def _step_plain_adafactor(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Adafactor on whole parameters (the plain parameters of an ``adafactor`` group): the rule of
        ``lro.rules.adafactor`` on the gradient itself, W ← (1 − lr·wd)·W − lr·direction."""
        lr = float(group["lr"])
        decay = 1.0 - lr * float(group["weight_decay"])
        for p in params:
            state = self.state[p]
            sdtype = self._plain_moment_dtype(group, p)
            if not state:
                state.update(self._fresh_state(group, p, p.shape, sdtype, "adafactor"))
            state["step"] += 1
            shard = self._shard(p)
            if shard is not None:
                local = {k: (v.to_local() if distributed.is_sharded(v) else v) for k, v in state.items()}
                direction = adafactor.direction(
                    p.grad.to_local().to(sdtype), local, beta2_decay=float(group["beta2_decay"]),
                    eps=float(group["eps"]), clip_threshold=float(group["clip_threshold"]),
                    momentum=None if group["momentum"] is None else float(group["momentum"]),
                    reduce=lambda t: shard.all_reduce_(t, "norms"), rows=p.shape[0],
                )
                work, write = p.to_local(), None
            else:
                direction = self._rule_direction(group, "adafactor", state, p.grad.to(sdtype))
                work, write = self._writable(group, p)
            if decay != 1.0:
                work.mul_(decay)
            work.add_(direction.to(work.dtype), alpha=-lr)
            if write is not None:
                write()

    @staticmethod
    def _rule_direction(group: dict[str, Any], rule: str, state: dict[str, Any], low: Tensor) -> Tensor:
        """The direction of a non-Adam rule from the tensor ``low`` (its state already counts the step)."""
        if rule == "adafactor":
            return adafactor.direction(
                low, state, beta2_decay=float(group["beta2_decay"]), eps=float(group["eps"]),
                clip_threshold=float(group["clip_threshold"]),
                momentum=None if group["momentum"] is None else float(group["momentum"]),
            )
        momentum = orthogonal.DEFAULT_MOMENTUM if group["momentum"] is None else float(group["momentum"])
        return orthogonal.direction(low, state, momentum=momentum, nesterov=bool(group["nesterov"]),
                                    method=group["orthogonalize"], ns_steps=int(group["ns_steps"]))

    @staticmethod
    def _adam8bit(group: dict[str, Any], state: dict[str, Any], grad: Tensor) -> Tensor:
        beta1, beta2 = group["betas"]
        return kernels.adam8bit_direction(
            grad.reshape(-1).float().contiguous(),
            state["exp_avg"].view(-1), state["exp_avg_absmax"],
            state["exp_avg_sq"].view(-1), state["exp_avg_sq_absmax"],
            beta1=beta1, beta2=beta2, eps=float(group["eps"]), step=int(state["step"]),
        ).view(grad.shape)

    @staticmethod
    def rule_of(group: dict[str, Any], low_rank: bool) -> str:
        """The inner rule a parameter follows: the group's, except that a parameter the group does not
        project follows AdamW under ``orthogonal`` (Muon and SUMO keep Adam for embeddings, the head,
        norms and biases) and Adafactor under ``adafactor`` (factored when 2-D)."""
        rule = group["rule"]
        return "adam" if rule == "orthogonal" and not low_rank else rule

    def _fresh_state(self, group: dict[str, Any], p: Tensor, shape: tuple[int, ...] | torch.Size,
                     dtype: torch.dtype, rule: str = "adam") -> dict[str, Tensor]:
        """A fresh step counter and zero state of ``shape`` for ``rule``; for Adam, INT8 codes and
        absmax where the group keeps 8-bit states and the moment is large enough, else ``dtype``."""
        if distributed.is_sharded(p) and tuple(shape) == tuple(p.shape):
            # a plain parameter on FSDP2: moments sharded like it
            shard = self._shard(p)
            local = p.to_local()
            if rule == "adafactor":
                out = adafactor.fresh_state(local.shape, dtype, local.device, group["momentum"])
                for key in ("row_var", "variance", "exp_avg"):
                    if key in out:
                        out[key] = shard.wrap(out[key], p.shape[0])
                return out
            return self._sharded_moments(group, shard, tuple(local.shape), tuple(p.shape), 0, dtype, local.device)
        if rule == "adafactor":
            return adafactor.fresh_state(shape, dtype, p.device, group["momentum"])
        if rule == "orthogonal":
            return orthogonal.fresh_state(shape, dtype, p.device)
        like = torch.empty(shape, dtype=dtype, device=p.device)
        if not uses_8bit(group, like.numel()):
            return _fresh_moments(like, dtype)
        blocks = -(-like.numel() // kernels.BLOCK)
        return {
            "step": torch.tensor(0.0, dtype=torch.float32),
            "exp_avg": torch.zeros(shape, dtype=torch.uint8, device=p.device),
            "exp_avg_sq": torch.zeros(shape, dtype=torch.uint8, device=p.device),
            "exp_avg_absmax": torch.zeros(blocks, dtype=torch.float32, device=p.device),
            "exp_avg_sq_absmax": torch.zeros(blocks, dtype=torch.float32, device=p.device),
        }

    def _step_low_rank(self, group: dict[str, Any], items: list[_LowRankItem]) -> None:
        if not items:
            return
        rule = self.rule_of(group, low_rank=True)
        sharded = [it for it in items if distributed.is_sharded(it.param)]
        if sharded:
            for it in sharded:
                self._step_sharded(group, it, rule)
            items = [it for it in items if not distributed.is_sharded(it.param)]
            if not items:
                return
        if rule != "adam":
            for it in items:
                state, low = self._begin_low_rank(group, it, rule)
                direction = self._rule_direction(group, rule, state, low)
                self._apply_update(group, it.param, it.projector, low, direction)
            return
        beta1, beta2 = group["betas"]
        for chunk in _chunks(items, lambda it: 8 * math.prod(it.projector.low_rank_shape(it.param.shape))):
            lows, exp_avgs, exp_avg_sqs, steps = [], [], [], []
            for it in chunk:
                state, low = self._begin_low_rank(group, it, rule)
                lows.append(low)
                if policies.is_8bit(state):
                    continue
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(int(state["step"]))
            wide = [low for it, low in zip(chunk, lows) if not policies.is_8bit(self.state[it.param])]
            directions = iter(adam_direction(wide, exp_avgs, exp_avg_sqs, steps, beta1, beta2, group["eps"]))
            for it, low in zip(chunk, lows):
                state = self.state[it.param]
                direction = self._adam8bit(group, state, low) if policies.is_8bit(state) else next(directions)
                self._apply_update(group, it.param, it.projector, low, direction)

    # ------------------------------------------------------------------ FSDP2 shards
    #: Rule state entries that follow W's rows on the right side (the rest is replicated).
    _ROW_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "row_var")
    #: Rule state entries kept sharded by the columns of R on the left side (gathered for the step).
    _COL_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "col_var")

    def _sharded_fresh_state(self, group: dict[str, Any], p: Tensor, shard: distributed.RowShard, side: str,
                             low_shape: tuple[int, ...], dtype: torch.dtype, rule: str) -> dict[str, Any]:
        """Fresh rule state for a row-sharded parameter: ``low_shape`` is this rank's piece of R (its rows
        of m×r on the right side, all of r×n on the left); row-following entries become DTensors."""
        if rule == "adam":
            if side == "left":
                start, stop = shard.cols(low_shape[1])
                return self._sharded_moments(group, shard, (low_shape[0], stop - start), tuple(low_shape), 1, dtype, p.device)
            return self._sharded_moments(group, shard, tuple(low_shape), (shard.shape[0], low_shape[1]), 0, dtype, p.device)
        if side == "left":
            start, stop = shard.cols(low_shape[1])
            local = self._fresh_state(group, p.to_local(), (low_shape[0], stop - start), dtype, rule)
            for key in self._COL_KEYS:
                if key in local:
                    local[key] = shard.wrap_cols(local[key], low_shape[1])
            return local
        local = self._fresh_state(group, p.to_local(), low_shape, dtype, rule)
        for key in self._ROW_KEYS:
            if key in local:
                local[key] = shard.wrap(local[key], shard.shape[0])
        return local

    def _step_sharded(self, group: dict[str, Any], it: _LowRankItem, rule: str) -> None:
        """One low-rank step of an FSDP2 parameter from this rank's rows (``lro.distributed`` has the
        table of what is communicated). Same numbers as one process up to the order of the sums."""
        p, proj = it.param, it.projector
        shard = self._shard(p)
        state = self.state[p]
        if it.previous is not None:
            if int(state.get("step", 0)) and group["on_refresh"] == "reset":
                policies.reset_moments(state)
            elif int(state.get("step", 0)) and group["on_refresh"] == "rotate":
                self._rotate_sharded(state, shard, it.previous, proj)
            if int(state.get("step", 0)) and group["refresh"] == "lazy":
                self._lazy_sharded(state, shard, it.previous, proj, group["update_proj_gap"])
            self._projectors[p] = proj
            state["projector"] = self._export_projector(p, proj)
        g = p.grad.to_local()
        w = p.to_local()
        sdtype = state_dtype(p.dtype)
        basis = distributed.local_basis(proj, shard, g.device, g.dtype)
        side = proj.side
        if side == "left":
            low = shard.all_reduce_((basis.t() @ g).to(sdtype), "project")  # Σ_k P_kᵀ G_k, r×n on every rank
        else:
            low = (g @ basis.t()).to(sdtype)  # this rank's rows of G Qᵀ
        if "step" not in state:
            state.update(self._sharded_fresh_state(group, p, shard, side, tuple(low.shape), sdtype, rule))
        state["step"] += 1
        local = {k: (v.to_local() if distributed.is_sharded(v) else v) for k, v in state.items() if k != "projector"}
        if side == "left" and rule == "adam":
            # R is whole on every rank, the moments are kept by columns: Adam on ours, then gather N
            n = low.shape[1]
            start, stop = shard.cols(n)
            direction = shard.gather_cols(self._local_rule(group, rule, local, low[:, start:stop].contiguous()), n, "project")
        elif side == "left":
            # the other rules need whole rows of R: gather their state, step on every rank, keep ours
            n = low.shape[1]
            start, stop = shard.cols(n)
            full = {k: shard.gather_cols(v, n, "rule") for k, v in local.items() if k in self._COL_KEYS}
            direction = self._local_rule(group, rule, {**local, **full}, low)
            for k, v in full.items():
                local[k].copy_(v[:, start:stop])
        elif rule == "adam":
            direction = self._local_rule(group, rule, local, low)
        else:
            # the orthogonal factor needs the whole m×r momentum: gather the rows, orthogonalize, keep ours
            full = {k: self._gather_rows(shard, v) for k, v in local.items() if k in self._ROW_KEYS}
            direction = self._rule_direction(group, rule, {**local, **full}, self._gather_rows(shard, low))
            for k, v in full.items():
                local[k].copy_(v[shard.start:shard.stop])
            direction = direction[shard.start:shard.stop]
        def apply_back(n: Tensor, alpha: float, beta: float) -> None:
            n, b = n.to(w.dtype), basis.to(w.dtype)
            if side == "left":
                w.addmm_(b, n, beta=beta, alpha=alpha)
            else:
                w.addmm_(n, b, beta=beta, alpha=alpha)

        def project_back(n: Tensor) -> Tensor:
            b = basis.to(n.dtype)
            return b @ n if side == "left" else n @ b

        rows = lambda t: shard.all_reduce_(t, "norms")  # noqa: E731  sums over W's rows, from every rank
        # R and N are whole on every rank on the left side, this rank's rows on the right
        self._update(group, state, w, g, side, low, direction, apply_back, project_back,
                     grad_rows=rows, low_rows=rows if side == "right" else None)

    def _local_rule(self, group: dict[str, Any], rule: str, state: dict[str, Any], low: Tensor) -> Tensor:
        if rule == "adam" and policies.is_8bit(state):
            return self._adam8bit_local(group, state, low)
        if rule == "adam":
            beta1, beta2 = group["betas"]
            (direction,) = adam_direction([low], [state["exp_avg"]], [state["exp_avg_sq"]], [int(state["step"])],
                                          beta1, beta2, group["eps"])
            return direction
        return self._rule_direction(group, rule, state, low)

    @classmethod
    def _adam8bit_local(cls, group: dict[str, Any], state: dict[str, Any], low: Tensor) -> Tensor:
        """8-bit Adam on this rank's piece: its blocks of 256 start at the piece's first element, and
        the absmax vector is padded to the same length on every rank (only the first blocks are used)."""
        blocks = -(-low.numel() // kernels.BLOCK)
        view = {**state, "exp_avg_absmax": state["exp_avg_absmax"][:blocks],
                "exp_avg_sq_absmax": state["exp_avg_sq_absmax"][:blocks]}
        return cls._adam8bit(group, view, low)

    def _sharded_moments(self, group: dict[str, Any], shard: distributed.RowShard, local_shape: tuple[int, ...],
                         global_shape: tuple[int, ...], dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Fresh Adam moments of a piece of a sharded tensor (rows, ``dim`` 0, or columns, 1), as DTensors:
        float, or INT8 codes (sharded like the piece) with an absmax vector padded to the largest piece's
        block count on every rank (so it is an even ``Shard(0)`` of world × that many blocks)."""
        wrap = (lambda t: shard.wrap(t, global_shape[0])) if dim == 0 else (lambda t: shard.wrap_cols(t, global_shape[1]))
        out: dict[str, Any] = {"step": torch.tensor(0.0, dtype=torch.float32)}
        if not uses_8bit(group, math.prod(global_shape)):
            for key in ("exp_avg", "exp_avg_sq"):
                out[key] = wrap(torch.zeros(local_shape, dtype=dtype, device=device))
            return out
        largest = list(global_shape)
        largest[dim] = -(-global_shape[dim] // shard.world)
        blocks = -(-math.prod(largest) // kernels.BLOCK)
        for key in ("exp_avg", "exp_avg_sq"):
            out[key] = wrap(torch.zeros(local_shape, dtype=torch.uint8, device=device))
            out[f"{key}_absmax"] = shard.wrap(torch.zeros(blocks, dtype=torch.float32, device=device), shard.world * blocks)
        return out

    @staticmethod
    def _lazy_sharded(state: dict[str, Any], shard: distributed.RowShard, old: Projector, new: Projector, gap: int) -> None:
        """Q-GaLore's lazy schedule on shards: |cos| of the old and new top basis vectors, a column of P
        split over the ranks (three sums all-reduced) or a row of the gathered Q."""
        device = next((v.to_local() if distributed.is_sharded(v) else v).device
                      for k, v in state.items() if k in policies.MOMENT_KEYS)
        a = distributed.local_basis(old, shard, device, torch.float32)
        b = distributed.local_basis(new, shard, device, torch.float32)
        a, b = (a[:, 0], b[:, 0]) if new.side == "left" else (a[0], b[0])
        sums = torch.stack([a @ b, a @ a, b @ b])
        if new.side == "left":
            shard.all_reduce_(sums, "refresh")
        cos = (sums[0] / torch.clamp(sums[1].sqrt() * sums[2].sqrt(), min=1e-8)).abs()
        policies.lazy_push(state, cos, gap)

    @staticmethod
    def _rotate_sharded(state: dict[str, Any], shard: distributed.RowShard, old: Projector, new: Projector) -> None:
        """``on_refresh="rotate"`` on shards: the r×r change of basis (an all-reduce of Σ_k P_new,kᵀ P_old,k on
        the left side, local from the replicated Q on the right), applied to this rank's moments."""
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key not in state:
                continue
            x = state[key].to_local() if distributed.is_sharded(state[key]) else state[key]
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            a = distributed.local_basis(old, shard, x.device, dtype)
            b = distributed.local_basis(new, shard, x.device, dtype)
            t = shard.all_reduce_(b.T @ a, "refresh") if new.side == "left" else a @ b.T
            mapped = t @ x.to(dtype) if new.side == "left" else x.to(dtype) @ t
            x.copy_(mapped.abs_() if key == "exp_avg_sq" else mapped)

    @staticmethod
    def _gather_rows(shard: distributed.RowShard, t: Tensor) -> Tensor:
        """All ranks' rows of a row-sharded low-rank tensor (m×r, torch.chunk's layout), in order."""
        import torch.distributed as dist

        chunk = -(-shard.shape[0] // shard.world)
        padded = t.new_zeros((chunk, *t.shape[1:]))
        padded[: t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in range(shard.world)]
        distributed.COMM_BYTES["rule"] += padded.numel() * padded.element_size() * (shard.world - 1)
        dist.all_gather(out, padded, group=shard.group)
        return torch.cat(out)[: shard.shape[0]]

    def _init_sharded(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        """:meth:`init_state` for a row-sharded low-rank parameter: this rank's pieces, as a step builds them."""
        from ..projectors.base import choose_side

        shard = self._shard(p)
        proj = self._new_projector(group, p)
        side = choose_side(shard.shape, proj.proj_type)
        proj._state = {"side": side}
        start, stop = shard.cols(shard.shape[1])
        local_shape = (shard.rows, shard.shape[1]) if side == "left" else (shard.rows, stop - start)
        proj.allocate(shard.shape if proj.name == "random" else local_shape, p.dtype, p.device)
        self._projectors[p] = proj
        state["projector"] = self._export_projector(p, proj)
        sdtype = state_dtype(p.dtype)
        low_shape = (proj.rank, shard.shape[1]) if side == "left" else (shard.rows, proj.rank)
        state.update(self._sharded_fresh_state(group, p, shard, side, low_shape, sdtype, self.rule_of(group, True)))
        if group["limiter"] is not None:
            state["limiter_norm"] = torch.full((), float("nan"), dtype=sdtype, device=p.device)

    def _begin_low_rank(self, group: dict[str, Any], it: _LowRankItem, rule: str) -> tuple[dict[str, Any], Tensor]:
        """Commit a refresh, project the gradient, create the state on the first step and count the
        step: the parameter's state and R, for the rule to run on."""
        p, proj = it.param, it.projector
        state = self.state[p]
        if it.previous is not None:
            self._commit_refresh(group, state, it)
            self._projectors[p] = proj
            state["projector"] = proj.state_dict()
        low = proj.project(p.grad).to(state_dtype(p.dtype))
        if "step" not in state:
            state.update(self._fresh_state(group, p, low.shape, low.dtype, rule))
        state["step"] += 1
        return state, low

    def _commit_refresh(self, group: dict[str, Any], state: dict[str, Any], it: _LowRankItem) -> None:
        """Moment policy and refresh schedule, for a subspace that changed this step."""
        old, new = it.previous, it.projector
        if int(state.get("step", 0)) == 0:
            return  # the first subspace: no moments to carry, nothing to compare with
        if group["on_refresh"] == "reset":
            policies.reset_moments(state)
        elif group["on_refresh"] == "rotate":
            policies.rotate_moments(state, old, new, eps=float(group["eps"]))
        if group["refresh"] == "lazy":
            policies.lazy_refresh_record(state, old, new, group["update_proj_gap"])

    def _apply_update(self, group: dict[str, Any], p: Tensor, proj: Projector, low: Tensor, direction: Tensor) -> None:
        """W ← (1 − lr·wd)·W − lr·(the method's update), from R (``low``) and N = Adam(R)."""
        weight, write = self._writable(group, p)
        self._update_weight(group, p, weight, proj, low, direction)
        if write is not None:
            write()

    def _update_weight(self, group: dict[str, Any], p: Tensor, weight: Tensor, proj: Projector, low: Tensor,
                       direction: Tensor) -> None:
        self._update(group, self.state[p], weight, p.grad, proj.side, low, direction,
                     lambda n, alpha, beta: proj.apply_back(weight, n, alpha=alpha, beta=beta), proj.project_back)

    @staticmethod
    def _update(group: dict[str, Any], state: dict[str, Any], weight: Tensor, grad: Tensor, side: str, low: Tensor,
                direction: Tensor, apply_back: Callable[[Tensor, float, float], None],
                project_back: Callable[[Tensor], Tensor], grad_rows: Callable[[Tensor], Tensor] | None = None,
                low_rows: Callable[[Tensor], Tensor] | None = None) -> None:
        """W ← (1 − lr·wd)·W − lr·(the method's update), from G, R (``low``) and N (``direction``).

        ``apply_back(N, α, β)`` does W ← β·W + α·project_back(N) in place. On FSDP2 shards ``weight`` and
        ``grad`` are this rank's rows, and ``grad_rows`` / ``low_rows`` sum a tensor over the ranks in
        place, for the sums that run over G's rows and over R's rows (None: R is whole here)."""
        lr = float(group["lr"])
        scale = float(group["scale"])
        decay = 1.0 - lr * float(group["weight_decay"])
        limiter = group["limiter"]
        if group["scaling"] is not None:
            # APOLLO: the raw gradient, rescaled per channel (or tensor) by what Adam did in the
            # subspace; √scale as apollo-torch applies it, so its settings carry over. The scaled
            # gradient is never built: its norm comes from G's channel norms, and the update is one
            # addcmul_ of G with the (limited) factors.
            if group["scaling"] == "tensor" and low_rows is not None:
                factors = _norm(direction, low_rows) / (_norm(low, low_rows) + 1e-8)
            else:
                factors = policies.scale_factors(direction, low, side, group["scaling"])
            if limiter is not None:
                if factors.dim() == 0:
                    norm = factors * _norm(grad, grad_rows, dtype=factors.dtype)
                elif side == "right":  # channels are G's rows: their norms are local, the sum is not
                    norm = _norm(factors * _norm(grad, None, dim=1, dtype=factors.dtype), grad_rows)
                else:  # channels are G's columns: their norms run over the rows
                    norm = _norm(factors * _norm(grad, grad_rows, dim=0, dtype=factors.dtype), None)
                factors = factors * policies.growth_factor(norm, state, float(limiter))
            if decay != 1.0:
                weight.mul_(decay)
            weight.addcmul_(grad.to(weight.dtype), factors.to(weight.dtype), value=-lr * math.sqrt(scale))
            return
        residual = group["residual"]
        if residual == "drop":
            apply_back(direction, -lr * scale, decay)
            return
        back = project_back(low)
        rest = torch.sub(grad.to(low.dtype), back, out=back)  # G − project_back(R), in place
        if residual == "fira":
            # Fira: the residual scaled per channel by the subspace's Adam ratio, both parts × scale
            rest.mul_(policies.scale_factors(direction, low, side, "channel"))
            rest_alpha = -lr * scale
        else:
            if residual == "sign":
                rest.sign_()
            rest_alpha = -lr * float(group["residual_lr_scale"])
        apply_back(direction, -lr * scale, decay)
        if limiter is not None:
            factor = policies.growth_factor(_norm(rest, grad_rows), state, float(limiter))
            weight.addcmul_(rest.to(weight.dtype), factor.to(weight.dtype), value=rest_alpha)
        else:
            weight.add_(rest.to(weight.dtype), alpha=rest_alpha)

    # ------------------------------------------------------------------ eager state
    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate every parameter's state now, as its first step would, with placeholder values.

        Works on the meta device (``lro.memory`` measures the state this way), and gives every
        parameter the same state keys before any step, which distributed checkpoints need. It
        changes no numbers: a parameter's first step still starts from a fresh projector and zero
        moments. Q-GaLore's lazy schedule adds its gap and queue (at most 28 bytes) at refreshes.
        """
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state:
                    continue
                if not self.is_low_rank(p, group):
                    state.update(self._fresh_state(group, p, p.shape, self._plain_moment_dtype(group, p),
                                                   self.rule_of(group, low_rank=False)))
                    continue
                if distributed.is_sharded(p):
                    self._init_sharded(group, p, state)
                    continue
                sdtype = state_dtype(p.dtype)
                proj = self._new_projector(group, p)
                proj.allocate(p.shape, p.dtype, p.device)
                self._projectors[p] = proj
                state["projector"] = proj.state_dict()
                state.update(self._fresh_state(group, p, proj.low_rank_shape(p.shape), sdtype,
                                               self.rule_of(group, low_rank=True)))
                if group["limiter"] is not None:
                    state["limiter_norm"] = torch.full((), float("nan"), dtype=sdtype, device=p.device)

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; the whole checkpoint is validated before anything changes.

        Unlike ``torch.optim.Optimizer.load_state_dict``, tensors keep the dtype they were saved in
        (float32 moments of a bf16 weight stay float32, integer indices stay integers) and only move
        to their parameter's device.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("an optimizer state_dict needs the keys 'state' and 'param_groups'")
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(groups)}"
            )
        for k, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {k}: loaded state dict has {len(sg['params'])} parameters, "
                    f"this optimizer has {len(g['params'])}"
                )
        new_groups = []
        for k, (g, sg) in enumerate(zip(groups, saved_groups)):
            ng = {**self.defaults, **sg, "params": g["params"]}
            if "param_names" in g and "param_names" not in sg:
                ng["param_names"] = g["param_names"]
            check_hyperparameters(ng, f"{type(self).__name__} loaded param group {k}")
            new_groups.append(ng)

        id_map = dict(
            zip(
                chain.from_iterable(sg["params"] for sg in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
            )
        )
        group_of = {p: ng for ng in new_groups for p in ng["params"]}
        new_state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key in id_map:
                p = id_map[key]
                value = _to_device(value, p.device)
                self._check_loaded_state(p, group_of[p], value)
                new_state[p] = value
            else:
                new_state[key] = value

        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._projectors.clear()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_loaded_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        i = next(k for k, q in enumerate(group["params"]) if q is p)
        where = f"{type(self).__name__}.load_state_dict: parameter {self._label(group, i)}"
        if not state:
            return
        if not isinstance(state.get("step"), Tensor):
            raise ValueError(f"{where}: state has no tensor 'step'")
        if self.is_low_rank(p, group):
            if "projector" not in state:
                raise ValueError(
                    f"{where}: the group projects this parameter, but its saved state has no projector "
                    "(was it saved by a plain AdamW, or with another rank?)"
                )
            proj = self._new_projector(group, p)
            try:
                shard = self._shard(p)
                proj.load_state_dict(self._import_projector(p, state["projector"]))
                if shard is not None and hasattr(proj, "basis_shape"):
                    start, stop = shard.cols(shard.shape[1])
                    proj.check_fits((shard.rows, shard.shape[1] if proj.side == "left" else stop - start))
                else:
                    proj.check_fits(p.shape)
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{where}: {err}") from None
            want = proj.low_rank_shape(p.shape)
        else:
            if "projector" in state:
                raise ValueError(
                    f"{where}: saved state is low-rank, but this group updates the parameter as plain "
                    "AdamW (check rank and the parameter's shape)"
                )
            want = tuple(p.shape)
        rule = self.rule_of(group, self.is_low_rank(p, group))
        expected = {k: tuple(v.shape) for k, v in self._fresh_state(
            group, p.new_empty(0, device="meta"), want, torch.float32, rule).items() if k != "step"}
        if rule == "adam":
            expected = {"exp_avg": tuple(want), "exp_avg_sq": tuple(want)}
        for key, shape in expected.items():
            if not isinstance(state.get(key), Tensor):
                raise ValueError(
                    f"{where}: state has no tensor {key!r}, which rule={rule!r} keeps (was it saved with "
                    "another rule, or another momentum setting?)"
                )
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{where}: {key} has shape {tuple(state[key].shape)}, expected {shape}")
        if rule != "adam":
            return
        if state["exp_avg"].dtype == torch.uint8 or state["exp_avg_sq"].dtype == torch.uint8:
            blocks = -(-math.prod(want) // kernels.BLOCK)
            for key in ("exp_avg", "exp_avg_sq"):
                absmax = state.get(f"{key}_absmax")
                if distributed.is_sharded(absmax) and state[key].dtype == torch.uint8:
                    # a piece of a sharded parameter: the absmax is padded to the same length on every rank
                    local = absmax.to_local().numel()
                    if absmax.numel() == local * absmax.device_mesh.size() and \
                            local * kernels.BLOCK >= state[key].to_local().numel():
                        continue
                if state[key].dtype != torch.uint8 or not isinstance(absmax, Tensor) or absmax.numel() != blocks:
                    raise ValueError(
                        f"{where}: INT8 moments need uint8 {key!r} and {blocks} float32 '{key}_absmax' "
                        "values (one per block of 256); the checkpoint's are incomplete"
                    )

    # ------------------------------------------------------------------ introspection
    def state_nbytes(self) -> dict[str, int]:
        """Bytes of optimizer state kept between steps: moments, projectors, other."""
        out = {"moments": 0, "projectors": 0, "other": 0}
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for p, state in self.state.items():
            for key, value in state.items():
                if key == "projector":
                    out["projectors"] += self._projector(p, group_of[p]).nbytes()
                elif key in policies.MOMENT_KEYS:
                    out["moments"] += _tensor_bytes(value)
                else:
                    out["other"] += _tensor_bytes(value)
        return out


def _norm(x: Tensor, total: Callable[[Tensor], Tensor] | None, dim: int | None = None,
          dtype: torch.dtype | None = None) -> Tensor:
    """The 2-norm of ``x`` (along ``dim``, kept), or, with ``total``, of the tensor whose pieces the
    ranks hold: the squares summed locally, summed over the ranks by ``total``, then the root."""
    if total is None:
        return x.norm(dtype=dtype) if dim is None else x.norm(dim=dim, keepdim=True, dtype=dtype)
    sq = x.to(dtype or x.dtype).square()
    sq = sq.sum() if dim is None else sq.sum(dim=dim, keepdim=True)
    return total(sq).sqrt_()


def _fresh_moments(like: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """A step counter (a float32 scalar on the CPU, as torch keeps it) and zero moments shaped like ``like``."""
    return {
        "step": torch.tensor(0.0, dtype=torch.float32),
        "exp_avg": torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format),
    }


def _tensor_bytes(value: Any) -> int:
    """Bytes this process keeps: a DTensor counts its local piece."""
    if distributed.is_sharded(value):
        value = value.to_local()
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def _to_device(value: Any, device: torch.device) -> Any:
    """Move tensors (nested in dicts) to ``device`` keeping their dtype; ``step`` counters stay put."""
    if isinstance(value, Tensor):
        return value.to(device=device)
    if isinstance(value, dict):
        return {k: (v if k == "step" else _to_device(v, device)) for k, v in value.items()}
    return value


def _chunks(items: list[Any], nbytes: Callable[[Any], int], budget: int = CHUNK_BYTES) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    total = 0
    for it in items:
        size = nbytes(it)
        if chunk and total + size > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(it)
        total += size
    if chunk:
        yield chunk
