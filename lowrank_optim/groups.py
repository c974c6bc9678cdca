"""Parameter groups for a model: low-rank keys on the 2-D weights of linear layers, plain AdamW
for everything else (embeddings, the output head, norms, biases)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

# Output heads are projected by no method we implement: their rows are per-token and the papers keep
# them full rank.
_HEAD_NAMES = ("lm_head",)


def param_groups(
    model: nn.Module,
    rank: int = 128,
    update_proj_gap: int | None = None,
    scale: float | None = None,
    target_modules: Iterable[str] | None = None,
    proj_type: str | None = None,
    **low_rank_keys: Any,
) -> list[dict[str, Any]]:
    """Two parameter groups for ``model``: ``[low_rank_group, plain_group]``.

    The low-rank group holds the weight of every ``nn.Linear`` whose qualified module name contains
    one of ``target_modules`` (default: every linear layer except ``lm_head`` and any layer whose
    weight is tied to an embedding); it carries ``rank`` and whichever of ``update_proj_gap``,
    ``scale``, ``proj_type`` and further keys (``projector="svd"``, ``lr=...``) are given; keys left
    out take the optimizer's defaults (each preset's own: GaLore's scale 0.25, APOLLO-Mini's 128).
    The plain group holds every other parameter. Parameters are given as ``(name, tensor)`` pairs so that the optimizer's
    warnings and errors name them. Empty groups are left out.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = None if target_modules is None else list(target_modules)
    if targets is not None and not targets:
        raise ValueError("target_modules is empty; pass None to project every linear layer")

    embedding_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not None
    }
    chosen: set[int] = set()
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight is None or module.weight.dim() != 2:
            continue
        if id(module.weight) in embedding_weights:
            continue
        leaf = mod_name.rsplit(".", 1)[-1]
        if targets is None:
            if leaf in _HEAD_NAMES:
                continue
        elif not any(t in mod_name for t in targets):
            continue
        chosen.add(id(module.weight))

    if targets is not None and not chosen:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules={targets} matches no nn.Linear in the model; its linear layers are "
            f"named like {linear[:5]}"
        )

    low, plain = [], []
    for name, p in model.named_parameters():
        (low if id(p) in chosen else plain).append((name, p))
    groups: list[dict[str, Any]] = []
    if low:
        given = dict(update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
        keys = {k: v for k, v in given.items() if v is not None}
        groups.append({"params": low, "rank": rank, **keys, **low_rank_keys})
    if plain:
        groups.append({"params": plain})
    return groups
