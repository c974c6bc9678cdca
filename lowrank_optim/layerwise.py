"""Layer-wise updates: each parameter is stepped inside the backward, as soon as its gradient is
complete, and its gradient is freed at once, so a full set of gradients never exists.

>>> opt = lro.GaLoreAdamW(lro.param_groups(model, rank=128), lr=1e-2)
>>> lw = lro.layerwise(model, opt, accumulation_steps=4, max_grad_norm=1.0)
>>> for tokens in loader:
...     loss = lm_loss(model, tokens) / 4
...     if lw.backward(loss):        # True on every 4th call: the optimizer stepped inside it
...         sched.step()

The numbers are those of the ordinary loop (``k`` backward passes, ``clip_grad_norm_``,
``opt.step()``, ``opt.zero_grad()``): every update rule here updates each parameter from its own
gradient and state only, so stepping one parameter at a time changes nothing (bit for bit on CPU, as
the tests check; not measured on GPU). Measured on LLaMA-60M (batch 4 × 128, GaLore rank 128, a
2-core CPU): the step takes the ordinary loop's time (0.96–0.97×), and the most gradient memory held
at once falls from 221.5 MiB (all of it) to 62.5 MiB (the largest single tensor, the 32000 × 512
embedding). How each piece is done and what it costs:

* **Stepping.** ``torch.Tensor.register_post_accumulate_grad_hook`` on every parameter of the
  optimizer (a frozen one's never fires; it steps once ``lro.LayerSampler`` unfreezes it). The hook
  runs once per backward pass, after autograd has written the parameter's complete gradient into ``.grad``; it calls ``optimizer.step_parameters([p])``
  (``LowRankAdamW`` and every preset) and sets ``p.grad = None``. Any other ``torch.optim`` optimizer is
  stepped through its own ``step()`` with its ``param_groups`` narrowed to the parameter for the
  call, so its state, ``state_dict()``, lr and schedulers are the optimizer's own; this needs a rule
  that updates each parameter independently of the others (all of ``torch.optim`` except ``LBFGS``,
  which takes a closure and is refused) and runs its step hooks once per parameter.
* **Accumulation** (``accumulation_steps=k``): the first k − 1 backward passes only accumulate into
  ``.grad`` as usual, so their gradients are held as usual; the saving is the k-th pass's, whose
  gradients are consumed one by one.
* **Clipping** (``max_grad_norm``): the global norm needs every gradient before any update. On a
  stepping pass :meth:`LayerwiseUpdates.backward` first runs a *measuring* backward
  (``retain_graph=True``): each hook adds this pass's gradient to what earlier passes accumulated,
  takes that tensor's norm, and drops it, so one parameter's gradient exists at a time and nothing is
  counted twice (the accumulated gradients are moved aside by reference, not copied). The total
  norm and clip coefficient are then exactly ``clip_grad_norm_``'s, and the real backward clips and
  steps each gradient as it completes. Cost: **one extra backward pass per optimizer step** (not per
  micro-batch; with k = 4 it is 1 extra in 4): 1.50–1.63× the ordinary step's time in the setting
  above (with activation checkpointing the measuring pass recomputes the checkpointed forward too).
  The activations are kept through the measuring pass and freed in the real one, so the peak is that
  of an ordinary backward's start. No gradient set is ever held. (``torch.amp.GradScaler``'s inf
  check has the same need and no such pass: use bf16, which needs no scaler.) The real backward runs the
  kept graph a second time, which a ``torch.compile``'d (inductor) backward does not do faithfully in
  torch 2.13: on a nanoGPT block its second run's gradients were 20% off the first's. So clipping refuses
  a loss whose graph holds a compiled backward, before anything runs; compile without clipping, clip
  without compile, or use the ordinary loop.
* **Non-finite gradients** (``nonfinite=`` of a ``LowRankAdamW``): with clipping the measuring pass
  finds them before the first update, and the step is skipped (counted once) or refused whole, as
  ``opt.step()`` would. Without it each parameter steps as its gradient arrives: those before the first
  non-finite gradient stay stepped, the rest of that backward is skipped, and the skip counts once.
* **Schedulers**: the update inside the backward reads the group's current lr; call
  ``scheduler.step()`` after the stepping backward, as after ``opt.step()``.
* **Checkpoints**: the state is the optimizer's own, so ``optimizer.state_dict()`` /
  ``load_state_dict()`` resume bit-identically. Save at a step boundary (when :meth:`backward`
  returned True): gradients of an unfinished accumulation are not part of any checkpoint.
* **DDP** (pass the ``DistributedDataParallel`` wrapper): a post-accumulate-grad hook fires *before*
  DDP's reducer sees the gradient, so it holds the local, un-reduced gradient (tested). The handle
  therefore registers a DDP communication hook instead: it all-reduces each bucket exactly as DDP's
  default does (divide by the world size, then sum), and steps the bucket's parameters from the
  reduced gradient when the next bucket arrives (so each all-reduce still overlaps the backward),
  the last at the end of the backward. Use ``gradient_as_bucket_view=True``: DDP's buckets hold a
  full set of gradients whatever the optimizer does, and with views ``.grad`` costs nothing on top;
  with ``False`` DDP re-creates every ``.grad`` from its buckets at the end of the backward (freed at
  once, but a full copy exists briefly). Under DDP layer-wise updates therefore save no gradient
  memory; they keep the loop and numbers identical, and with ``max_grad_norm`` the norm is taken from
  the reduced buckets and the whole step runs at the end of the backward (no extra backward: the
  buckets already hold every gradient). For the accumulation passes use ``with lw.no_sync():``
  (DDP's ``no_sync`` on the first k − 1 passes, nothing on the k-th). ``static_graph`` and
  ``find_unused_parameters`` work (a parameter unused on this rank is stepped after DDP's finalize
  gives it the reduced gradient); a communication hook of your own or DDP's ``mixed_precision``
  cannot be combined (DDP takes one communication hook), and DDP's join (uneven inputs) is not
  supported.

Plain ``loss.backward()`` works too when ``max_grad_norm`` is None (the end of the backward is found
with autograd's end-of-backward callback), except with reentrant activation checkpointing
(``use_reentrant=True``), whose inner backward would look like a pass of its own: that raises a
RuntimeError at the first checkpointed segment; :meth:`LayerwiseUpdates.backward` marks the pass
itself and works with both kinds of checkpointing. Do not call ``opt.step()`` or
``opt.zero_grad()`` in the loop (both are harmless no-ops at a step boundary; ``zero_grad`` between
accumulation passes would discard the accumulated gradients). A parameter updated in place inside the
backward must not be needed by a later part of it: that holds for every parameter whose uses all
receive gradient, and fails loudly (autograd's "modified by an inplace operation") for a weight used
through ``.detach()``. A backward that raises (``NonFiniteGradientError`` at a refresh, say) leaves
the parameters it already stepped stepped: call ``opt.zero_grad()`` before going on.
"""

from __future__ import annotations

import contextlib
import gc
import math
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Variable
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from .distributed import is_sharded
from .optim.nonfinite import SKIPPED

__all__ = ["LayerwiseUpdates", "layerwise"]

# id(parameter) -> the handle stepping it, so one parameter is never stepped twice per backward
_ACTIVE: dict[int, weakref.ref[LayerwiseUpdates]] = {}


def layerwise(
    model_or_params: nn.Module | Tensor | Iterable[Any],
    optimizer: Optimizer,
    *,
    accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
) -> LayerwiseUpdates:
    """Step ``optimizer`` layer by layer inside the backward; returns the handle (see the module doc).

    Args:
        model_or_params: the model (pass the ``DistributedDataParallel`` wrapper under DDP), or its
            parameters (tensors, ``(name, tensor)`` pairs or parameter-group dicts). Every parameter of
            the optimizer that requires grad must be among them.
        optimizer: ``LowRankAdamW`` or a preset (stepped with ``step_parameters``), or any other
            ``torch.optim.Optimizer`` whose rule updates each parameter independently.
        accumulation_steps: step on every k-th backward pass; the k − 1 before it only accumulate.
        max_grad_norm: clip the accumulated gradients by their global 2-norm, exactly as
            ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)``, before the step: the norm sums
            the parameters in ``model_or_params``'s order (the model's), as a loop's clipping does.
            Costs one extra backward per optimizer step (none under DDP); needs
            :meth:`LayerwiseUpdates.backward`.

    Everything is validated before any hook is registered.

    Usage::

        lw = lro.layerwise(model, opt, accumulation_steps=4, max_grad_norm=1.0)
        for tokens in loader:
            if lw.backward(lm_loss(model, tokens) / 4):   # stepped inside this backward
                sched.step()
        lw.remove()                                       # or: with lro.layerwise(...) as lw:
    """
    return LayerwiseUpdates(
        model_or_params, optimizer, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm
    )


class _DDPHookState:
    """The state DDP passes to the communication hook; it outlives a removed handle (DDP cannot drop a
    hook), and then the hook is DDP's default all-reduce."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.handle: weakref.ref[LayerwiseUpdates] | None = None


def _layerwise_comm_hook(state, bucket):  # no annotations: DDP compares them with real types
    """DDP's default all-reduce (divide by the world size, then sum), then hand the bucket to the
    layer-wise handle, which steps its parameters from the reduced gradient.

    ``(state: _DDPHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]``
    """
    buffer = bucket.buffer()
    buffer.div_(state.process_group.size())
    fut = dist.all_reduce(buffer, group=state.process_group, async_op=True).get_future()
    fut = fut.then(lambda f: f.value()[0])
    handle = state.handle() if state.handle is not None else None
    if handle is not None:
        handle._on_bucket(fut, bucket)
    return fut


def _collect_params(model_or_params: Any) -> tuple[dict[int, Tensor], dict[int, str]]:
    """The tensors of ``model_or_params`` by id, and their names where known."""
    names: dict[int, str] = {}
    if isinstance(model_or_params, nn.Module):
        found = {}
        for name, p in model_or_params.named_parameters(remove_duplicate=True):
            found[id(p)] = p
            names[id(p)] = name
        return found, names
    if isinstance(model_or_params, Tensor):
        return {id(model_or_params): model_or_params}, names
    if isinstance(model_or_params, (str, bytes)) or not isinstance(model_or_params, Iterable):
        raise TypeError(
            "layerwise: model_or_params must be an nn.Module, a tensor, or an iterable of tensors, "
            f"(name, tensor) pairs or parameter-group dicts; got {type(model_or_params).__name__}"
        )
    found = {}
    for item in model_or_params:
        entries = item["params"] if isinstance(item, dict) else [item]
        if isinstance(entries, Tensor):
            entries = [entries]
        for entry in entries:
            name = None
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Tensor):
                name, entry = entry
            if not isinstance(entry, Tensor):
                raise TypeError(
                    f"layerwise: model_or_params holds a {type(entry).__name__}; expected tensors, "
                    "(name, tensor) pairs or parameter-group dicts"
                )
            found[id(entry)] = entry
            if name is not None:
                names[id(entry)] = str(name)
    return found, names


def _check_settings(optimizer: Any, accumulation_steps: Any, max_grad_norm: Any) -> None:
    """Refuse an optimizer that cannot be stepped inside the backward, and bad settings."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"layerwise: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError(
            "layerwise: LBFGS steps from a closure that re-evaluates the loss, which cannot run "
            "inside the backward; use it with the ordinary loop"
        )
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(
            f"layerwise: invalid accumulation_steps={accumulation_steps!r}: pass an integer >= 1 "
            "(the number of backward passes per optimizer step)"
        )
    if max_grad_norm is not None:
        ok = isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
        if not ok or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
            raise ValueError(
                f"layerwise: invalid max_grad_norm={max_grad_norm!r}: pass a finite number > 0, "
                "or None for no clipping"
            )


def _stepped_params(optimizer: Optimizer, given: dict[int, Tensor], names: dict[int, str]) -> list[Tensor]:
    """The optimizer's parameters, in its order, once each is known to be a leaf among ``given`` that no
    other active handle steps. Frozen ones are hooked too (their hook never fires), so that a parameter
    unfrozen later (``lro.LayerSampler``) is stepped."""
    params: list[Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(p.requires_grad for p in params):
        raise ValueError("layerwise: the optimizer has no parameter that requires grad; nothing to step")
    outside = [p for p in params if id(p) not in given]
    if outside:
        raise ValueError(
            f"layerwise: {len(outside)} of the optimizer's {len(params)} parameters (shapes "
            f"{[tuple(p.shape) for p in outside[:3]]}...) are not in model_or_params; pass the model "
            "the optimizer was built for"
        )
    for p in params:
        if not p.is_leaf:
            raise ValueError(f"layerwise: parameter of shape {tuple(p.shape)} is not a leaf tensor")
        other = _ACTIVE.get(id(p))
        if other is not None and other() is not None and any(q is p for q in other()._params):
            raise RuntimeError(
                f"layerwise: parameter {names.get(id(p), tuple(p.shape))} already has layer-wise "
                "updates from another handle; call .remove() on that handle first"
            )
    return params


def _hook(p: Tensor, fn: Any) -> Any:
    """``p.register_post_accumulate_grad_hook(fn)``, also on a frozen ``p`` (torch refuses a hook on a tensor
    that does not require grad, but keeps one through ``requires_grad_(False)`` and back)."""
    if p.requires_grad:
        return p.register_post_accumulate_grad_hook(fn)
    p.requires_grad_(True)
    try:
        return p.register_post_accumulate_grad_hook(fn)
    finally:
        p.requires_grad_(False)


def _reusable_hook_state(ddp: DistributedDataParallel) -> _DDPHookState | None:
    """The state of the layer-wise communication hook a removed handle left on ``ddp`` (DDP cannot
    drop a hook), or None when ``ddp`` has no hook yet; refuses a DDP module whose one communication
    hook is taken (by ``mixed_precision``, another hook, or an active handle)."""
    if getattr(ddp, "mixed_precision", None) is not None:
        raise ValueError(
            "layerwise: DDP's mixed_precision uses its own communication hook, and DDP takes "
            "only one; layer-wise updates need theirs"
        )
    hook_state = None
    for hook, state in getattr(ddp, "_comm_hooks", []):
        if hook is _layerwise_comm_hook:
            hook_state = state
        else:
            raise ValueError(
                f"layerwise: this DDP module already has the communication hook "
                f"{getattr(hook, '__qualname__', hook)!r}, and DDP takes only one; layer-wise "
                "updates need theirs to step each bucket after its all-reduce"
            )
    if hook_state is not None and hook_state.handle is not None and hook_state.handle() is not None:
        raise RuntimeError("layerwise: this DDP module already has an active layer-wise handle")
    return hook_state


class LayerwiseUpdates:
    """Hooks that step an optimizer parameter by parameter inside the backward (see the module doc).

    Build it with :func:`lowrank_optim.layerwise`. Attributes: ``steps`` (optimizer steps taken),
    ``micro_steps`` (backward passes counted), ``last_grad_norm`` (the total norm before clipping, as
    ``clip_grad_norm_`` returns it, at the last step with ``max_grad_norm``; else None).
    """

    def __init__(
        self,
        model_or_params: nn.Module | Tensor | Iterable[Any],
        optimizer: Optimizer,
        *,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
    ) -> None:
        # every check runs before any hook is registered, so a refused handle leaves nothing behind
        _check_settings(optimizer, accumulation_steps, max_grad_norm)
        ddp = model_or_params if isinstance(model_or_params, DistributedDataParallel) else None
        given, names = _collect_params(model_or_params)
        params = _stepped_params(optimizer, given, names)
        step_parameters = getattr(optimizer, "step_parameters", None)
        hook_state = None
        if ddp is not None:
            hook_state = _reusable_hook_state(ddp)
        elif (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
              and not any(is_sharded(p) for p in params)):  # FSDP2 shards: its own hooks reduce them
            if _ddp_wrapping(model_or_params) is not None:
                raise ValueError(
                    "layerwise: model_or_params is the .module of a DistributedDataParallel wrapper, whose hooks "
                    "would step each rank on its own un-reduced gradient (the replicas drift apart); pass the "
                    "wrapper: lro.layerwise(ddp_model, opt)")
            warnings.warn(
                "layerwise: torch.distributed is initialized, but model_or_params is not a "
                "DistributedDataParallel module, so each rank steps on its own local gradients. If the "
                "model is wrapped in DDP, pass the wrapper.",
                stacklevel=3,
            )

        self._optimizer = optimizer
        self._params = params
        self._ids = {id(p) for p in params}
        # the order clip_grad_norm_(model.parameters()) sums the norms in: the model's (or as given)
        self._norm_order = [p for i, p in given.items() if i in self._ids]
        self._names = names
        self._k = accumulation_steps
        self._max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._step_fn = step_parameters if callable(step_parameters) else self._step_narrowed
        self._ddp = ddp
        self.steps = 0
        self.micro_steps = 0
        self.last_grad_norm: Tensor | None = None
        self._removed = False
        # the current backward pass
        self._pass_open = False
        self._bracketed = False  # opened by backward() (else by the first hook, closed by a callback)
        self._pass_task = -1
        self._pass_steps = False
        self._stepped: set[int] = set()
        self._reduced = False
        self._pending: list[tuple[torch.futures.Future[Tensor], dist.GradBucket]] = []
        self._total_norm: Tensor | None = None  # this pass's total norm, once measured
        self._skipping = False  # this pass's step was skipped for a non-finite gradient (nonfinite="skip")
        # the measuring pass (clipping, no DDP)
        self._measuring = False
        self._stash: dict[int, Tensor | None] = {}
        self._norms: dict[int, Tensor] = {}

        self._register(hook_state)

    def _register(self, hook_state: _DDPHookState | None) -> None:
        """Register DDP's communication hook (or take over ``hook_state``, a removed handle's), then the
        parameters' hooks. DDP's goes first because DDP can still refuse it."""
        ddp = self._ddp
        if ddp is not None:
            if hook_state is None:
                hook_state = _DDPHookState(ddp.process_group)
                ddp.register_comm_hook(hook_state, _layerwise_comm_hook)
            hook_state.handle = weakref.ref(self)
        self._hook_state = hook_state
        self._handles = [_hook(p, self._on_grad) for p in self._params]
        ref = weakref.ref(self)
        for p in self._params:
            _ACTIVE[id(p)] = ref

    # ------------------------------------------------------------------ public
    @property
    def will_step(self) -> bool:
        """Whether the next backward pass steps the optimizer (it is the k-th of its accumulation)."""
        return self.micro_steps % self._k == self._k - 1

    def backward(self, loss: Tensor, steps: bool | None = None, **kwargs: Any) -> bool:
        """``loss.backward(**kwargs)`` with layer-wise updates; returns True when it stepped.

        With ``max_grad_norm`` (and no DDP) a stepping pass runs the measuring backward first (one
        extra backward, see the module doc); the graph is then kept until the real pass. ``steps``
        says whether this pass steps, for loops that decide it themselves (Hugging Face Trainer's
        shorter last accumulation of an epoch); None counts ``accumulation_steps``.
        """
        if self._removed:
            raise RuntimeError("layerwise: this handle was removed; build a new one with lro.layerwise(...)")
        if self._pass_open:
            if self._bracketed:
                raise RuntimeError("layerwise: backward() called inside a backward of the same handle")
            self._close_pass()  # a plain loss.backward() that raised before its end
        steps = self.will_step if steps is None else bool(steps)
        if steps and self._max_grad_norm is not None and self._ddp is None and _holds_compiled_backward(loss):
            raise RuntimeError(
                "layerwise: max_grad_norm measures the gradients in a first backward and steps in a second run of "
                "the same graph, and a torch.compile'd backward's second run is not the first's (torch 2.13's "
                "inductor: gradients 20% off on a nanoGPT block); nothing was run. Compile without max_grad_norm, "
                "clip without torch.compile, or use the ordinary loop (loss.backward(), clip_grad_norm_, opt.step())")
        self._open_pass(bracketed=True, steps=steps)
        try:
            if steps and self._max_grad_norm is not None and self._ddp is None:
                self._measure(loss, kwargs)
            loss.backward(**kwargs)
            self._finish_pass()
        finally:
            self._close_pass()
        return steps

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """DDP's ``no_sync()`` when the next backward only accumulates; nothing otherwise (or without
        DDP). Wrap the forward and backward of each micro-batch in it to skip the k − 1 all-reduces.

        Under ``static_graph=True`` DDP's first backward must be synchronized (DDP's own rule: its
        reducer fails an internal assert otherwise), so that one pass all-reduces anyway; the result
        is the same sum of gradients.
        """
        ddp = self._ddp
        first_static = (
            ddp is not None
            and ddp.static_graph
            and not getattr(ddp, "_static_graph_delay_allreduce_enqueued", True)
        )
        if ddp is not None and not self.will_step and not first_static:
            with ddp.no_sync():
                yield
        else:
            yield

    def remove(self) -> None:
        """Unregister every hook; gradients of an unfinished accumulation stay in ``.grad``. Under DDP
        the communication hook stays (DDP cannot remove one) and acts as DDP's default all-reduce."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        state = self._hook_state
        if state is not None and state.handle is not None and state.handle() is self:
            state.handle = None
        for p in self._params:
            ref = _ACTIVE.get(id(p))
            if ref is not None and ref() is self:
                del _ACTIVE[id(p)]
        self._removed = True

    def __enter__(self) -> LayerwiseUpdates:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._params)} parameters"
        ddp = ", DDP" if self._ddp is not None else ""
        return (
            f"LayerwiseUpdates({type(self._optimizer).__name__}, {state}, accumulation_steps={self._k}, "
            f"max_grad_norm={self._max_grad_norm}{ddp}, steps={self.steps})"
        )

    # ------------------------------------------------------------------ passes
    def _open_pass(self, bracketed: bool, steps: bool | None = None) -> None:
        self._pass_open = True
        self._bracketed = bracketed
        self._pass_task = torch._C._current_graph_task_id()
        self._pass_steps = self.will_step if steps is None else steps
        self._stepped = set()
        self._reduced = False
        self._pending = []
        self._total_norm = None
        self._skipping = False

    def _close_pass(self) -> None:
        self._pass_open = False
        self._bracketed = False
        self._pending = []
        self._total_norm = None

    def _enter_from_hook(self) -> None:
        """Called by every hook: opens the pass of a plain ``loss.backward()`` at its first hook."""
        if self._pass_open:
            if self._bracketed or torch._C._current_graph_task_id() == self._pass_task:
                return
            self._close_pass()  # left open by a plain backward that raised
        self._open_pass(bracketed=False)
        if self._pass_steps and self._max_grad_norm is not None and self._ddp is None:
            self._close_pass()
            raise RuntimeError(
                "layerwise: max_grad_norm needs the global gradient norm before the first update, "
                "which lw.backward(loss) measures; call it instead of loss.backward()"
            )
        if self._ddp is None:
            Variable._execution_engine.queue_callback(self._end_of_backward)
        else:
            # DDP queues its own finalize (which writes the reduced gradients) during the backward;
            # a callback queued from a callback runs after it.
            Variable._execution_engine.queue_callback(
                lambda: Variable._execution_engine.queue_callback(self._end_of_backward)
            )

    def _end_of_backward(self) -> None:
        try:
            if torch._C._current_autograd_node() is not None:
                # a backward run from inside another's node: reentrant activation checkpointing
                raise RuntimeError(
                    "layerwise: a backward ran inside another one (reentrant activation checkpointing, "
                    "use_reentrant=True), so a plain loss.backward() cannot tell where the pass ends; "
                    "call lw.backward(loss), which marks the pass itself"
                )
            self._finish_pass()
        finally:
            self._close_pass()

    def _finish_pass(self) -> None:
        """After the backward (and DDP's finalize): step what the hooks could not, free, count."""
        if self._pass_steps:
            if self._ddp is not None:
                self._finish_ddp()
            else:
                rest = [p for p in self._params if p.grad is not None and id(p) not in self._stepped]
                if rest:  # gradients of earlier passes whose parameter this pass did not reach
                    if self._max_grad_norm is not None and not self._skipping:
                        torch.nn.utils.clip_grads_with_norm_(rest, self._max_grad_norm, self._total_norm)
                    self._step_and_free(rest)
            self.steps += 1
            # LR schedulers check that the optimizer stepped before their first step()
            self._optimizer._opt_called = True
        self.micro_steps += 1

    def _finish_ddp(self) -> None:
        while self._pending:
            self._complete_bucket(*self._pending.pop(0))
        # in the model's order: clip_grad_norm_ sums the norms in it
        rest = [p for p in self._norm_order if p.grad is not None and id(p) not in self._stepped]
        if rest and not self._reduced:
            raise RuntimeError(
                "layerwise: this backward should step the optimizer, but DDP reduced no gradient in it "
                "(did it run under ddp.no_sync()?). Use `with lw.no_sync():`, which syncs the "
                "k-th pass. Nothing was stepped; the gradients are local."
            )
        if self._max_grad_norm is not None and rest:
            # the buckets hold every reduced gradient: clip_grad_norm_ itself, then one step
            total = torch.nn.utils.get_total_norm([p.grad for p in rest])
            torch.nn.utils.clip_grads_with_norm_(rest, self._max_grad_norm, total)
            self.last_grad_norm = total
        if rest:
            self._step_and_free(rest)
        for p in self._params:  # views of the buckets (or copies) that DDP's finalize set again
            p.grad = None

    # ------------------------------------------------------------------ hooks
    def _on_grad(self, p: Tensor) -> None:
        if self._measuring:
            self._measure_one(p)
            return
        self._enter_from_hook()
        if not self._pass_steps or self._ddp is not None:
            return  # accumulating; or DDP, where the gradient here is not reduced yet
        if id(p) in self._stepped:
            raise RuntimeError(f"layerwise: {self._twice(p)}; it was stepped on the first part already. With "
                               "max_grad_norm the measuring pass refuses this before any update")
        if self._max_grad_norm is not None and not self._skipping:
            torch.nn.utils.clip_grads_with_norm_([p], self._max_grad_norm, self._total_norm)
        self._step_and_free([p])

    def _on_bucket(self, fut: torch.futures.Future[Tensor], bucket: dist.GradBucket) -> None:
        """From the DDP communication hook, in the backward: queue the bucket, step the one before."""
        if not self._pass_open:
            return
        self._reduced = True
        if not self._pass_steps or self._max_grad_norm is not None:
            return
        self._pending.append((fut, bucket))
        while len(self._pending) > 1:  # its all-reduce had the time since the last bucket to finish
            self._complete_bucket(*self._pending.pop(0))

    def _complete_bucket(self, fut: torch.futures.Future[Tensor], bucket: dist.GradBucket) -> None:
        fut.wait()
        ours = []
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            # A parameter unused on this rank has no .grad here; DDP's finalize gives it one if
            # another rank used it, and _finish_ddp steps it then.
            if id(p) in self._ids and p.grad is not None and id(p) not in self._stepped:
                p.grad = g  # the reduced gradient, a view of DDP's bucket
                ours.append(p)
        if ours:
            self._step_and_free(ours)

    def _step_and_free(self, params: list[Tensor]) -> None:
        """Step ``params`` and free their gradients; only free them once this pass's step was skipped.

        ``nonfinite="skip"`` counts a skipped call in every group: a count that moved marks the rest of the
        pass skipped, so one step is skipped (and counted) once however many calls it takes."""
        if not self._skipping:
            skipped = _skip_count(self._optimizer)
            self._step_fn(params)
            self._skipping = _skip_count(self._optimizer) > skipped
        for p in params:
            p.grad = None
            self._stepped.add(id(p))

    def _step_narrowed(self, params: list[Tensor]) -> None:
        """Any torch optimizer: its own step() with param_groups narrowed to ``params`` for the call."""
        opt = self._optimizer
        ids = {id(p) for p in params}
        groups = opt.param_groups
        saved = [g["params"] for g in groups]
        try:
            for g in groups:
                g["params"] = [q for q in g["params"] if id(q) in ids]
            opt.param_groups = [g for g in groups if g["params"]]
            opt.step()
        finally:
            opt.param_groups = groups
            for g, ps in zip(groups, saved):
                g["params"] = ps

    # ------------------------------------------------------------------ clipping: the measuring pass
    def _measure(self, loss: Tensor, kwargs: dict[str, Any]) -> None:
        """A backward that only measures: each gradient's norm (with what earlier passes accumulated),
        then the total norm as ``clip_grad_norm_`` computes it. ``.grad`` is as before afterwards."""
        self._stash = {id(p): p.grad for p in self._params}  # references, no copies
        self._norms = {}
        for p in self._params:
            p.grad = None
        self._measuring = True
        try:
            loss.backward(**{**kwargs, "retain_graph": True})
        finally:
            self._measuring = False
            for p in self._params:
                p.grad = self._stash[id(p)]
            stash, self._stash = self._stash, {}
        norms = {}
        for p in self._norm_order:  # the model's order, as clip_grad_norm_(model.parameters()) takes them
            n = self._norms.get(id(p))
            if n is None and stash[id(p)] is not None:  # accumulated, but not reached by this pass
                n = torch.nn.utils.get_total_norm([stash[id(p)]])
            if n is not None:
                norms[p] = n
        self._norms = {}
        total = torch.nn.utils.get_total_norm(list(norms.values()))
        self._total_norm = total
        self.last_grad_norm = total
        self._decide_nonfinite(total, norms)

    def _decide_nonfinite(self, total: Tensor, norms: dict[Tensor, Tensor]) -> None:
        """Before the first update, what ``opt.step()`` would do with this step's non-finite gradients: raise
        (nothing is stepped) or skip the whole step (``nonfinite=``). One host synchronisation per step, as
        the optimizer's own check; a gradient counts as non-finite when its norm is (finite entries whose
        float32 norm overflows, |g| ≳ 1e19, count too: the ordinary loop's clipping would zero every
        gradient there)."""
        decide = getattr(self._optimizer, "_nonfinite_decide", None)
        if decide is None or bool(torch.isfinite(total)):
            return
        self._skipping = decide([p for p, n in norms.items() if not bool(torch.isfinite(n))])

    def _twice(self, p: Tensor) -> str:
        """What happened when a parameter's gradient arrives twice in one backward."""
        name = self._names.get(id(p), "a parameter")
        return (f"{name} received its gradient in parts within one backward (a weight shared by segments of "
                "reentrant activation checkpointing, use_reentrant=True, whose inner backwards each deliver "
                "their share), and a layer-wise step needs it whole; use use_reentrant=False, or the ordinary loop")

    def _measure_one(self, p: Tensor) -> None:
        if id(p) in self._norms:
            raise RuntimeError(f"layerwise: {self._twice(p)}; nothing was stepped")
        g = p.grad
        before = self._stash.get(id(p))
        full = g if before is None else before + g  # what the real pass will accumulate
        self._norms[id(p)] = torch.nn.utils.get_total_norm([full])
        p.grad = None


def _skip_count(optimizer: Optimizer) -> int:
    """The steps ``nonfinite="skip"`` has skipped so far (summed over the groups; 0 for other optimizers)."""
    return sum(int(g.get(SKIPPED, 0)) for g in optimizer.param_groups)


def _ddp_wrapping(module: Any) -> DistributedDataParallel | None:
    """The DistributedDataParallel whose ``.module`` is ``module``, if one is alive. A scan of the objects the
    collector tracks, once, when a handle is built on a module outside DDP while several ranks run."""
    if not isinstance(module, nn.Module):
        return None
    return next((o for o in gc.get_objects() if isinstance(o, DistributedDataParallel) and o.module is module), None)


def _holds_compiled_backward(loss: Tensor) -> bool:
    """Whether the autograd graph of ``loss`` holds a backward that ``torch.compile`` (AOTAutograd) built."""
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == "CompiledFunctionBackward":
            return True
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return False
