"""One optimizer step on the LLaMA-60M parameter shapes: GaLoreAdamW, galore-torch, torch AdamW.

Run (results in the README's benchmark section):

    pytest bench/test_step_galore.py --benchmark-json=bench/results/step_galore.json
    python bench/report.py bench/results/step_galore.json

Two steps are timed: a plain step (no refresh) and a refresh step (an SVD for every projected
weight; update_proj_gap=1 makes every step one). Ratios are taken within this one run.
"""

from __future__ import annotations

import os

import pytest
import torch

import lowrank_optim as lro
from shapes import make_params

MODEL = os.environ.get("LRO_BENCH_MODEL", "llama_60m")
RANK = int(os.environ.get("LRO_BENCH_RANK", "128"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = {"plain": 10, "refresh": 3}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(impl: str, gap: int):
    params, projected = make_params(MODEL, device=DEVICE)
    low = [p for n, p in params if n in projected]
    plain = [p for n, p in params if n not in projected]
    keys = dict(rank=RANK, update_proj_gap=gap, scale=0.25, proj_type="std")
    if impl == "adamw":
        return torch.optim.AdamW([p for _, p in params], lr=1e-3, foreach=True)
    if impl == "lowrank_optim":
        return lro.GaLoreAdamW([{"params": low, **keys}, {"params": plain}], lr=1e-3, weight_decay=0.0)
    if impl == "galore_torch":
        galore_torch = pytest.importorskip("galore_torch", reason="galore-torch is not installed")
        return galore_torch.GaLoreAdamW(
            [{"params": low, **keys}, {"params": plain}], lr=1e-3, weight_decay=0.0, no_deprecation_warning=True
        )
    raise ValueError(impl)


@pytest.mark.parametrize("impl", ["adamw", "lowrank_optim", "galore_torch"])
@pytest.mark.parametrize("kind", ["plain", "refresh"])
def test_step(benchmark, impl, kind):
    if impl == "adamw" and kind == "refresh":
        pytest.skip("AdamW has no refresh step")
    opt = build(impl, gap=1 if kind == "refresh" else 10**9)
    opt.step()  # first step allocates state (and refreshes)
    _sync()

    def step():
        opt.step()
        _sync()

    benchmark.group = f"{MODEL} rank {RANK} {kind} step ({DEVICE})"
    benchmark.extra_info.update(impl=impl, kind=kind, model=MODEL, rank=RANK, device=DEVICE)
    benchmark.pedantic(step, rounds=ROUNDS[kind], warmup_rounds=1, iterations=1)
