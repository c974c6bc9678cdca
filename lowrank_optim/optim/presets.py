"""Named methods: each a LowRankAdamW with the options of its paper."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .lowrank import LowRankAdamW


class GaLoreAdamW(LowRankAdamW):
    """GaLore: Adam in the gradient's top-r singular subspace, refreshed by SVD (Zhao et al. 2024).

    "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", arXiv:2403.03507.
    Adam runs on the gradient projected onto its top-r singular
    vectors, refreshed by an SVD every ``update_proj_gap`` steps, the residual dropped, the update
    scaled by ``scale``. Moments are kept across refreshes.

    Paper settings: lr 0.01, scale 0.25, gap 200, rank 128/256/256/512 for LLaMA 60M/130M/350M/1B;
    7B: rank 1024, gap 500, lr 0.005. The group keys of galore-torch (``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``) are read the same way.

    Departures from galore-torch 1.0, each deliberate and tested: ε is added to the bias-corrected
    √V̂ and weight decay is taken from the pre-update weights (both as ``torch.optim.AdamW``); the
    projector lives in the state as tensors (so checkpoints load with ``weights_only=True``);
    ``project_back`` takes the side from the stored basis, not from the low-rank tensor's shape;
    moments stay float32 for bf16/fp16 weights.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        projector: str = "svd",
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            projector=projector,
            foreach=foreach,
        )
