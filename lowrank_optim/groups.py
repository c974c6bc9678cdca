"""Parameter groups for a model: low-rank keys on the 2-D weights of linear layers, plain AdamW
for everything else (embeddings, the output head, norms, biases), and no weight decay on the
parameters that loops usually exempt from it (norm gains and biases)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

# Output heads are projected by no method we implement: their rows are per-token and the papers keep
# them full rank.
_HEAD_NAMES = ("lm_head", "embed_out")
#: Names of an output head only at the top of the model (torchtitan's and Meta's LLaMA ``output``, a ``head``):
#: inside a block the same names are ordinary layers (BERT's ``attention.output``).
_TOP_HEAD_NAMES = ("output", "head")


def _heads(model: nn.Module) -> set[int]:
    """The ids of the output heads' modules: named as one (:data:`_HEAD_NAMES` anywhere, :data:`_TOP_HEAD_NAMES` at
    the top), or the model's ``get_output_embeddings()`` (Hugging Face)."""
    found = {id(m) for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] in _HEAD_NAMES or n in _TOP_HEAD_NAMES}
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module):
        found.add(id(head))
    return found

#: ``rank="auto"``: the optimizer picks the rank (its preset's own, see ``LowRankAdamW.auto_rank``).
AUTO = "auto"


def _no_decay_rule(no_decay: Iterable[str] | Callable[[str, Tensor], bool] | None,
                   model: nn.Module) -> Callable[[str, Tensor], bool]:
    """The predicate ``(name, parameter) -> bool`` for parameters without weight decay. Names that are no
    parameter of ``model`` are refused (a typo would otherwise leave its parameter decaying, silently)."""
    if no_decay is None:
        # nanoGPT's rule (configure_optimizers) and, for LLaMA/GPT-style models, Hugging Face Trainer's
        # (biases and norm weights): every parameter of fewer than 2 dimensions.
        return lambda name, p: p.dim() < 2
    if callable(no_decay):
        return no_decay
    names = {no_decay} if isinstance(no_decay, str) else set(no_decay)
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unknown = sorted(names - known)
    if unknown:
        hints = [f"{n!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(n, known, n=1)) else repr(n)
                 for n in unknown]
        raise ValueError(f"no_decay names {', '.join(hints)}, which are not parameters of the model; give names "
                         "from model.named_parameters(), or a predicate (name, parameter) -> bool")
    return lambda name, p: name in names


def param_groups(
    model: nn.Module,
    rank: int | str | None = AUTO,
    update_proj_gap: int | None = None,
    scale: float | None = None,
    target_modules: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
    proj_type: str | None = None,
    no_decay: Iterable[str] | Callable[[str, Tensor], bool] | None = None,
    **low_rank_keys: Any,
) -> list[dict[str, Any]]:
    """Up to three parameter groups for ``model``: ``[low_rank, plain, no_decay]``.

    The low-rank group holds the weight of every ``nn.Linear`` (and Hugging Face ``Conv1D``, GPT-2's linear
    layer: :func:`is_linear`) whose qualified module name contains
    one of ``target_modules`` (default: every linear layer except the output head (:func:`_heads`) and any layer whose
    weight is tied to an embedding; or, with a predicate ``(module_name, module) -> bool``, every
    ``nn.Linear`` it accepts); it carries ``rank`` and whichever of ``update_proj_gap``,
    ``scale``, ``proj_type`` and further keys (``projector="svd"``, ``lr=...``) are given (``weight_decay``
    reaches the plain group with decay too: it is the model's decay); keys left
    out take the optimizer's defaults (each preset's own: GaLore's scale 0.25, APOLLO-Mini's 128).
    ``rank="auto"`` (the default) leaves the number to the optimizer: a rank given to its
    constructor, else its preset's (a quarter of the weights' short side; APOLLO-Mini: 1).
    With ``match_adamw_rms=True`` the low-rank group is one group per short side (:func:`by_short_side`:
    grouped-query attention's k/v_proj apart), so each gets the scale of its own width.

    The plain group holds the other parameters with weight decay (embeddings, the output head); the
    ``no_decay`` group the parameters for which ``no_decay`` holds, with ``weight_decay=0.0``: by
    default every parameter of fewer than 2 dimensions (norm gains and biases), which is nanoGPT's
    rule and, on LLaMA- and GPT-style models, Hugging Face Trainer's. ``no_decay`` may also be a
    collection of parameter names, which replaces the default (names that are no parameter are
    refused), or a predicate ``(name, parameter) -> bool`` (``lro.hf`` passes Trainer's own names).
    Neither plain group projects anything, whatever ``rank`` the optimizer's constructor is given (they
    carry ``rank=None``). Parameters are given as ``(name, tensor)`` pairs so that the optimizer's
    warnings and errors name them. Empty groups are left out.

    With ``projector="shared_head"`` (GaLore+) the low-rank group is cut in three: q/k/v_proj and o_proj
    with ``head_dim`` (from the config, or given) and their ``head_axis``, the other weights with
    ``other_projector`` (default ``svd``); see :func:`lowrank_optim.projectors.split_head_groups`.
    """
    chosen = _low_rank_weights(model, target_modules)
    exempt = _no_decay_rule(no_decay, model)
    low, plain, free = [], [], []
    for name, p in model.named_parameters():
        if id(p) in chosen:
            low.append((name, p))
        else:
            (free if exempt(name, p) else plain).append((name, p))
    groups: list[dict[str, Any]] = []
    if low:
        given = dict(update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
        keys = {k: v for k, v in given.items() if v is not None}
        parts = by_short_side(low) if low_rank_keys.get("match_adamw_rms") is True else [low]
        groups.extend({"params": part, "rank": rank, **keys, **low_rank_keys} for part in parts)
    if plain:
        # a weight_decay given here is the model's decay (nanoGPT's decay group: every 2-D weight), not the
        # projected weights' alone; the no-decay group keeps 0
        decay = {"weight_decay": low_rank_keys["weight_decay"]} if "weight_decay" in low_rank_keys else {}
        groups.append({"params": plain, "rank": None, **decay})
    if free:
        groups.append({"params": free, "rank": None, "weight_decay": 0.0})
    # projector="shared_head" (GaLore+): attention weights by head axis, the rest svd
    from .projectors import split_head_groups

    return split_head_groups(model, groups)


def by_short_side(params: list[tuple[str, Tensor]]) -> list[list[tuple[str, Tensor]]]:
    """``params`` cut by their short side, in the order the sides first appear (model order). With
    ``match_adamw_rms`` each group's scale is √(d/r) of its own width d: grouped-query attention's k/v_proj
    (short side n_kv_heads·head_dim) would otherwise take the hidden width's scale, √(hidden/d_kv) times an
    AdamW step (2x on Llama-3-8B)."""
    parts: dict[int, list[tuple[str, Tensor]]] = {}
    for name, p in params:
        parts.setdefault(min(p.shape), []).append((name, p))
    return list(parts.values())


def _low_rank_weights(model: nn.Module, target_modules: Iterable[str] | Callable[[str, nn.Module], bool] | None) -> set[int]:
    """The ids of the linear weights ``param_groups`` projects."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups takes the model (an nn.Module), got {type(model).__name__}; "
                        "for a list of parameters build the groups by hand")
    embedding_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not None
    }
    heads = _heads(model)
    if callable(target_modules):
        chosen = {id(m.weight) for n, m in model.named_modules()
                  if is_linear(m) and m.weight is not None and m.weight.dim() == 2
                  and id(m.weight) not in embedding_weights and id(m) not in heads
                  and target_modules(n, m)}
        if not chosen:
            _nothing_chosen("the target_modules predicate", model)
        return chosen
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = None if target_modules is None else list(target_modules)
    if targets is not None and not targets:
        raise ValueError("target_modules is empty; pass None to project every linear layer")

    chosen: set[int] = set()
    for mod_name, module in model.named_modules():
        if not is_linear(module) or module.weight is None or module.weight.dim() != 2:
            continue
        if id(module.weight) in embedding_weights:
            continue
        if id(module) in heads:  # the output head stays plain, whatever the targets
            continue
        if targets is not None and not any(t in mod_name for t in targets):
            continue
        chosen.add(id(module.weight))

    if targets is not None and not chosen:
        _nothing_chosen(f"target_modules={targets}", model)
    return chosen


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer whose weight ``param_groups`` may project: an ``nn.Linear``, or Hugging
    Face's ``Conv1D`` (GPT-2, GPT, ImageGPT: a linear layer with its weight stored in×out, x @ W + b), known by
    its class without importing transformers. Any 2-D weight is a matrix to the projectors, either way round."""
    if isinstance(module, nn.Linear):
        return True
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") and hasattr(module, "nf")


def _nothing_chosen(what: str, model: nn.Module) -> None:
    """Refuse targets that leave no weight to project: the run would be AdamW at AdamW's memory, silently."""
    linear = [n for n, m in model.named_modules() if is_linear(m)]
    raise ValueError(
        f"{what} matches no nn.Linear in the model that is projected (the output head, "
        f"{'/'.join(_HEAD_NAMES + _TOP_HEAD_NAMES)}, never is); its linear layers are "
        f"named like {linear[:5]}"
    )


def rank_fallbacks(groups: list[dict[str, Any]]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(the shapes of the 2-D weights in ``groups`` with a rank, those of them whose short side is at most
    their group's ``rank``, which are stepped as plain AdamW); params as tensors or ``(name, tensor)`` pairs."""
    shapes, plain = [], []
    for g in groups:
        rank = g.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool):
            continue
        for x in g["params"]:
            shape = tuple((x[1] if isinstance(x, tuple) else x).shape)
            if len(shape) == 2:
                shapes.append(shape)
                if min(shape) <= rank:
                    plain.append(shape)
    return shapes, plain


def all_unprojected_error(groups: list[dict[str, Any]]) -> str | None:
    """Why ``groups`` project nothing although they ask to (every 2-D weight with a rank has a short side at
    most that rank, so the run would be plain AdamW under a low-rank name), with the fix; None otherwise."""
    candidates, plain = rank_fallbacks(groups)
    if not candidates or len(plain) < len(candidates):
        return None
    rank = max(g["rank"] for g in groups if isinstance(g.get("rank"), int) and not isinstance(g["rank"], bool))
    return (f"rank {rank} leaves all {len(candidates)} linear weights unprojected (a weight whose short side is at "
            f"most the rank is plain AdamW); use a rank below {max(min(s) for s in candidates)}")


def some_unprojected_note(groups: list[dict[str, Any]]) -> str | None:
    """One line on the 2-D weights of ``groups`` that their rank leaves as plain AdamW (None: there are none)."""
    candidates, plain = rank_fallbacks(groups)
    if not plain:
        return None
    shapes = ", ".join(f"{s[0]}x{s[1]}" for s in dict.fromkeys(plain))
    return (f"{len(plain)} of {len(candidates)} linear weights ({shapes}) have a short side at most their rank and "
            f"are updated as plain AdamW; use a rank below {min(min(s) for s in plain)} to project them")


def is_low_rank_group(group: dict[str, Any]) -> bool:
    """Whether a group from :func:`param_groups` is the low-rank one."""
    return group.get("rank") is not None
