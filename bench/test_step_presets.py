"""One optimizer step of every preset on the LLaMA-60M shapes, against torch AdamW and against the
preset's reference package (galore-torch, apollo-torch, fira), in one run.

    pytest bench/test_step_presets.py --benchmark-json=bench/results/step_presets.json
    python bench/report.py bench/results/step_presets.json

All at rank 128 (a quarter of the hidden size, the papers' 60M setting; APOLLO-Mini rank 1) and
a plain step (no refresh): the refresh cost is bench/test_refresh_cost.py's subject.
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
NEVER = 10**9  # no refresh inside the timed steps

# preset: (our class, its rank, extra group keys, reference package, reference builder)
PRESETS = {
    "galore": (lro.GaLoreAdamW, RANK, {}, "galore_torch"),
    "apollo": (lro.APOLLO, RANK, {}, "apollo_torch"),
    "apollo_mini": (lro.APOLLOMini, 1, {}, "apollo_torch"),
    "frugal": (lro.FRUGAL, RANK, {}, None),
    "fira": (lro.Fira, RANK, {}, "fira"),
    # quantized storage: against AdamW only (bitsandbytes' 8-bit GaLore needs CUDA; q-galore-torch
    # is not in our dev extra)
    "galore8bit": (lro.GaLoreAdamW8bit, RANK, {}, None),
    "qgalore": (lro.QGaLoreAdamW, RANK, {}, None),
    # other inner rules: torch's Adafactor and Muon are their full-rank counterparts, not references
    "galore_adafactor": (lro.GaLoreAdafactor, RANK, {}, None),
    "sumo": (lro.SUMO, RANK, {}, None),
}


def _split():
    params, projected = make_params(MODEL, device=DEVICE)
    low = [p for n, p in params if n in projected]
    plain = [p for n, p in params if n not in projected]
    return params, low, plain


def build_ours(preset, gap=NEVER, **extra):
    cls, rank, keys, _ = PRESETS[preset]
    _, low, plain = _split()
    return cls([{"params": low, "rank": rank, "update_proj_gap": gap, **keys, **extra}, {"params": plain}],
               lr=1e-3, weight_decay=0.0)


def build_reference(preset, gap=NEVER):
    _, rank, _, package = PRESETS[preset]
    if package is None:
        pytest.skip(f"{preset} has no reference package on the package index")
    mod = pytest.importorskip(package, reason=f"{package} is not installed")
    _, low, plain = _split()
    keys = dict(rank=rank, update_proj_gap=gap, proj_type="std")
    if preset == "galore":
        return mod.GaLoreAdamW([{"params": low, **keys, "scale": 0.25}, {"params": plain}], lr=1e-3,
                               no_deprecation_warning=True)
    if preset in ("apollo", "apollo_mini"):
        mini = preset == "apollo_mini"
        group = {"params": low, **keys, "proj": "random", "scale_type": "tensor" if mini else "channel",
                 "scale": 128.0 if mini else 1.0}
        return mod.APOLLOAdamW([group, {"params": plain}], lr=1e-3)
    return mod.FiraAdamW([{"params": low, **keys, "alpha": 1.0}, {"params": plain}], lr=1e-3)


def _time(benchmark, opt, group, impl, preset):
    opt.step()  # allocate state and take the first (refresh) step outside the timing
    if DEVICE == "cuda":
        torch.cuda.synchronize()

    def step():
        opt.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = group
    benchmark.extra_info.update(impl=impl, preset=preset, model=MODEL, rank=RANK, device=DEVICE)
    benchmark.pedantic(step, rounds=12, warmup_rounds=3, iterations=1)


def test_adamw(benchmark):
    params, _, _ = _split()
    _time(benchmark, torch.optim.AdamW([p for _, p in params], lr=1e-3, foreach=True),
          f"{MODEL} adamw step ({DEVICE})", "adamw", "adamw")


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("side", ["lowrank_optim", "reference"])
def test_preset(benchmark, preset, side):
    opt = build_ours(preset) if side == "lowrank_optim" else build_reference(preset)
    impl = side if side == "lowrank_optim" else PRESETS[preset][3]
    _time(benchmark, opt, f"{MODEL} {preset} step ({DEVICE})", impl, preset)
