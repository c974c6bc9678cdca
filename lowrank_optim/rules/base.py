"""The inner-rule interface: what runs on the low-rank tensor R, and its registry.

A rule is a small class; a minimal one declares ``name``, ``keys`` (its state tensors),
``init(low, group)`` (zero state for a tensor like ``low``) and ``direction(low, state, group)`` (update
the state in place from ``low``, return the direction N). Everything else has a default:

* ``directions`` over lists (override it with a foreach version, as Adam does);
* ``reset`` zeroes every key, ``rotate`` maps every key shaped like R into a new basis (``|map(·)|`` for
  the keys in ``nonnegative``); override both when a key is not shaped like R (Adafactor's statistics);
* storage: every key shaped like R may be kept as blockwise INT8 under ``state_bits=8`` (the rule
  sees float tensors, dequantized before and requantized after); ``int8_keys = ()`` opts out, and
  ``fused`` maps a storage type to a kernel that runs the rule on the stored codes directly;
* FSDP2 shards: an ``elementwise`` rule runs on this rank's piece as it is; any other gathers the whole R
  and state, steps and keeps its piece, unless it overrides :meth:`Rule.directions` and uses the
  :class:`lowrank_optim.distributed.Split` it is given;
* the group's unprojected parameters (embeddings, norms, head) follow the rule named ``plain_rule``
  (``"adam"``: AdamW, as Muon advises); a rule whose ``steps_whole`` is True steps them through
  :meth:`Rule.step_whole` (Adam: torch's own AdamW), else by ``direction`` on the whole gradient;
* ``first_moment`` names the key of its momentum (shaped like R), if it keeps one, for projectors that read it;
* ``defaults`` adds group keys (with their defaults) that the rule reads, and ``check`` validates them.

The step counter ``state["step"]`` already counts this step when ``direction`` runs; a rule that
corrects for the age of its state (Adam's bias correction, Adafactor's β̂₂ₜ) reads :func:`steps`, which
restarts when ``on_refresh="reset"`` zeroes the state, as FRUGAL's code restarts its Adam.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..distributed import Split
from ..quant.storage import FLOAT, Storage, storage_of

Fail = Callable[[str, str], None]


class Rule:
    """Base class of the inner rules (see the module docstring)."""

    name: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ()
    #: How messages call the rule on whole parameters (default: its name).
    label: ClassVar[str] = ""
    #: Keys that hold non-negative values (second moments).
    nonnegative: ClassVar[tuple[str, ...]] = ()
    #: The key of its first moment (a momentum shaped like R, in R's coordinates: Adam's mean of R,
    #: Adafactor's of its updates), which a projector that reads it (COAP: ``Projector.reads_moment``) is
    #: given at its refresh; None: the rule keeps none.
    first_moment: ClassVar[str | None] = None
    #: Keys that may be stored as INT8; None: every key shaped like the low-rank tensor.
    int8_keys: ClassVar[tuple[str, ...] | None] = None
    #: Each element's direction depends only on that element's gradient and state.
    elementwise: ClassVar[bool] = False
    #: The rule for the group's parameters that are not projected.
    plain_rule: ClassVar[str] = "adam"
    #: Whether :meth:`step_whole` steps whole parameters (else ``direction`` on the whole gradient).
    steps_whole: ClassVar[bool] = False
    #: Group keys this rule reads, with their defaults.
    defaults: ClassVar[dict[str, Any]] = {}
    #: Kernels that run this rule on a storage's entries directly: storage type -> fn(low, state, group).
    fused: ClassVar[dict[type, Callable[[Tensor, dict[str, Any], dict[str, Any]], Tensor]]] = {}

    # ------------------------------------------------------------------ to declare
    def init(self, low: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Zero state for a tensor like ``low`` (its dtype and device)."""
        return {key: torch.zeros_like(low) for key in self.keys}

    def direction(self, low: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """Update ``state`` in place from ``low``; return the direction."""
        raise TypeError(f"rule {self.name!r} defines no direction(low, state, group)")

    def adamw_rms_keys(self, group: dict[str, Any]) -> dict[str, Any]:
        """Group keys that ``match_adamw_rms=True`` sets (where the group leaves them at their default) so that
        this rule's direction has the RMS of Adam's before the scale is matched; none by default (Adam's is
        Adam's; Adafactor adds a first moment)."""
        return {}

    def check(self, group: dict[str, Any], fail: Fail) -> None:
        """Validate this rule's group keys; ``fail(key, why)`` raises."""

    def check_parameter(self, shape: tuple[int, ...], group: dict[str, Any]) -> str | None:
        """Why this rule refuses a 2-D parameter of ``shape`` in a group of rank ``group["rank"]``
        (None: it does not; a parameter too small to project is then stepped as a plain one)."""
        return None

    # ------------------------------------------------------------------ defaults
    def directions(self, lows: Sequence[Tensor], states: Sequence[dict[str, Any]], group: dict[str, Any],
                   splits: Sequence[Split]) -> list[Tensor]:
        """``direction`` of each low-rank piece; on shards (``split.axis`` set) through :meth:`on_piece`."""
        return [self.direction(low, state, group) if split.whole or self.elementwise
                else self.on_piece(low, state, group, split)
                for low, state, split in zip(lows, states, splits)]

    def on_piece(self, low: Tensor, state: dict[str, Any], group: dict[str, Any], split: Split) -> Tensor:
        """``direction`` for this rank's piece of a split tensor: gather the whole tensor and the state that
        follows the split, step on every rank alike, keep this rank's piece."""
        whole_low = split.gather_low(low)
        pieces = {k: v for k, v in state.items() if k in split.pieces}
        whole = {**state, **{k: split.gather(v) for k, v in pieces.items()}}
        out = self.direction(whole_low, whole, group)
        for k, v in pieces.items():
            v.copy_(split.take(whole[k]))
        return split.take(out)

    def reset(self, state: dict[str, Any]) -> None:
        """Zero every state tensor (a new subspace starts from scratch)."""
        for key in self.keys:
            if isinstance(state.get(key), Tensor):
                state[key] = torch.zeros_like(state[key])

    def rotate(self, state: dict[str, Any], mapping: Callable[[Tensor], Tensor], split: Split,
               group: dict[str, Any]) -> None:
        """Carry the state into a new basis: ``mapping`` takes a tensor shaped like R in old coordinates to
        new ones (it acts along the rank axis, which is never split). Keys in ``nonnegative`` become
        ``|map(·)|``, so a second moment stays one."""
        for key in self.keys:
            x = state.get(key)
            if isinstance(x, Tensor):
                y = mapping(x)
                state[key] = (y.abs_() if key in self.nonnegative else y).to(x.dtype)

    def transfer(self, state: dict[str, Any], mapping: Callable[[Tensor], Tensor], squared: Callable[[Tensor], Tensor],
                 steps: int, split: Split, group: dict[str, Any]) -> None:
        """``on_refresh="transfer"`` (LDAdam): carry the state into a new basis accounting for what the change of
        basis does to its statistics; ``squared`` is the map with the change of basis squared element-wise,
        ``steps`` the updates the state has seen. Rules that define it override it (:meth:`transfers`)."""
        raise TypeError(f"rule {self.name!r} has no projection-aware transfer (on_refresh='transfer')")

    @classmethod
    def transfers(cls) -> bool:
        """Whether this rule defines :meth:`transfer`."""
        return cls.transfer is not Rule.transfer

    def step_whole(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                   group: dict[str, Any]) -> None:
        """Step whole parameters in place (for rules with ``steps_whole``)."""
        raise TypeError(f"rule {self.name!r} does not step whole parameters itself")

    def storable(self, key: str, value: Tensor, low: Tensor) -> bool:
        """Whether ``key`` may be stored as INT8 (see ``int8_keys``)."""
        if self.int8_keys is not None:
            return key in self.int8_keys
        return value.shape == low.shape

    def __repr__(self) -> str:
        return f"<rule {self.name!r}>"


def steps(state: dict[str, Any]) -> int:
    """The steps the rule's state has seen: the step count since its state last started (a subspace change
    under ``on_refresh="reset"`` starts it afresh, ``state["reset_step"]``), this step included."""
    reset = state.get("reset_step")
    return int(state["step"]) - (int(reset) if reset is not None else 0)


def descend(weight: Tensor, direction: Tensor, lr: float, decay: float) -> None:
    """W ← decay·W − lr·direction in place (decoupled weight decay, ``decay`` = 1 − lr·wd), the direction
    viewed as W and rounded to W's dtype once."""
    if decay != 1.0:
        weight.mul_(decay)
    weight.add_(direction.view(weight.shape).to(weight.dtype), alpha=-lr)


REGISTRY: dict[str, Rule] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Add a :class:`Rule` subclass to the registry under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise TypeError(f"register expects a Rule subclass, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    if cls.name in REGISTRY and type(REGISTRY[cls.name]) is not cls:
        raise ValueError(f"a rule named {cls.name!r} is already registered ({type(REGISTRY[cls.name]).__name__})")
    if cls.direction is Rule.direction and cls.directions is Rule.directions:
        raise TypeError(f"{cls.__name__} must define direction(low, state, group)")
    if not cls.label:
        cls.label = cls.name
    rule = cls()
    if len(inspect.signature(cls.init).parameters) == 2:  # init(self, low): the group is not needed
        plain_init = cls.init
        rule.init = lambda low, group: plain_init(rule, low)  # type: ignore[method-assign]
    REGISTRY[cls.name] = rule
    return cls


def get(name: str) -> Rule:
    """The registered rule ``name``."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown rule {name!r}; available: {', '.join(available())}") from None


def available() -> list[str]:
    return list(REGISTRY)


def run(rule: Rule, lows: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
        splits: list[Split] | None = None) -> list[Tensor]:
    """The rule's directions for stored states: fused kernels where the rule has one for the storage,
    else ``directions`` on float views of the state, written back after."""
    splits = splits or [Split.of_whole() for _ in lows]
    out: list[Tensor | None] = [None] * len(lows)
    views, todo = [], []
    for i, (low, state) in enumerate(zip(lows, states)):
        storage = _storage(rule, state)
        kernel = rule.fused.get(type(storage)) if storage is not None else None
        if kernel is not None:
            out[i] = kernel(low, state, group)
        else:
            views.append(load(rule, state))
            todo.append(i)
    if todo:
        found = rule.directions([lows[i] for i in todo], views, group, [splits[i] for i in todo])
        for i, view, direction in zip(todo, views, found):
            store(rule, states[i], view)
            out[i] = direction
    return out  # type: ignore[return-value]


def _storage(rule: Rule, state: dict[str, Any]) -> Storage | None:
    """The storage every present key of the rule shares (None when they differ)."""
    kinds = {type(storage_of(state, k)): storage_of(state, k) for k in rule.keys if k in state}
    return next(iter(kinds.values())) if len(kinds) == 1 else None


def load(rule: Rule, state: dict[str, Any]) -> dict[str, Any]:
    """The state as the rule sees it: float tensors for its keys (views of float entries, dequantized
    copies of quantized ones), other entries as they are."""
    view = {k: v for k, v in state.items()}
    for key in rule.keys:
        if key in state:
            storage = storage_of(state, key)
            if storage is not FLOAT:
                view[key] = storage.load(state, key, signed=key not in rule.nonnegative)
    return view


def store(rule: Rule, state: dict[str, Any], view: dict[str, Any]) -> None:
    """Write a view back into the stored state (requantizing quantized keys)."""
    for key in rule.keys:
        if key in state:
            storage_of(state, key).store(state, key, view[key], signed=key not in rule.nonnegative)
