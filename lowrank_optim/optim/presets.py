"""Named methods: each a LowRankAdamW with the options of its paper."""

from __future__ import annotations

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

    preset = {"projector": "svd", "scale": 0.25, "update_proj_gap": 200}
