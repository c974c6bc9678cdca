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

Two full-rank baselines beside ``adamw``, at every width:

* ``adafactor``: ``torch.optim.Adafactor`` over all parameters, at torch's defaults: lr 1e-2, which
  is the cap of the Adafactor paper's relative step size (Shazeer & Stern 2018, rho_t = min(1e-2,
  1/sqrt(t)); each update is scaled by the parameter's RMS, so it is not an AdamW-like lr), no
  momentum, factored second moment (a row and a column vector) for 2-D weights, full for the rest;
  weight decay 0.
* ``muon``: :class:`MuonWithAdamW`: ``torch.optim.Muon`` on the hidden 2-D weights (the linear
  layers that the low-rank presets project, see :func:`muon_split`) and ``torch.optim.AdamW`` on the
  embeddings, the output head, the norms and the biases, as Muon's documentation advises. Muon uses
  ``adjust_lr_fn="match_rms_adamw"`` (Moonshot's scaling, 0.2 * sqrt(max(A, B)), from "Muon is
  Scalable for LLM Training", arXiv:2502.16982): it gives the orthogonalized update the RMS of an
  AdamW update, so, as that paper and torch's Muon docs say, AdamW's lr and weight decay carry over.
  Both halves therefore take ``adamw``'s settings, lr 1e-3 (also torch.optim.Muon's default lr) and
  weight decay 0; momentum 0.95 with Nesterov and 5 Newton-Schulz steps are torch's (and Keller
  Jordan's) defaults. ``lr`` and ``weight_decay`` set both halves; ``betas`` and ``eps`` are the
  AdamW half's (Muon's own eps only guards its normalization and stays at torch's 1e-7).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import TrainError
from .references import preset_of, reference_twin

# Constructor arguments; every other option is a key of the low-rank parameter group.
_CONSTRUCTOR = ("lr", "weight_decay", "betas", "eps")
#: The full-rank baselines (torch's own optimizers) and the options each takes.
BASELINES: dict[str, tuple[str, ...]] = {
    "adamw": _CONSTRUCTOR,
    "adafactor": ("lr", "weight_decay", "beta2_decay", "eps", "d"),
    "muon": ("lr", "weight_decay", "betas", "eps", "momentum", "nesterov", "ns_steps", "adjust_lr_fn"),
}
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
    # torch's defaults, the paper's relative-step cap (module docstring)
    "adafactor": {"lr": 1e-2, "weight_decay": 0.0},
    # Muon with Moonshot's RMS matching takes AdamW's lr and weight decay (module docstring)
    "muon": {"lr": 1e-3, "weight_decay": 0.0, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
             "adjust_lr_fn": "match_rms_adamw"},
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
    # GaLore's settings: the Adafactor and orthogonal rules are scaled so GaLore's lr and scale carry over
    "galore_adafactor": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "scale": 0.25},
    "sumo": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "scale": 0.25},
    "lowrank": {**_LOW_RANK, "lr": 1e-2},
    # COAP: GaLore's settings (its LLaMA-1B recipe: lr 0.01, scale 0.25) and its own refresh interval, T_u 32
    "coap": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "scale": 0.25, "update_proj_gap": 32},
    # GWT: the official LLaMA scripts' lr 0.01 and scale 0.25 (level 2); rank only chooses the projected weights
    "gwt": {**_LOW_RANK, "lr": 1e-2, "scale": 0.25},
    # Grass: GaLore's settings, which its pretraining runs share (lr 0.01, scale 0.25, gap 200)
    "grass": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "scale": 0.25},
    # Online Subspace Descent: GaLore's settings, as its official scripts (gap 200: P's lr is 1/200)
    "osd": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "scale": 0.25},
    # DCT-AdamW: the official default refresh (every step) and scale 1, with GaLore's lr
    "dct_adamw": {**_LOW_RANK, "lr": 1e-2, "update_proj_gap": 1},
    # GoLore: GaLore's settings, then random Stiefel projections for the last 1 − rand_ratio of the run (0.8:
    # the official rand_ratio), the switch at the first refresh at or after rand_ratio · max_steps
    "golore": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "scale": 0.25, "rand_ratio": 0.8},
    # Trion: its update is the orthogonal rule's RMS-matched one (as SUMO), so SUMO's lr and scale; refresh every step
    "trion": {**_LOW_RANK, "lr": by_width(3e-2, 1e-2), "scale": 0.25, "update_proj_gap": 1},
    # any preset without an entry of its own
    "*": {**_LOW_RANK, "lr": 1e-2},
}


def _run_length_presets() -> dict[str, type]:
    """Presets that need the run's length, so not in ``lro.PRESETS`` (whose classes build from groups
    alone): ``golore`` places its switch at ``rand_ratio`` of the steps."""
    from ..optim import GoLore

    return {"golore": GoLore}


def _switch_step(rand_ratio: Any, max_steps: int | None) -> int:
    """GoLore's switch step: ``rand_ratio`` of the run; without a run length (``memory``, ``compare``'s
    checks), never: those count GaLore's state, which GoLore keeps until the switch."""
    if isinstance(rand_ratio, bool) or not isinstance(rand_ratio, (int, float)) or not 0.0 <= rand_ratio <= 1.0:
        raise TrainError(f"golore: rand_ratio must be a number in [0, 1] (the official 0.8: random projections "
                         f"for the last 20% of the steps), got {rand_ratio!r}")
    return 10**9 if max_steps is None else int(rand_ratio * max_steps)


def available() -> list[str]:
    """Every name :func:`build_optimizer` accepts: the baselines ``adamw``, ``adafactor`` and ``muon``,
    the keys of ``lro.PRESETS``, then the presets that need the run's length (``golore``)."""
    from .. import PRESETS

    return [*BASELINES, *(k for k in PRESETS if k not in BASELINES), *_run_length_presets()]


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

    name = preset_of(name) or name  # ref:PRESET has its preset's settings
    if name not in BASELINES and name not in PRESETS and name not in _run_length_presets():
        keys = (f" (name:key=value entries are for `compare --optimizers`; pretrain takes the keys as flags: "
                f"--optimizer {name.split(':')[0]} --rank ... --update-proj-gap ...)") if ":" in name and "=" in name else ""
        raise TrainError(f"unknown optimizer {name!r}; choose one of: {', '.join(available())}{keys}")
    settings = dict(DEFAULTS.get(name, DEFAULTS["*"]))
    if options.get("match_adamw_rms") is True and options.get("scale") is None:
        # match_adamw_rms sets the scale itself: the table's (the paper's, for the paper's lr) gives way
        settings.pop("scale", None)
    settings.update({k: v for k, v in options.items() if v is not None})
    if name in BASELINES:
        extra = sorted(set(settings) - set(BASELINES[name]))
        if extra:
            raise TrainError(f"{name} takes no low-rank options ({', '.join(extra)}); it has {', '.join(BASELINES[name])}")
    hidden = _hidden_size(model)
    return {k: (v(hidden) if callable(v) else v) for k, v in settings.items()}


def build_optimizer(name: str, model: nn.Module, *, max_steps: int | None = None, **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a baseline or a key of ``lro.PRESETS``) for ``model``'s parameters.

    Low-rank presets get ``lro.param_groups(model, rank=..., update_proj_gap=..., scale=..., <other
    group keys>)``: every linear layer except the output head is projected; embeddings, norms and the
    head are plain AdamW in the same optimizer, at the same lr. ``adamw`` is ``torch.optim.AdamW``
    and ``adafactor`` ``torch.optim.Adafactor`` over all parameters; ``muon`` is
    :class:`MuonWithAdamW` over :func:`muon_split`'s two sets. Options override :data:`DEFAULTS`
    (``lr``, ``weight_decay``, ``betas``, ``eps``, ``rank``, ``update_proj_gap``, ``scale``,
    ``projector``, ``proj_type``, ...; :data:`BASELINES` lists what each baseline takes). ``max_steps``,
    the run's length, places GoLore's switch (``rand_ratio`` of it). ``ref:PRESET`` is the preset's
    reference package at the preset's resolved settings (:mod:`lowrank_optim.train.references`).
    """
    from .. import PRESETS, param_groups
    from ..optim import RankFallbackWarning
    from ..optim.groups import check_options, reference_keys

    reference = preset_of(name)
    if reference is not None:  # the paper's package at the settings our preset resolves to
        return reference_twin(reference, build_optimizer(reference, model, max_steps=max_steps, **options))
    settings = optimizer_settings(name, model, **options)
    if name in BASELINES:
        kw = {k: tuple(v) if k in ("betas", "eps") and isinstance(v, list) else v for k, v in settings.items()}
        try:
            if name == "adamw":
                return torch.optim.AdamW(model.parameters(), **kw)
            if name == "adafactor":
                return torch.optim.Adafactor(model.parameters(), **kw)
            hidden, rest = muon_split(model)
            groups = [{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}]
            return MuonWithAdamW([g for g in groups if g["params"]], **kw)
        except (TypeError, ValueError) as err:
            raise TrainError(f"{name}: {err}") from None
    ctor = {k: settings[k] for k in _CONSTRUCTOR if k in settings}
    if "betas" in ctor:
        ctor["betas"] = tuple(ctor["betas"])
    try:
        keys = reference_keys({k: v for k, v in settings.items() if k not in _CONSTRUCTOR}, name)
    except ValueError as err:
        raise TrainError(str(err)) from None
    rank = keys.pop("rank")
    cls = PRESETS.get(name) or _run_length_presets()[name]
    if "rand_ratio" in keys:
        switch = _switch_step(keys.pop("rand_ratio"), max_steps)
        keys["projector_options"] = {"switch_step": switch, **(keys.get("projector_options") or {})}
    try:
        groups = param_groups(model, rank=rank, **keys)
        with warnings.catch_warnings():
            # a short side <= rank (llama_tiny's 128-wide layers at rank 128) is plain AdamW, by design
            warnings.simplefilter("ignore", RankFallbackWarning)
            opt = cls(groups, **ctor)
        check_options(opt, keys, "")
    except (TypeError, ValueError) as err:
        raise TrainError(f"{name}: {err}") from None
    _check_something_projected(name, opt)
    return opt


def _check_something_projected(name: str, opt: torch.optim.Optimizer) -> None:
    """Refuse a rank that leaves every weight the preset would project as plain AdamW (its short side is at or
    below the rank): the run would be AdamW at the preset's lr, reported under the preset's name."""
    from ..groups import all_unprojected_error

    why = all_unprojected_error(opt.param_groups)  # the memory command's note counts the same way
    if why:
        raise TrainError(f"{name}: {why}")


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(hidden, rest)``: the parameters Muon updates and those AdamW updates, in model order.

    ``hidden`` is the weight of every ``nn.Linear`` except the output head (``lm_head``) and any
    weight tied to an embedding: exactly the weights ``lro.param_groups`` projects in the low-rank
    presets, so every method is compared on the same split. ``rest`` is everything else: embeddings,
    the head, norms, biases (Muon is for 2-D hidden weights only, as its documentation says)."""
    from .. import param_groups

    groups = param_groups(model)
    hidden = [p for g in groups if g.get("rank") is not None for _, p in g["params"]]
    rest = [p for g in groups if g.get("rank") is None for _, p in g["params"]]
    return hidden, rest


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on some parameters and ``torch.optim.AdamW`` on the others, as one
    optimizer (the ``muon`` baseline; see the module docstring for its defaults).

    >>> hidden, rest = muon_split(model)
    >>> opt = MuonWithAdamW([{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}], lr=1e-3)

    Every parameter group says which rule updates it with ``use_muon`` (the convention of Keller
    Jordan's ``MuonWithAuxAdam``); a group may override any of its rule's settings (``lr``,
    ``momentum``, ``betas``...). Each group is completed and checked by the rule's own torch class
    (Muon refuses parameters that are not 2-D), so a Muon group holds exactly ``torch.optim.Muon``'s
    keys and an AdamW group ``torch.optim.AdamW``'s, plus ``use_muon``.

    The groups and one ``state`` for all parameters belong to this optimizer, so it is an ordinary
    single ``torch.optim.Optimizer``: lr schedulers set every group's lr (both halves follow the
    schedule), and ``state_dict()`` / ``load_state_dict()`` (torch's own, unchanged), ``zero_grad()``
    and layer-wise stepping (``lro.layerwise`` narrows ``param_groups``) see all parameters.
    :meth:`step` runs one ``torch.optim.Muon`` and one ``torch.optim.AdamW`` that own nothing: each
    is handed this optimizer's groups of its rule and the shared ``state`` (the two touch disjoint
    parameters' entries) just before its ``step()``, so the numbers are torch's own, bit for bit
    (a test runs the two by hand and compares), and nothing of theirs can go stale after a
    ``load_state_dict()``. Global optimizer step hooks therefore also see the two inner steps.

    ``lr`` and ``weight_decay`` apply to both rules (with ``adjust_lr_fn="match_rms_adamw"`` Muon
    takes AdamW's values); ``betas`` and ``eps`` are AdamW's; ``momentum``, ``nesterov``,
    ``ns_steps`` and ``adjust_lr_fn`` are Muon's.
    """

    _MUON_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_steps", "adjust_lr_fn")
    _ADAMW_KEYS = ("lr", "weight_decay", "betas", "eps")

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = "match_rms_adamw",
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)

    @staticmethod
    def _rule(use_muon: bool) -> type[torch.optim.Optimizer]:
        return torch.optim.Muon if use_muon else torch.optim.AdamW

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict) or "use_muon" not in param_group:
            raise ValueError("MuonWithAdamW takes parameter groups with use_muon=True (Muon: the 2-D hidden "
                             "weights) or use_muon=False (AdamW: everything else)")
        group = dict(param_group)
        use_muon = bool(group.pop("use_muon"))
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        keys = self._MUON_KEYS if use_muon else self._ADAMW_KEYS
        # torch's own class fills in and checks the rule's settings (and Muon's 2-D requirement)
        full = self._rule(use_muon)([group], **{k: self.defaults[k] for k in keys}).param_groups[0]
        defaults, self.defaults = self.defaults, {}  # no other rule's keys in this group
        try:
            super().add_param_group({**full, "use_muon": use_muon})
        finally:
            self.defaults = defaults

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Muon step of the ``use_muon`` groups, then one AdamW step of the others."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        engines = self.__dict__.setdefault("_engines", {})  # not pickled: rebuilt on demand
        for use_muon in (True, False):
            groups = [g for g in self.param_groups if bool(g["use_muon"]) is use_muon and g["params"]]
            if not groups:
                continue
            engine = engines.get(use_muon)
            if engine is None:
                engine = engines[use_muon] = self._rule(use_muon)([groups[0]["params"][0]])
            engine.param_groups = groups
            engine.state = self.state
            engine.step()
        return loss


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state kept between steps: ``state_nbytes()`` for ours, the state tensors'
    bytes for any other ``torch.optim`` optimizer, with the tensors its state's objects hold (the reference
    packages keep their projection matrices in a projector object)."""
    nbytes = getattr(opt, "state_nbytes", None)
    if callable(nbytes):
        return int(sum(nbytes().values()))
    total = 0
    for state in opt.state.values():
        for value in state.values():
            held = [value] if isinstance(value, torch.Tensor) else list(getattr(value, "__dict__", {}).values())
            for t in held:
                if isinstance(t, torch.Tensor):
                    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's piece
                    total += local.numel() * local.element_size()
    return total


__all__ = ["BASELINES", "DEFAULTS", "MuonWithAdamW", "available", "build_optimizer", "muon_split", "optimizer_settings",
           "state_bytes"]
