"""LowRankAdamW: the core optimizer every preset configures, composed of registered parts.

For a parameter W (m×n) in a group with ``rank`` r < min(m, n), step t does::

    if (t − 1) % update_proj_gap == 0:  P ← projector.refreshed(G)       # before the increment
                                        state ← on_refresh(state)        # keep | reset | rotate | transfer
    R = project(G)                                                       # r×n or m×r
    N = rule(R, state)                  Adam: M̂ / (√V̂ + ε)              # state of R's shape, fp32
    W ← update(W, G, R, N)              drop: (1 − lr·wd)·W − lr·scale·project_back(N)

The parts are chosen by name from their registries: ``projector`` (``lro.projectors``), ``rule``
(``lro.rules``), ``residual`` / ``scaling`` (``lro.updates``); storage (float or INT8) is read off the
state; the FSDP2 seam is chosen once per parameter (``lro.distributed``). :mod:`.step` runs them, one
code path for one process and for row shards. ``lowrank_optim/optim/reference.py`` states the same
algorithm in plain loops; the tests hold this one to it.

Every other parameter (no ``rank`` in its group, not 2-D, or a short side ≤ rank) follows the rule's
``plain_rule``: torch's own AdamW for Adam and the orthogonal rule (the numbers of
``torch.optim.AdamW``), Adafactor for Adafactor.

Weight decay is decoupled and taken from the weights before the update, as in Loshchilov & Hutter
and ``torch.optim.AdamW``; galore-torch decays the already-updated weights instead (a difference of
order lr²·wd per step).

Dtypes: low-rank state is float32 whatever the parameter's dtype (it is small); the SVD runs in
float32; the basis is kept and the projections run in the parameter's dtype. Plain parameters are
torch's AdamW exactly, moments in their own dtype (bf16 for bf16), except float16 parameters, which
keep float32 moments and are stepped through a float32 copy rounded once.
"""

from __future__ import annotations

import difflib
import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import distributed
from .. import projectors as _projectors
from .. import rules as _rules
from .. import updates as _updates
from ..projectors import Projector
from . import groups as _groups
from . import codes, loading, nonfinite, options, writeback
from . import state as _state
from . import step as _step
from .groups import RankFallbackWarning
from .options import CORE_DEFAULTS, check_group
from .state import plain_state_dtype


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, built at the first call: the decorator imports ``torch._dynamo`` (about a
    second), which ``import lowrank_optim`` then need not pay (torch's own optimizers defer it the same way)."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return run


class _PresetDefault:
    """Marks a constructor argument left to the preset (``None`` is a real value for some keys)."""

    def __repr__(self) -> str:
        return "<preset default>"


PRESET_DEFAULT: Any = _PresetDefault()


def check_hyperparameters(group: dict[str, Any], where: str) -> None:
    """Validate one parameter group's options; every message names the option and the fix."""
    check_group(group, where)


class LowRankAdamW(Optimizer):
    """AdamW whose 2-D weights are stepped in a low-rank subspace (the shared core of every preset).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``; a group with an integer
            ``rank`` projects its 2-D weights (``lro.param_groups`` builds such groups), a group
            without one is plain AdamW. ``(name, tensor)`` pairs give warnings and errors names. A model
            (``nn.Module``) stands for ``lro.param_groups(model)``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (same defaults); ``lr`` may be a tensor.
        rank: default rank for groups that do not set one (None: only groups that set it project), and
            the rank of groups with ``rank="auto"`` (if None there: the preset's, ``optim.groups.auto_rank``).
        update_proj_gap: steps between subspace refreshes (refresh when ``step % gap == 0``).
        scale: the low-rank update is multiplied by this (GaLore's α).
        match_adamw_rms: True sets each group's scale so its update has AdamW's RMS: AdamW's lr carries over
            (and, with ``residual="sign"``, ``residual_lr_scale`` to 0.2 unless given: sign() has RMS 1).
        proj_type: ``std``, ``reverse_std``, ``left`` or ``right`` (see ``lro.projectors``).
        projector: a name from ``lro.projectors.available()``; ``projector_options`` a dict of its
            keyword options (e.g. ``{"power_iters": 1}`` for ``rsvd``; ``{"canonical_signs": False}``
            keeps LAPACK's singular-vector signs, as galore-torch).
        residual: what happens to G − project_back(project(G)) (``lro.updates``): ``drop`` (GaLore),
            ``sign`` (FRUGAL: −lr·residual_lr_scale·sign), ``sgd`` (−lr·residual_lr_scale·residual) or
            ``fira`` (scaled per channel by ‖N‖/‖R‖, added to the update).
        scaling: ``None``, or ``channel`` / ``tensor`` (APOLLO): the update is the raw gradient
            scaled by ‖N‖/‖R‖ per channel or per tensor, times √scale, instead of project_back(N).
        limiter: None, or γ ≥ 1: the full-rank term (APOLLO's scaled gradient, a residual) may not
            grow faster than γ per step.
        on_refresh: what the rule's state does when the subspace changes: ``keep``, ``reset``, ``rotate``,
            ``transfer`` (LDAdam, Adam only).
        refresh: ``fixed`` (every update_proj_gap steps) or ``lazy`` (Q-GaLore's per-layer schedule);
            ``stagger`` (True): each weight on its own phase of the gap (False: all together, galore-torch).
        state_bits: 32, or 8 for the rule's state stored as blockwise INT8 (a dynamic code book per
            block of 256, dequantized for the update and requantized after it), for every state tensor
            of at least ``min_8bit_size`` (4096) elements, low-rank and plain alike; smaller ones stay
            float32, as in bitsandbytes' 8-bit Adam.
        proj_bits: 32, or 4 to store the basis of ``svd`` / ``rsvd`` as INT4 (Q-GaLore).
        stochastic_rounding: how updates are written into low-precision weights: ``None`` rounds
            INT8 weights (``lro.quantize_model_int8``) stochastically and bf16 weights to nearest;
            ``True`` rounds both stochastically; ``False`` both to nearest.
        rule: the inner rule on the low-rank tensor, a name from ``lro.rules.available()``: ``adam``,
            ``adafactor`` (factored second moment, update clipping; plain parameters of the group get
            Adafactor too) or ``orthogonal`` (one momentum, orthogonalized; plain parameters stay AdamW,
            as Muon advises).
        momentum: the rule's first-moment coefficient: ``orthogonal``'s μ (None: 0.95), or
            ``adafactor``'s optional β₁ (None: no first moment). Adam uses ``betas``.
        nesterov, orthogonalize, ns_steps: the ``orthogonal`` rule's Nesterov momentum, ``svd`` (exact
            U Vᵀ, SUMO) or ``newton_schulz`` (Muon's iteration) and its steps.
        beta2_decay, clip_threshold: Adafactor's decay exponent c (β̂₂ₜ = 1 − t^c, −0.8) and update
            clipping threshold d (1.0); its ε₁ is ``eps``.
        nonfinite: a gradient with inf or NaN: ``raise`` (refused before any change), ``skip`` (the step
            is skipped and counted in ``group["nonfinite_skipped"]``) or ``ignore`` (:mod:`.nonfinite`).
        foreach: torch's multi-tensor AdamW for the plain parameters (None: yes, but for half-precision
            ones on CPU, which take the single-tensor path as torch's default does there; False: one
            tensor at a time; in float32 and float64 both give the same numbers on CPU).
        maximize: maximize the objective (step along +G), as ``torch.optim.AdamW``.
        amsgrad, capturable, differentiable, fused: ``torch.optim.AdamW``'s flags, accepted when False
            (or None); True is refused by name.
        **part_options: group keys that a registered rule or update declares (its ``defaults``).

    Method keys left at ``<preset default>`` take the class's ``method_defaults()``. Per-group keys
    override these defaults. ``state_dict()`` holds tensors and plain values only.
    ``torch.compile(opt.step)`` runs the step eagerly (its refresh decisions depend on the step count),
    so it gives eager's numbers.
    """

    #: Defaults of the method's own keys; a preset overrides some of them, an argument all.
    preset: ClassVar[dict[str, Any]] = {}
    base_defaults: ClassVar[dict[str, Any]] = {**CORE_DEFAULTS, "nesterov": False, "orthogonalize": "svd",
                                               "ns_steps": 5, "beta2_decay": -0.8, "clip_threshold": 1.0}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        rank: int | None = None,
        update_proj_gap: int = PRESET_DEFAULT,
        scale: float = PRESET_DEFAULT,
        match_adamw_rms: bool = PRESET_DEFAULT,
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
        nonfinite: str = PRESET_DEFAULT,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        **part_options: Any,
    ) -> None:
        given = {k: v for k, v in locals().items() if k in self.method_defaults() and v is not PRESET_DEFAULT}
        # a reference package's key (cos_threshold=, scale_type=) is read as ours, as in a group
        given.update(self._part_options(_groups.reference_keys(part_options, f"{type(self).__name__}()")))
        self._given = frozenset(given)  # what match_adamw_rms leaves alone (optim/groups.resolved)
        name = f"{type(self).__name__}()"
        params = _groups.materialized(_groups.as_params(params, name, given))
        _groups.warn_constructor_rank(params, rank, type(self).__name__)
        options.check_flags(name, {"amsgrad": amsgrad, "capturable": capturable,
                                   "differentiable": differentiable, "fused": fused})
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, rank=rank, foreach=foreach, maximize=maximize,
                        amsgrad=False, capturable=False, differentiable=False, fused=None,
                        **{**self.method_defaults(), **given})
        defaults = _groups.plain_numbers(defaults)
        check_group(defaults, name)
        super().__init__(params, defaults)
        if not any(g["rank"] is not None for g in self.param_groups):
            plain = _rules.get(_rules.get(self.defaults["rule"]).plain_rule).label
            warnings.warn(
                f"{type(self).__name__}: no parameter group sets 'rank', so every parameter is "
                f"updated without projection (plain {plain}). Build the "
                "groups with lro.param_groups(model, rank=...) or pass rank= to the optimizer; lro.param_groups "
                "projects nn.Linear and Hugging Face Conv1D weights, so a model with neither needs groups built "
                "by hand ({'params': [...], 'rank': r}).",
                RankFallbackWarning,
                stacklevel=2,
            )

    def _part_options(self, given: dict[str, Any]) -> dict[str, Any]:
        known = self.method_defaults()
        for key in given:
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}{hint}")
        return given

    @classmethod
    def method_defaults(cls) -> dict[str, Any]:
        """This class's defaults for the method keys (``update_proj_gap``, ``scale``, ...), with the keys
        every registered rule and update declares."""
        return deepcopy({**options.part_defaults(), **cls.base_defaults, **cls.preset})

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        param_group = _groups.resolved(self, _groups.normalized(self, param_group))
        index = len(self.param_groups)
        merged = {**options.part_defaults(), **self.defaults, **param_group}
        where = f"{type(self).__name__} param group {index}"
        check_group(merged, where)
        _groups.check_parameters(merged, param_group["params"], where)
        for key, value in options.part_defaults().items():
            param_group.setdefault(key, self.defaults.get(key, value))
        super().add_param_group(param_group)
        self._cache().clear()
        _groups.warn_fallbacks(self, self.param_groups[-1])

    def _label(self, group: dict[str, Any], i: int) -> str:
        """The parameter's name where the groups carry names, else its position."""
        names = group.get("param_names")
        if names is not None:
            return f"'{names[i]}'"
        gi = next((k for k, g in enumerate(self.param_groups) if g is group), None)
        return f"#{i}" if gi is None else f"#{i} of param group {gi}"

    is_low_rank = staticmethod(_groups.is_low_rank)

    # ------------------------------------------------------------------ derived, never saved
    def _cache(self) -> dict[str, Any]:
        """What is derived from ``param_groups`` and ``state`` (positions, seams, projector objects): kept
        beside them, rebuilt on demand, dropped by pickling, deepcopy and ``load_state_dict``."""
        return self.__dict__.setdefault("_derived", {})

    def _position(self, p: Tensor) -> int:
        """``p``'s index among all parameters: the same on every rank and across a checkpoint."""
        cache = self._cache()
        if "positions" not in cache:
            params = chain.from_iterable(g["params"] for g in self.param_groups)
            cache["positions"] = {id(q): k for k, q in enumerate(params)}
        return cache["positions"].get(id(p), 0)

    def _comm(self, p: Tensor) -> distributed.Local | distributed.RowShard:
        comms = self._cache().setdefault("comms", {})
        if id(p) not in comms:
            comms[id(p)] = distributed.comm_of(p)
        return comms[id(p)]

    def _plain_moment_dtype(self, group: dict[str, Any], p: Tensor) -> torch.dtype:
        """float32 for parameters stepped through a float32 copy (INT8, stochastic bf16), else
        :func:`plain_state_dtype`."""
        return torch.float32 if writeback.through_copy(group, p) else plain_state_dtype(p.dtype)

    def _new_projector(self, group: dict[str, Any], p: Tensor) -> Projector:
        # Each parameter's random projections start from its position in the optimizer, which is the
        # same on every rank and across a checkpoint.
        cls = _projectors.REGISTRY[group["projector"]]
        opts = {**cls.options_from_group(group), **group["projector_options"]}
        try:
            proj = cls(group["rank"], proj_type=group["proj_type"], seed=self._position(p), **opts)
        except TypeError as err:
            raise ValueError(f"projector {group['projector']!r} does not take these options: {err}") from None
        return proj.bind(self._comm(p))

    def _projector(self, p: Tensor, group: dict[str, Any]) -> Projector:
        """The projector ``p`` steps with, built from ``state[p]["projector"]`` (and kept while that entry is
        the one it was built from)."""
        cache = self._cache().setdefault("projectors", {})
        saved = self.state.get(p, {}).get("projector")
        hit = cache.get(id(p))
        if hit is not None and hit[1] is saved:
            return hit[0]
        proj = self._new_projector(group, p)
        if saved is not None:
            proj.load_state_dict(proj.import_state(saved))
        cache[id(p)] = (proj, saved)
        return proj

    def _set_projector(self, p: Tensor, proj: Projector) -> None:
        saved = self.state[p]["projector"] = proj.export_state()
        self._cache().setdefault("projectors", {})[id(p)] = (proj, saved)

    @property
    def _projectors(self) -> Mapping[Tensor, Projector]:
        """Each projected parameter's projector, as the step uses it (built from ``state``)."""
        return _step.ProjectorView(self)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    @_eager
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` (re-evaluating the loss) runs with grad enabled.

        Every check (sparse, misshapen and non-finite gradients, the refresh itself) runs for all
        parameters before any weight or state is written, so a step that raises leaves the model and
        the optimizer exactly as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_subset(None)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``, and drops the projected gradients a sparse backward left
        (``lro.sparse_grad``), which stand in for ``.grad`` on those weights."""
        super().zero_grad(set_to_none)
        _step.low_rank_grads(self).clear()

    @torch.no_grad()
    def step_parameters(self, params: Iterable[Tensor]) -> None:
        """Step only ``params`` (those of them with a gradient), exactly as :meth:`step` would.

        For layer-wise updates: a parameter stepped alone gets the same numbers as in a full
        step, and the same guarantee holds: if anything fails, nothing of these parameters changes.
        Step hooks (``register_step_pre_hook``) run only around :meth:`step`.
        """
        self._step_subset({id(p) for p in params})

    def _nonfinite_decide(self, params: list[Tensor]) -> bool:
        """For layer-wise updates: what this optimizer's step does with non-finite gradients of ``params``
        (skip, counted; raise; or False to step anyway), decided before any of them is stepped."""
        return nonfinite.decide(self, params)

    def _step_subset(self, only: set[int] | None) -> None:
        loading.check_unchanged(self)
        if nonfinite.skip_step(self, only):  # before anything: raises, or skips and counts (nonfinite=)
            return
        plans = [_step.plan(self, group, only) for group in self.param_groups]
        for group, (plain, low) in zip(self.param_groups, plans):
            _step.step_plain(self, group, plain)  # a tensor lr as torch.optim.AdamW takes it (rules.adam)
            _step.step_low_rank(self, _step.as_float_lr(group), low)

    # ------------------------------------------------------------------ eager state
    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate every parameter's state now, as its first step would, with placeholder values.

        Works on the meta device (``lro.memory`` measures the state this way), and gives every
        parameter the same state keys before any step, which distributed checkpoints need. It
        changes no numbers: a parameter's first step still starts from a fresh projector and zero
        state. Frozen parameters (``requires_grad=False``) get none, as in torch's optimizers: they never
        step, so a checkpoint of a run holds none for them.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and not self.state[p]:
                    self.state[p].update(_step.placeholder(self, group, p))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``, with the few entries that are not numbers (a projector's
        side, the DCT's variant, an INT4 basis' dtype and shape) written as codes (:mod:`.codes`), so that
        ``torch.distributed.checkpoint``'s flattened optimizer state dicts take it."""
        return codes.encoded(loading.with_int8_ranks(self, super().state_dict()))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; the whole checkpoint is validated before anything changes
        (:mod:`.loading`: a state dict of another method or rank, or with malformed values, is refused
        naming the key, and the optimizer keeps its state).

        Unlike ``torch.optim.Optimizer.load_state_dict``, tensors keep the dtype they were saved in
        (float32 moments of a bf16 weight stay float32, integer indices stay integers) and only move
        to their parameter's device. A ``step`` saved as a Python number (as torch.optim.AdamW loads
        them) becomes a tensor.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.__setstate__(loading.loaded(self, codes.decoded(state_dict)))
        self._cache().clear()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ introspection
    def state_nbytes(self) -> dict[str, int]:
        """Bytes of optimizer state kept between steps: moments, projectors (with what the update keeps
        beside them, e.g. Fira's r×r Gram matrix of the basis), other. Per optimizer: the DCT basis that
        ``projector="dct"`` shares between all weights (and optimizers) of one size is not in it;
        ``lowrank_optim.projectors.dct.shared_basis_nbytes()`` gives it, and ``lro.memory`` counts it once."""
        out = {"moments": 0, "projectors": 0, "other": 0}
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        moments = _state.moment_keys()
        for p, state in self.state.items():
            for key, value in state.items():
                if key == "projector":
                    projector = self._projector(p, group_of[p])
                    kept = _updates.for_group(group_of[p]).kept_bytes(projector, group_of[p], p)
                    out["projectors"] += projector.nbytes() + kept
                elif key in moments:
                    out["moments"] += _state.tensor_bytes(value)
                else:
                    out["other"] += _state.tensor_bytes(value)
        return out
