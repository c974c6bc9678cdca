"""Hugging Face Trainer: our optimizers built from ``TrainingArguments``, and layer-wise updates inside it.

>>> import lowrank_optim as lro
>>> trainer = Trainer(model=model, args=args, train_dataset=ds,
...                   optimizers=lro.hf.optimizers(model, args, "galore"))

:func:`optimizers` reads what Trainer's own optimizer would read, so the run keeps the user's settings:
``learning_rate``, ``weight_decay`` (and which parameters decay: Trainer's
``get_decay_parameter_names``, i.e. no decay on biases and norms), ``adam_beta1``, ``adam_beta2``,
``adam_epsilon``; the schedule (``lr_scheduler_type``, ``lr_scheduler_kwargs``, ``warmup_steps``,
``max_steps``) through transformers' own ``get_scheduler``; ``optim_target_modules``
(which linear layers are projected, matched as Trainer's GaLore path matches them) and the
``optim_args`` string (``"rank=64, update_proj_gap=100, scale=0.25, proj_type=std"``, and APOLLO's
``proj`` and ``scale_type``). Embeddings and the output head are never projected (``lro.param_groups``).

The learning rate is AdamW's: unless a ``scale`` is given (in ``optim_args`` or as an option), each
projected group gets ``match_adamw_rms=True``, which scales its update to the RMS of an AdamW update,
so the ``learning_rate`` tuned for Trainer's default AdamW is the one to keep (README, "Coming from
AdamW").

``layerwise=True`` steps each parameter inside the backward (``lro.layerwise``), with Trainer's
``gradient_accumulation_steps`` and ``max_grad_norm``; it needs :class:`LayerwiseTrainer` in place of
``Trainer``, which routes Trainer's backward through the layer-wise handle (clipping needs the global
norm before the first update, which only the handle's own backward can measure).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

try:
    import transformers
except ImportError as err:  # pragma: no cover - the train extra brings it
    raise ImportError('lowrank_optim.hf needs transformers: pip install "lowrank-optim[train]"') from err

from .groups import all_unprojected_error, is_linear, param_groups, some_unprojected_note
from .layerwise import LayerwiseUpdates
from .layerwise import layerwise as _layerwise
from .optim import APOLLOMini, LowRankAdamW, RankFallbackWarning
from .optim.groups import check_options, reference_keys
from .optim.options import option_value

__all__ = ["LayerwiseOptimizer", "LayerwiseTrainer", "optimizers", "parse_optim_args"]

#: Keys that hold for every parameter, as the constructor's own arguments do (``cls(model, nonfinite=...)``):
#: what a step does with inf/NaN, the direction, torch's loop choice, the moments' storage and the update rule
#: with its options. The other keys are the projection's, for the projected group only.
WHOLE_OPTIMIZER = frozenset({"nonfinite", "maximize", "foreach", "state_bits", "min_8bit_size", "stochastic_rounding",
                             "rule", "beta2_decay", "clip_threshold", "momentum", "nesterov", "orthogonalize",
                             "ns_steps"})

def parse_optim_args(text: str | None) -> dict[str, Any]:
    """``"rank=64, scale=0.25, proj_type=std"`` -> ``{"rank": 64, "scale": 0.25, "proj_type": "std"}``,
    split as Trainer splits ``optim_args``; numbers become numbers, and the reference packages' keys ours
    (``lro.optim.groups.REFERENCE_KEYS``: Trainer's APOLLO ``proj`` / ``scale_type`` are our ``projector`` /
    ``scaling``, fira's ``alpha`` our ``scale``)."""
    out: dict[str, Any] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"TrainingArguments.optim_args: {item!r} is not key=value (write e.g. 'rank=64,scale=0.25')")
        out[key] = option_value(value)
    return reference_keys(out, "TrainingArguments.optim_args")


def _target_modules(model: nn.Module, targets: str | list[str] | None) -> Any:
    """A predicate for the linear layers ``optim_target_modules`` selects, matched as Trainer's GaLore
    path matches them (a string: a regex matched in full; a list: names, substrings or regexes); None
    when it is not set or ``"all-linear"`` (every linear layer but the head and tied ones)."""
    if targets is None or (isinstance(targets, str) and targets.replace("_", "-") == "all-linear"):
        return None
    if not isinstance(targets, (str, list)):
        raise ValueError(f"TrainingArguments.optim_target_modules must be a regex string, a list of strings or "
                         f"'all-linear', got {targets!r}")
    from transformers.trainer_utils import check_target_module_exists

    if not any(is_linear(m) and check_target_module_exists(targets, n) for n, m in model.named_modules()):
        raise ValueError(f"TrainingArguments.optim_target_modules={targets!r} matches no nn.Linear of the model")
    return lambda name, module: bool(check_target_module_exists(targets, name))


def _decay_exempt(model: nn.Module) -> set[str]:
    """The parameter names Trainer gives no weight decay (biases and norms)."""
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    return {n for n, _ in model.named_parameters() if n not in decay}


def optimizers(model: nn.Module, args: Any, optimizer: str | type = "galore", *, layerwise: bool = False,
               num_training_steps: int | None = None, **options: Any) -> tuple[Optimizer, Any]:
    """``(optimizer, lr_scheduler)`` for ``Trainer(optimizers=...)``, from ``args`` (``TrainingArguments``).

    Args:
        model: the model Trainer trains, on its device already (build this after ``model.to(...)``).
        args: the run's ``TrainingArguments`` (see the module doc for what is read).
        optimizer: a name of ``lro.PRESETS`` (``galore``, ``apollo``, ``apollo_mini``, ``frugal``, ``fira``,
            ...) or one of our optimizer classes.
        layerwise: step inside the backward (use :class:`LayerwiseTrainer`).
        num_training_steps: the schedule's length when ``args.max_steps`` is not set; without either the
            scheduler returned is None and Trainer builds it itself, from the same arguments.
        **options: group keys (``rank``, ``scale``, ``projector``, ``match_adamw_rms``, ...); they win over
            ``optim_args``. Those of :data:`WHOLE_OPTIMIZER` (``nonfinite``, ``maximize``, ``foreach``,
            ``state_bits``, ...) reach every group, as the constructor's arguments do; the projection's keys
            reach the projected group.
    """
    from . import PRESETS

    cls = PRESETS.get(optimizer) if isinstance(optimizer, str) else optimizer
    if not (isinstance(cls, type) and issubclass(cls, LowRankAdamW)):
        raise ValueError(f"lro.hf.optimizers: unknown optimizer {optimizer!r}; choose one of {', '.join(PRESETS)}")
    keys = reference_keys({**parse_optim_args(getattr(args, "optim_args", None)), **options}, "lro.hf.optimizers")
    if "scale" not in keys:
        keys.setdefault("match_adamw_rms", True)
    rank = keys.pop("rank", "auto")
    whole = {k: keys.pop(k) for k in list(keys) if k in WHOLE_OPTIMIZER}
    targets = _target_modules(model, getattr(args, "optim_target_modules", None))
    groups = param_groups(model, rank=rank, target_modules=targets, no_decay=_decay_exempt(model), **keys)
    frozen = [n for g in groups for n, p in g["params"] if not p.requires_grad]
    for g in groups:
        g["params"] = [(n, p) for n, p in g["params"] if p.requires_grad]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"lro.hf.optimizers: the model has no trainable parameter ({len(frozen)} frozen)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankFallbackWarning)  # one line for all of them below, not one per weight
        opt = cls(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                  weight_decay=args.weight_decay, **whole)
    check_options(opt, keys, "lro.hf.optimizers (TrainingArguments.optim_args and options)")
    _check_projected(opt, cls)
    if issubclass(cls, APOLLOMini) and keys.get("match_adamw_rms") is True:
        warnings.warn("lro.hf.optimizers: APOLLO-Mini at AdamW's learning_rate (match_adamw_rms=True) trails AdamW by "
                      "6-20% on our models, as apollo-torch does (README, Coming from AdamW); its paper's setting is "
                      "10x AdamW's learning_rate with optim_args='scale=auto'", stacklevel=2)
    if layerwise:
        opt = LayerwiseOptimizer(model, opt, args)
    return opt, _scheduler(opt, args, num_training_steps)


def _check_projected(opt: LowRankAdamW, cls: type) -> None:
    """Refuse a rank that projects nothing (the run would be AdamW under ``cls``'s name); warn once, naming the
    shapes, when it leaves some weights plain."""
    where = f"lro.hf.optimizers: {cls.__name__}"
    if not any(g["rank"] is not None for g in opt.param_groups):
        raise ValueError(f"{where}: the model has no linear layer to project (nn.Linear or Hugging Face Conv1D "
                         "weights, the output head and embeddings excepted), so the run would be plain AdamW; give "
                         "its 2-D weights a group with a rank by hand ({'params': [...], 'rank': r}) or train with "
                         "Trainer's own AdamW")
    why = all_unprojected_error(opt.param_groups)
    if why:
        raise ValueError(f"{where}: {why} (TrainingArguments.optim_args or rank=)")
    note = some_unprojected_note(opt.param_groups)
    if note:
        warnings.warn(f"{where}: {note}", RankFallbackWarning, stacklevel=3)


def _scheduler(opt: Optimizer, args: Any, num_training_steps: int | None) -> Any:
    """transformers' ``get_scheduler`` as Trainer calls it, or None when the length is not known yet."""
    steps = args.max_steps if args.max_steps and args.max_steps > 0 else num_training_steps
    if not steps:
        return None
    return transformers.get_scheduler(args.lr_scheduler_type, optimizer=opt,
                                      num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps,
                                      scheduler_specific_kwargs=args.lr_scheduler_kwargs)


def _clipping(args: Any) -> float | None:
    """The clipping norm of ``TrainingArguments`` as Trainer reads it (0 or None: no clipping)."""
    return float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None


class LayerwiseOptimizer(Optimizer):
    """One of our optimizers stepped layer by layer inside the backward, as Trainer's optimizer.

    Its ``param_groups``, ``state``, ``state_dict()`` and ``load_state_dict()`` are the wrapped
    optimizer's (so schedulers, checkpoints and resume are unchanged); ``step()`` and ``zero_grad()`` are
    no-ops, since the backward has stepped and freed every gradient. ``handle`` is the
    :class:`~lowrank_optim.layerwise.LayerwiseUpdates` (accumulation ``args.gradient_accumulation_steps``,
    clipping at ``args.max_grad_norm``). Use it with :class:`LayerwiseTrainer`.
    """

    def __init__(self, model: nn.Module, optimizer: LowRankAdamW, args: Any) -> None:
        # not Optimizer.__init__: the groups, state and hooks are the wrapped optimizer's own
        self.__dict__["optimizer"] = optimizer
        self.__dict__["handle"] = _layerwise(model, optimizer, accumulation_steps=args.gradient_accumulation_steps,
                                             max_grad_norm=_clipping(args))
        self.__dict__["trainer_attached"] = False

    def __getattr__(self, name: str) -> Any:  # the hook dictionaries, defaults, ...
        inner = self.__dict__.get("optimizer")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def train(self) -> None:
        """Called by Trainer before each forward: refuses to run under a plain Trainer."""
        if not self.trainer_attached:
            raise RuntimeError("lro.hf.optimizers(..., layerwise=True) steps inside the backward, which needs "
                               "lro.hf.LayerwiseTrainer in place of transformers.Trainer (same arguments)")

    def eval(self) -> None:
        pass

    def step(self, closure: Any = None) -> Any:
        """Nothing: the backward stepped every parameter."""
        return None if closure is None else closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: the stepping backward freed every gradient (and accumulation must keep its own)."""

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"LayerwiseOptimizer({self.handle!r})"


class LayerwiseTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose backward runs through the layer-wise handle of
    ``lro.hf.optimizers(model, args, ..., layerwise=True)``: each parameter is stepped as soon as its
    gradient is complete, with Trainer's gradient accumulation and clipping, and the numbers of the
    ordinary run (Trainer's own layer-wise GaLore refuses accumulation).

    It takes Trainer's arguments unchanged. One process only (no DDP, FSDP or DeepSpeed) and no fp16
    ``GradScaler`` (use bf16): both are refused here, before training. The logged ``grad_norm`` is the
    norm the handle measured before clipping; with ``max_grad_norm=0`` none is logged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opt = self.optimizer
        if not isinstance(opt, LayerwiseOptimizer):
            raise ValueError("LayerwiseTrainer takes optimizers=lro.hf.optimizers(model, args, ..., layerwise=True)")
        accelerator = self.accelerator
        if accelerator.distributed_type.value != "NO" or accelerator.num_processes != 1:
            raise ValueError(f"LayerwiseTrainer runs in one process; this run is {accelerator.distributed_type} "
                             "(layer-wise updates under DDP: lro.layerwise(ddp_model, opt) in your own loop)")
        if accelerator.scaler is not None:
            raise ValueError("LayerwiseTrainer cannot use fp16's GradScaler (its inf check needs every gradient "
                             "before any update); use bf16=True")
        handle: LayerwiseUpdates = opt.handle
        self._lro_handle = handle
        self._check_clipping()
        opt.__dict__["trainer_attached"] = True

        def backward(loss: torch.Tensor, **kw: Any) -> None:
            # Accelerator.backward for one process without DeepSpeed or a scaler, through the handle;
            # Trainer says which micro-batch is the last of its accumulation (sync_gradients)
            self._check_clipping()
            handle.backward(loss / accelerator.gradient_accumulation_steps, steps=accelerator.sync_gradients, **kw)

        accelerator.backward = backward

    def _check_clipping(self) -> None:
        """The handle clips at the norm of the arguments the optimizer was built from; Trainer's own arguments
        must say the same (a sweep that replaces them, an edited ``max_grad_norm``), or the run would clip
        at a value nobody set, silently."""
        built, now = self._lro_handle._max_grad_norm, _clipping(self.args)
        if built != now:
            raise ValueError(f"LayerwiseTrainer: its TrainingArguments have max_grad_norm={self.args.max_grad_norm}, "
                             f"but the layer-wise optimizer was built to clip at {built} (no clipping: None); build "
                             "it with lro.hf.optimizers(model, args, ..., layerwise=True) from the Trainer's args")

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """The handle clipped inside the backward; its norm before clipping is what Trainer logs."""
        norm = self._lro_handle.last_grad_norm
        return torch.zeros(()) if norm is None else norm

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """Without clipping (``max_grad_norm=0``) there is no norm to log: Trainer would measure the
        gradients the layer-wise backward has already freed (0.0 at every step); measuring it before the
        updates would take a second backward. So ``grad_norm`` is left out of the logs, as Trainer does
        for a norm it has not got (transformers before ``_get_grad_norm`` never measured it there)."""
        return grad_norm
