"""One optimizer step, for one process and FSDP2 shards alike: plan, then apply.

* **plan** (:func:`plan`), for every parameter with a gradient, writing nothing: the checks, whether its
  subspace refreshes now, and the refreshed projector (a refresh that fails raises before any change; a
  projector that reads the rule's first moment, ``reads_moment``, is given it as it stands before this step);
* **apply**, per group: the unprojected parameters (:func:`step_plain`: the group's ``plain_rule``, torch's
  own AdamW for Adam), then the projected ones in chunks (:func:`step_low_rank`)::

      carry     the rule's state into a new subspace        keep | reset | rotate  (policies.carry)
      G         = update.prepare(G)                         G itself; error feedback: G + E (the refresh sees it too)
      R         = projector.project(G)                      summed over the ranks where P is split
      N         = rule.directions([R], [state], splits)     fused kernels for INT8 storage where the rule has one
      update    .apply(W, G, R, N, state)                   drop | sign | sgd | fira | channel | tensor
      write     back: the weight, its FSDP2 piece, an INT8 weight, stochastic rounding into bf16
      learn     a projector that learns after use (online_pca) moves its basis from G (``learned``)

The seam is ``comm`` (:mod:`lowrank_optim.distributed`), chosen once per parameter: on one process every
sum and gather is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import rules as _rules
from .. import updates as _updates
from ..distributed import Local, RowShard, Split, local
from ..quant.weights import QUANTIZED_AWAY
from ..projectors import NonFiniteGradientError, Projector
from . import policies, writeback
from . import state as _state

if TYPE_CHECKING:
    from .lowrank import LowRankAdamW

# Low-rank tensors are stepped in chunks of about this many bytes: foreach kernels amortise launch
# cost across small layers, while a 7B model never holds every layer's R and N at once.
CHUNK_BYTES = 64 * 2**20
#: On CPU, where foreach runs tensor by tensor and launches cost nothing, a chunk's temporaries (R, N,
#: residuals) are kept small instead: freed blocks of a few MiB stay in glibc's heap and are reused by
#: the next chunk, where 64 MiB of them were returned to the kernel and page-faulted in again at every
#: step (LLaMA-60M, 2 threads: Fira's plain step 187 → 162 ms, GaLore's 130 → 122 ms).
CPU_CHUNK_BYTES = 4 * 2**20


def chunk_budget(items: list[Any]) -> int:
    """The chunk size in bytes for these items: :data:`CHUNK_BYTES`, or :data:`CPU_CHUNK_BYTES` on CPU."""
    return CPU_CHUNK_BYTES if items and items[0].grad.device.type == "cpu" else CHUNK_BYTES


@dataclass
class Item:
    """One parameter in this step: its gradient (this rank's piece, negated under ``maximize``), its seam,
    and, for a projected weight, the projector to step with and the one before this step's refresh."""

    param: Tensor
    grad: Tensor
    comm: Local | RowShard
    projector: Projector | None = None
    previous: Projector | None = None
    #: ``grad`` is already R = project(G), computed by a sparse backward (``lro.sparse_grad``)
    projected: bool = False
    #: the subspace was built from an all-zero gradient (the first step's): renew it at the next step
    retry: bool = False


def plan(opt: "LowRankAdamW", group: dict[str, Any], only: set[int] | None) -> tuple[list[Item], list[Item]]:
    """The group's plain and projected parameters with a gradient, projectors refreshed; writes nothing."""
    plain: list[Item] = []
    low: list[Item] = []
    compact = low_rank_grads(opt)
    for i, p in enumerate(group["params"]):
        if p in compact and (only is None or id(p) in only):
            low.append(_compact_item(opt, group, i, p, compact[p]))
            continue
        if p.grad is None and getattr(p, QUANTIZED_AWAY, None) is not None:
            raise RuntimeError(
                f"{type(opt).__name__}: parameter {opt._label(group, i)} is the float weight that "
                f"lro.quantize_model_int8 replaced by an INT8 one ({getattr(p, QUANTIZED_AWAY)}) after this optimizer "
                "was built: the optimizer would step a weight the model no longer uses, and the INT8 weight would "
                "never train. Build the optimizer after quantize_model_int8(model); nothing was changed")
        if p.grad is None or (only is not None and id(p) not in only):
            continue
        if p.grad.is_sparse:
            raise RuntimeError(
                f"{type(opt).__name__}: parameter {opt._label(group, i)} has a sparse gradient, which is not "
                "supported; use torch.optim.SparseAdam for it or build the embedding with sparse=False"
            )
        if p.grad.shape != p.shape:
            raise ValueError(f"{type(opt).__name__}: parameter {opt._label(group, i)} has a gradient of shape "
                             f"{tuple(p.grad.shape)}, but the parameter is {tuple(p.shape)}; nothing was changed. "
                             "Give it a gradient of its own shape (was p.grad.data replaced?)")
        grad = local(p.grad)
        item = Item(p, -grad if group["maximize"] else grad, opt._comm(p))
        if not opt.is_low_rank(p, group):
            plain.append(item)
            continue
        _refresh(opt, group, i, item)
        low.append(item)
    return plain, low


def low_rank_grads(opt: "LowRankAdamW") -> dict[Tensor, Tensor]:
    """The gradients a sparse backward left already projected (R, not G), by parameter (``lro.sparse_grad``
    fills it; ``zero_grad`` empties it)."""
    return opt.__dict__.setdefault("low_rank_grads", {})


def _compact_item(opt: "LowRankAdamW", group: dict[str, Any], i: int, p: Tensor, low: Tensor) -> Item:
    """A projected weight whose gradient came as R from a sparse backward: its subspace must not renew now
    (the backward computed R in the current one, and a refresh needs G)."""
    label = f"{type(opt).__name__}: parameter {opt._label(group, i)}"
    if p.grad is not None:
        raise RuntimeError(f"{label} has both a dense gradient and a projected one from lro.sparse_grad; "
                           "nothing was changed. Call zero_grad() before switching how gradients are computed")
    state = opt.state.get(p, {})
    step = int(state["step"]) if "step" in state else 0
    proj = opt._projector(p, group) if step else None
    if proj is None or not opt.is_low_rank(p, group) or policies.due(state, group, step, proj):
        raise RuntimeError(f"{label} has a projected gradient from lro.sparse_grad, but its subspace renews at "
                           f"this step ({step}), which needs the full gradient; nothing was changed. Compute this "
                           "step's gradients with the sparse backward in place (it gives these weights a dense "
                           "gradient on their refresh steps) rather than before changing the optimizer")
    return Item(p, -low if group["maximize"] else low, opt._comm(p), projector=proj, projected=True)


def _refresh(opt: "LowRankAdamW", group: dict[str, Any], i: int, item: Item) -> None:
    """The projector ``item`` steps with: the cached one, or a refreshed copy when its subspace renews now."""
    p = item.param
    state = opt.state.get(p, {})
    step = int(state["step"]) if "step" in state else 0
    # The first step starts from a fresh projector, whatever init_state() put there, and so does the
    # step after a subspace built from an all-zero gradient (_nothing_to_learn).
    current = proj = opt._projector(p, group) if step else opt._new_projector(group, p)
    if step and policies.rebuilds(state):
        proj = opt._new_projector(group, p)
    try:
        if policies.due(state, group, step, proj):
            moment = _state.first_moment(_rules.get(group["rule"]), state) if proj.reads_moment else None
            # the gradient the update feeds the projector (error feedback: G + E), built again in _begin
            grad = _updates.for_group(group).prepare(item.grad, state, group)
            if not _nothing_to_learn(proj, item, grad):
                item.previous, proj = current, proj.refreshed(grad, moment)
            elif not proj.initialized:  # this step needs a subspace; the next one builds it again
                item.previous, proj, item.retry = current, proj.refreshed(grad, moment), True
        # it learns from G after the step; under nonfinite="raise" or "skip" the step has checked G already
        elif proj.learns_after_use and group["nonfinite"] == "ignore" and not item.comm.all_finite(item.grad):
            raise NonFiniteGradientError("non-finite values (inf or NaN) in the gradient the subspace learns from")
    except NonFiniteGradientError as err:
        raise NonFiniteGradientError(
            f"{type(opt).__name__}: parameter {opt._label(group, i)} has a non-finite gradient at a subspace "
            f"refresh (step {step}): {err}. Weights and optimizer state are unchanged; skip this step "
            "(torch.amp.GradScaler does) or lower the learning rate."
        ) from None
    item.projector = proj


def _nothing_to_learn(proj: Projector, item: Item, grad: Tensor) -> bool:
    """Whether ``grad`` is zero everywhere (on every rank) for a projector that builds its subspace from it.
    An SVD of zero has coordinate vectors for singular vectors (DCT and Grass score every column alike),
    which would then train r rows for a whole gap: a zero-initialised output projection gives the layer
    before it a zero first gradient, and torch's ``get_optimizer_state_dict`` before the first step runs a
    step on zero gradients. Such a refresh is not made: an existing subspace is kept and renews at the
    weight's next step; a first one (which this step needs: R = 0 in it) is built anew at the next step.
    Online Subspace Descent learns its basis from every later gradient, so it is left to do that."""
    return proj.reads_gradient and not proj.learns_after_use and item.comm.all_zero(grad)


# ---------------------------------------------------------------------------- plain parameters
def step_plain(opt: "LowRankAdamW", group: dict[str, Any], items: list[Item]) -> None:
    """Unprojected parameters: the group's plain rule on the whole gradient. A rule that steps whole
    parameters itself (Adam: torch's AdamW, bit for bit) does so for float state; the rest go through
    ``direction`` (INT8 state through the rule's fused kernel): W ← (1 − lr·wd)·W − lr·direction."""
    if not items:
        return
    rule = _rules.get(_rules.get(group["rule"]).plain_rule)
    whole, through, others = [], [], []
    for it in items:
        p, state = it.param, opt.state[it.param]
        if not state:
            piece = torch.zeros_like(it.grad, dtype=opt._plain_moment_dtype(group, p))
            state.update(_state.fresh(rule, None, group, piece, it.comm.split(None, tuple(p.shape)), tuple(p.shape)))
        view, _ = _state.local_view(state, rule.keys)
        keys = [k for k in rule.keys if k in view]
        # a rule that is not element-wise steps a whole parameter itself only where this rank holds all of it
        by_itself = rule.steps_whole and (rule.elementwise or it.comm.split(None, tuple(p.shape)).whole)
        if not (by_itself and all(_rules.base.storage_of(view, k) is _rules.base.FLOAT for k in keys)):
            others.append(it)
        elif writeback.through_copy(group, p) or view[keys[0]].dtype != p.dtype:
            through.append(it)
        else:
            whole.append(it)
    if whole:
        rule.step_whole([_open(opt, group, it)[0] for it in whole], [it.grad for it in whole],
                        [_state.local_view(opt.state[it.param], rule.keys)[0] for it in whole], group)
    for chunk in chunks(through, lambda it: 4 * it.grad.numel(), chunk_budget(through)):
        _step_through_copies(opt, group, rule, chunk)
    for it in others:
        _step_by_direction(opt, group, rule, it)


def _open(opt: "LowRankAdamW", group: dict[str, Any], it: Item) -> tuple[Tensor, writeback.Write]:
    p = it.param
    return writeback.open_weight(group, p, lambda: writeback.rounding_seed(opt._position(p), int(opt.state[p]["step"])))


def _step_through_copies(opt: "LowRankAdamW", group: dict[str, Any], rule: _rules.Rule, chunk: list[Item]) -> None:
    """Half-precision, INT8 and stochastically rounded weights: the rule on float32 copies, rounded back once."""
    works = [_open(opt, group, it) for it in chunk]
    masters = [w if write is not None else w.float() for w, write in works]
    rule.step_whole(masters, [it.grad.float() for it in chunk],
                    [_state.local_view(opt.state[it.param], rule.keys)[0] for it in chunk], group)
    for (work, write), master in zip(works, masters):
        if write is not None:
            write()
        else:
            work.copy_(master)


def _step_by_direction(opt: "LowRankAdamW", group: dict[str, Any], rule: _rules.Rule, it: Item) -> None:
    p, state = it.param, opt.state[it.param]
    view, pieces = _state.local_view(state, rule.keys)
    dtype = opt._plain_moment_dtype(group, p)
    split = it.comm.split(None, tuple(p.shape))
    split.pieces = pieces
    state["step"] += 1
    (direction,) = _rules.base.run(rule, [it.grad.to(dtype)], [view], group, [split])
    work, write = _open(opt, group, it)
    lr = float(group["lr"])
    _rules.base.descend(work, direction, lr, 1.0 - lr * float(group["weight_decay"]))
    if write is not None:
        write()


# ---------------------------------------------------------------------------- projected weights
@dataclass
class _Prepared:
    item: Item
    low: Tensor
    piece: Tensor
    split: Split
    view: dict[str, Any]


def step_low_rank(opt: "LowRankAdamW", group: dict[str, Any], items: list[Item]) -> None:
    """Projected weights, in chunks: carry, project, the rule over the chunk, the update, write back."""
    if not items:
        return
    rule, update = _rules.get(group["rule"]), _updates.for_group(group)
    size = lambda it: 8 * math.prod(it.projector.low_rank_shape(it.param.shape))  # noqa: E731
    for chunk in chunks(items, size, chunk_budget(items)):
        ready = [_begin(opt, group, rule, update, it) for it in chunk]
        directions = _rules.base.run(rule, [r.piece for r in ready], [r.view for r in ready], group,
                                     [r.split for r in ready])
        for r, direction in zip(ready, directions):
            _finish(opt, group, update, r, direction)


def _begin(opt: "LowRankAdamW", group: dict[str, Any], rule: _rules.Rule, update: _updates.Update,
           it: Item) -> _Prepared:
    """Commit a refresh, project the gradient, create the state on the first step and count the step."""
    p, proj = it.param, it.projector
    state = opt.state[p]
    shape = proj.low_rank_shape(tuple(p.shape))
    if it.previous is not None:
        _commit_refresh(group, rule, state, it, shape)
        opt._set_projector(p, proj)
    if not it.projected:  # a sparse backward's R: its updates read no full gradient (lro.sparse_grad refuses them)
        it.grad = update.prepare(it.grad, state, group)  # from here on the update's gradient (G + E for error feedback)
    low = (it.grad if it.projected else proj.project(it.grad)).to(_state.state_dtype(p.dtype))
    split = it.comm.split(proj.side, shape)
    if split.axis is not None and proj.side == "left":
        split.whole_value = low  # every rank holds all of R; its rule steps its columns, gathers are free
    piece = split.take(low) if split.whole_value is not None else low  # the right side's R is this rank's rows
    if "step" not in state:
        state.update(_state.fresh(rule, update, group, piece, split, shape))
        state.update(update.init_rows(it.grad, it.comm, group))
        state.update(policies.init(group))
    if it.retry:
        policies.retry(state)
    elif it.previous is not None:
        policies.schedule(state, group, int(state["step"]), _refresh_phase(opt, p, group))
    state["step"] += 1
    view, split.pieces = _state.local_view(state, rule.keys)
    return _Prepared(it, low, piece, split, view)


def _refresh_phase(opt: "LowRankAdamW", p: Tensor, group: dict[str, Any]) -> int:
    """``p``'s phase in its group's refresh gap (``policies.phases``), from every projected weight's cost."""
    # by gap: a gap edited in param_groups takes effect from each weight's next refresh, on new phases; by the
    # group's size too: with a weight removed from (or added to) the group the phases are the group's as it is
    # now, as an optimizer resumed from a checkpoint of it computes them (a new weight's id is not cached)
    key = (group["update_proj_gap"], len(group["params"]))
    phases = opt._cache().setdefault("phases", {}).setdefault(key, {})
    if id(p) not in phases:
        low = [q for q in group["params"] if opt.is_low_rank(q, group)]
        costs = [q.shape[0] * q.shape[1] * min(q.shape) for q in low]
        phases.update(zip(map(id, low), policies.phases(costs, group["update_proj_gap"])))
    return phases[id(p)]


def _commit_refresh(group: dict[str, Any], rule: _rules.Rule, state: dict[str, Any], it: Item,
                    shape: tuple[int, ...]) -> None:
    """Carry the rule's state into the new subspace and record the lazy schedule (not on the first step)."""
    if int(state.get("step", 0)) == 0:
        return  # the first subspace: no state to carry, nothing to compare with
    view, pieces = _state.local_view(state, rule.keys)
    split = it.comm.split(it.projector.side, shape)
    split.pieces = pieces
    policies.after_refresh(group, rule, state, view, it.previous, it.projector, split, it.grad.device)


def _finish(opt: "LowRankAdamW", group: dict[str, Any], update: _updates.Update, r: _Prepared,
            direction: Tensor) -> None:
    """N back in R's layout (gathered over the ranks where every rank holds R), then the update."""
    it = r.item
    if r.split.whole_value is not None:
        direction = r.split.gather(direction, "project")
    work, write = _open(opt, group, it)
    ctx = _updates.Context(work, it.grad, r.low, direction, r.view, group, it.projector, it.comm, r.split)
    update.apply(ctx)
    if write is not None:
        write()
    if it.projector.learns_after_use and it.previous is None:  # not the step that built it
        opt._set_projector(it.param, it.projector.learned(it.grad, policies.lr_ratio(group)))


def placeholder(opt: "LowRankAdamW", group: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """The state ``p``'s first step would build, with placeholder values (``init_state``; the meta device too)."""
    comm, shape = opt._comm(p), tuple(p.shape)
    piece = local(p)
    if not opt.is_low_rank(p, group):
        rule = _rules.get(_rules.get(group["rule"]).plain_rule)
        like = torch.empty(piece.shape, dtype=opt._plain_moment_dtype(group, p), device=piece.device)
        return _state.fresh(rule, None, group, like, comm.split(None, shape), shape)
    proj = opt._new_projector(group, p)
    proj.allocate(shape, p.dtype, piece.device)
    low_shape = proj.low_rank_shape(shape)
    split = comm.split(proj.side, low_shape)
    like = split.take(torch.empty(low_shape, device="meta"))
    like = torch.empty(like.shape, dtype=_state.state_dtype(p.dtype), device=piece.device)
    out = {"projector": proj.export_state()}
    update = _updates.for_group(group)
    out.update(_state.fresh(_rules.get(group["rule"]), update, group, like, split, low_shape))
    out.update(update.init_rows(torch.empty(piece.shape, dtype=p.dtype, device=piece.device), comm, group))
    out.update(policies.init(group))
    opt._cache().setdefault("projectors", {})[id(p)] = (proj, out["projector"])
    return out


def chunks(items: list[Any], nbytes: Callable[[Any], int], budget: int = CHUNK_BYTES) -> Iterator[list[Any]]:
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


class ProjectorView(Mapping):
    """A read-only view of the optimizer's projectors, keyed by parameter."""

    def __init__(self, opt: "LowRankAdamW") -> None:
        self._opt = opt

    def _group(self, p: Tensor) -> dict[str, Any]:
        return next(g for g in self._opt.param_groups if any(q is p for q in g["params"]))

    def __getitem__(self, p: Tensor) -> Projector:
        if "projector" not in self._opt.state.get(p, {}):
            raise KeyError(p)
        return self._opt._projector(p, self._group(p))

    def __iter__(self) -> Iterator[Tensor]:
        return (p for p, s in self._opt.state.items() if "projector" in s)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def as_float_lr(group: dict[str, Any]) -> dict[str, Any]:
    """The group with a tensor ``lr`` read as a number for this step (torch.optim.AdamW accepts both)."""
    lr = group["lr"]
    return {**group, "lr": float(lr)} if isinstance(lr, Tensor) else group
