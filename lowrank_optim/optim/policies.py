"""What happens when a subspace changes, and when it changes.

* ``on_refresh``: the rule's state when the subspace changes: ``keep`` (GaLore, APOLLO), ``reset``
  (FRUGAL, Grass: ``rule.reset``), ``rotate`` (DCTAdamW, SUMO: ``rule.rotate`` with the change of
  basis between the old and new subspace; Adam: M ← map(M), V ← |map(V)|), ``transfer`` (LDAdam:
  ``rule.transfer``, Adam's variance carried by the squared change of basis);
* ``refresh``: ``fixed`` every ``update_proj_gap`` steps, or ``lazy`` (Q-GaLore): a layer whose
  subspace stops moving refreshes less and less often;
* a ``fixed`` projector (haar) is built at the first step and never refreshed;
* ``stagger``: when in the gap. Every subspace is built at the first step; after it, with ``stagger=True``
  (the default) each weight renews on its own phase φ ∈ [1, gap] (the optimizer spreads the weights'
  refresh costs evenly over the phases, :func:`phases`), so no step carries more than its share of
  refresh work; ``stagger=False`` renews every weight together at multiples of the gap, as galore-torch.
  The next refresh step is kept in the state (``next_refresh``), so a resumed run keeps the schedule;
  :data:`REBUILD` there marks a subspace that was built from an all-zero gradient and is built afresh
  at the next step (:func:`retry`).

The rule works on float views of its state whatever the storage (INT8 moments are dequantized,
rotated and requantized), and on FSDP2 shards on this rank's piece, with the change of basis summed
over the ranks where the basis is split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import rules as _rules
from ..distributed import Split
from ..projectors import Projector

ON_REFRESH = ("keep", "reset", "rotate", "transfer")
REFRESH = ("fixed", "lazy")

# Q-GaLore's lazy refresh: a queue of 5 similarities; the gap grows by the group's ``lazy_growth`` (2) when
# their mean reaches its ``lazy_threshold`` (0.4).
LAZY_QUEUE = 5
#: An unfilled place in the queue (a |cos| is never negative); not NaN, so that equal states compare equal.
LAZY_EMPTY = -1.0


def change_of_basis(old: Projector, new: Projector, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The r×r map from old low-rank coordinates to new ones (float32 or wider).

    Left side (R = Pᵀ G): a moment M in old coordinates stands for P_old M in full space, whose new
    coordinates are P_newᵀ P_old M, so the map is applied as ``T @ M`` with T = P_newᵀ P_old (summed
    over the ranks' rows of P on shards). Right side (R = G Qᵀ): M Q_old in full space, new coordinates
    M Q_old Q_newᵀ, applied as ``M @ T`` with T = Q_old Q_newᵀ.
    """
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    a = old.local_basis(device, dtype)
    b = new.local_basis(device, dtype)
    if new.side == "left":
        return new.comm.all_reduce_(b.T @ a, "refresh") if not new.comm.whole else b.T @ a
    return a @ b.T


def mapping(old: Projector, new: Projector, device: torch.device, dtype: torch.dtype,
            squared: bool = False) -> Callable[[Tensor], Tensor]:
    """The change of basis as a function on tensors shaped like R (see :func:`change_of_basis`); ``squared``:
    with the matrix squared element-wise (how LDAdam's ``transfer`` carries a variance)."""
    t = change_of_basis(old, new, device, dtype)
    t = t * t if squared else t
    if new.side == "left":
        return lambda x: t @ x.to(t.dtype)
    return lambda x: x.to(t.dtype) @ t


def lr_ratio(group: dict[str, Any]) -> float:
    """The weight lr's schedule, lr_t / lr_0, which a ``learns_after_use`` projector's own lr follows (Online
    Subspace Descent's official code divides by the lr its optimizer was built with). lr_0 is the group's lr
    when it joined (``osd_lr0``, kept in the group and its checkpoints), so a schedule set by a torch
    scheduler and one the training loop writes into ``param_groups`` (nanoGPT's) step P alike; a group
    saved without it falls back to ``initial_lr`` (torch's schedulers set it), else the ratio is 1."""
    start = group.get("osd_lr0", group.get("initial_lr"))
    start = float(start) if start is not None else float(group["lr"])
    return float(group["lr"]) / start if start > 0 else 1.0


def init(group: dict[str, Any]) -> dict[str, Tensor]:
    """The state the policies keep: the step of the next refresh (0: the first step) and, under ``reset``,
    the step at which the rule's state last started."""
    out = {"next_refresh": torch.tensor(0, dtype=torch.int64)}
    if group["on_refresh"] == "reset":
        out["reset_step"] = torch.tensor(0.0, dtype=torch.float32)
    if group["refresh"] == "lazy":  # fixed shapes from the start: a distributed checkpoint loads into them
        out["lazy_queue"] = torch.full((LAZY_QUEUE,), LAZY_EMPTY, dtype=torch.float32)
        out["proj_gap"] = torch.tensor(group["update_proj_gap"], dtype=torch.int64)
    return out


#: ``next_refresh`` of a subspace built from an all-zero gradient: due at any step, and built afresh.
REBUILD = -1


def due(state: dict[str, Any], group: dict[str, Any], step: int, proj: Projector) -> bool:
    """Whether ``proj``'s subspace renews at ``step`` (counted before this step's increment)."""
    if proj.refresh_every_step or not proj.initialized:
        return True
    if proj.fixed or proj.learns_after_use:
        return False
    upcoming = state.get("next_refresh")
    if upcoming is None:  # a checkpoint from before the schedule was kept: galore-torch's
        return step % current_gap(state, group) == 0
    return step >= int(upcoming)


def schedule(state: dict[str, Any], group: dict[str, Any], step: int, phase: int) -> None:
    """After a refresh at ``step``: the next one is the first later step that is ``gap − phase`` steps before
    a multiple of the current gap, so a weight keeps its place in the gap whatever the gap becomes (Q-GaLore's
    lazy schedule doubles it). With ``stagger=False``, or for a lone weight (phase = gap), that is the next
    multiple, as galore-torch and q-galore-torch schedule it."""
    early = group["update_proj_gap"] - phase if group["stagger"] else 0
    gap = current_gap(state, group)
    _next_refresh(state, step + (-early - step - 1) % gap + 1)


def retry(state: dict[str, Any]) -> None:
    """After a subspace built from an all-zero gradient: build it afresh, from a new projector (COAP's and
    rsvd's count their refreshes), at the next step."""
    _next_refresh(state, REBUILD)


def rebuilds(state: dict[str, Any]) -> bool:
    """Whether this step builds the subspace afresh (:func:`retry` marked it)."""
    upcoming = state.get("next_refresh")
    return upcoming is not None and int(upcoming) == REBUILD


def _next_refresh(state: dict[str, Any], upcoming: int) -> None:
    """Keep ``upcoming`` as the next refresh step (in place where the state holds a tensor already)."""
    if isinstance(state.get("next_refresh"), Tensor):
        state["next_refresh"].fill_(upcoming)
    else:
        state["next_refresh"] = torch.tensor(upcoming, dtype=torch.int64)


def phases(costs: list[float], gap: int) -> list[int]:
    """A phase in [1, gap] for each of a group's weights, spreading their refresh ``costs`` evenly: the
    costliest first, each to the least-loaded phase (ties: the latest, so a lone weight keeps
    galore-torch's schedule, phase = gap). Only the latest min(gap, n) phases of n weights are ever chosen:
    while fewer than n are taken one of them is still unloaded, and the latest unloaded phase is the least
    loaded one (costs are ≥ 0). So the work is n·min(gap, n), whatever the gap (10⁹ for "never")."""
    phases = range(gap, gap - min(gap, len(costs)), -1)
    load = dict.fromkeys(phases, 0.0)
    out = [gap] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        phase = min(phases, key=lambda k: load[k])
        out[i] = phase
        load[phase] += costs[i]
    return out


def carry(policy: str, rule: _rules.Rule, view: dict[str, Any], old: Projector, new: Projector,
          split: Split, group: dict[str, Any], steps: int = 0) -> None:
    """Apply ``on_refresh=policy`` to a rule's state view (float tensors) for a change from ``old`` to ``new``
    (``steps``: the updates the state has seen, which ``transfer``'s bias correction reads)."""
    if policy == "reset":
        rule.reset(view)
    elif policy in ("rotate", "transfer"):
        like = next(v for k, v in view.items() if k in rule.keys and isinstance(v, Tensor))
        if policy == "rotate":
            rule.rotate(view, mapping(old, new, like.device, like.dtype), split, group)
        else:
            rule.transfer(view, mapping(old, new, like.device, like.dtype),
                          mapping(old, new, like.device, like.dtype, squared=True), steps, split, group)


def after_refresh(group: dict[str, Any], rule: _rules.Rule, state: dict[str, Any], view: dict[str, Any],
                  old: Projector, new: Projector, split: Split, device: torch.device) -> None:
    """A parameter's subspace changed from ``old`` to ``new`` (not its first): carry the rule's state
    (``view``: this rank's pieces of ``state``, as stored) by ``on_refresh``, and record the lazy schedule."""
    if group["on_refresh"] != "keep":
        floats = _rules.base.load(rule, view)
        carry(group["on_refresh"], rule, floats, old, new, split, group, _rules.base.steps(state))
        _rules.base.store(rule, view, floats)
        if group["on_refresh"] == "reset":
            state["reset_step"] = state["step"].clone()  # the rule's state starts again: steps() restarts
    if group["refresh"] == "lazy":
        lazy_refresh_record(state, old, new, group, device)


def rotate_moments(state: dict[str, Any], old: Projector, new: Projector, eps: float = 1e-8) -> None:
    """``on_refresh="rotate"`` on one process's state dict, for the registered rule whose keys it holds."""
    keys = {k for k, v in state.items() if isinstance(v, Tensor) and not k.endswith("_absmax") and k != "step"}
    rule = next(r for r in _rules.REGISTRY.values() if keys and keys <= set(r.keys))
    view = _rules.base.load(rule, state)
    carry("rotate", rule, view, old, new, Split.of_whole(), {"eps": eps})
    for key in rule.keys:
        if key in state:
            if _rules.base.storage_of(state, key) is _rules.base.FLOAT:
                state[key] = view[key]
            else:
                _rules.base.storage_of(state, key).store(state, key, view[key], signed=key not in rule.nonnegative)


def top_cosine(old: Projector, new: Projector, device: torch.device) -> Tensor:
    """|cos| of the old and new subspaces' first basis vectors (for SVD-like projectors, the top singular
    vectors; on shards a column of P split over the ranks, three sums all-reduced)."""
    a = old.local_basis(device, torch.float32)
    b = new.local_basis(device, torch.float32)
    a, b = (a[:, 0], b[:, 0]) if new.side == "left" else (a[0], b[0])
    sums = torch.stack([a @ b, a @ a, b @ b])
    if new.side == "left" and not new.comm.whole:
        new.comm.all_reduce_(sums, "refresh")
    return (sums[0] / torch.clamp(sums[1].sqrt() * sums[2].sqrt(), min=1e-8)).abs()


def lazy_refresh_record(state: dict[str, Any], old: Projector, new: Projector, group: dict[str, Any],
                        device: torch.device) -> None:
    """Q-GaLore's layer-adaptive schedule, after a refresh from ``old`` to ``new``.

    Push |cos(old top vector, new top vector)| into a queue of 5 (the absolute value: a singular
    vector's sign is arbitrary, which the reference code ignores); once the queue is full and its
    mean is at least ``group["lazy_threshold"]`` (0.4), multiply this layer's gap by
    ``group["lazy_growth"]`` (2; q-galore-torch's ``cos_threshold`` and ``gamma_proj``). The queue is
    not cleared, so a layer whose subspace keeps still keeps growing its gap at each refresh, as in the
    reference. The queue is always 5
    entries, :data:`LAZY_EMPTY` where none has been pushed yet (a checkpoint of before kept only the
    pushed ones).
    """
    cos = top_cosine(old, new, device)
    queue = state.get("lazy_queue", torch.zeros(0, dtype=torch.float32))
    pushed = torch.cat([queue[queue != LAZY_EMPTY], cos.reshape(1).to("cpu", torch.float32)])[-LAZY_QUEUE:]
    state["lazy_queue"] = torch.cat([torch.full((LAZY_QUEUE - pushed.numel(),), LAZY_EMPTY, dtype=torch.float32), pushed])
    if pushed.numel() == LAZY_QUEUE and float(pushed.mean()) >= float(group["lazy_threshold"]):
        state["proj_gap"] = torch.tensor(int(state.get("proj_gap", group["update_proj_gap"])) * group["lazy_growth"])


def current_gap(state: dict[str, Any], group: dict[str, Any]) -> int:
    if group["refresh"] == "lazy" and "proj_gap" in state:
        return int(state["proj_gap"])
    return group["update_proj_gap"]
