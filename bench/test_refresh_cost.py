"""Refresh cost: one ``Projector.update(G)`` of every projector against the full SVD, same matrix.

Run (the default sizes suit a small CPU; LRO_BENCH_LARGE=1 adds LLaMA-7B-sized matrices at ranks
128 to 1024, on CUDA when it is available):

    pytest bench/test_refresh_cost.py --benchmark-json=bench/results/refresh_cost.json
    python bench/report.py bench/results/refresh_cost.json

Each (shape, rank) is one benchmark group; report.py divides the ``svd`` median by each
projector's. ``online_pca`` is timed at its steady state (a gradient step; its one SVD happens
during warm-up), ``dct`` with its shared basis already built (built once per size for the whole
model), ``coap`` at its SGD refresh (given a first moment) and ``coap-resvd`` at its warm-started re-SVD. ``proj_type="std"``: for m < n the left side (d = m) is projected.
"""

from __future__ import annotations

import os

import pytest
import torch

import lowrank_optim as lro

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["svd", "rsvd", "dct", "random", "sparse", "online_pca", "coap", "coap-resvd"]
#: Timed variants: COAP's SGD refresh (given a moment, as in training) and its re-SVD (every refresh one).
VARIANTS = {"coap-resvd": ("coap", {"reproject_factor": 1})}
CASES = [((1024, 2752), r) for r in (128, 256)]
if os.environ.get("LRO_BENCH_LARGE") == "1":
    CASES += [(shape, r) for shape in ((4096, 4096), (4096, 11008)) for r in (128, 256, 512, 1024)]
ROUNDS = {"svd": 3}  # the slow baseline; every other projector gets 10
LARGE = 4 * 2**20  # elements: from here one SVD takes seconds to a minute on a CPU


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def gradient(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A gradient-like matrix: a decaying rank-64 part plus dense noise (shape is what the timings
    depend on; the spectrum keeps iterative methods honest)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = 64
    left = torch.randn(m, k, generator=g) * torch.logspace(0, -2, k)
    noisy = left @ torch.randn(k, n, generator=g) + 0.1 * torch.randn(m, n, generator=g)
    return (noisy / noisy.norm()).to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[f"{m}x{n}-r{r}" for (m, n), r in CASES])
def test_refresh(benchmark, impl, case):
    (m, n), rank = case
    grad = gradient(m, n)
    name, options = VARIANTS.get(impl, (impl, {}))
    proj = lro.projectors.make(name, rank, proj_type="std", seed=1, **options)
    proj.update(grad)  # online_pca, coap: their first basis; dct: builds the shared basis
    moment = proj.project(grad) if proj.reads_moment else None  # coap's correlation term reads M
    _sync()

    def refresh():
        proj.update(grad, moment)
        _sync()

    benchmark.group = f"refresh {m}x{n} rank {rank} ({DEVICE})"
    benchmark.extra_info.update(
        impl=impl, kind="refresh_cost", shape=f"{m}x{n}", rank=rank, side=proj.side, device=DEVICE
    )
    if m * n >= LARGE:  # the untimed update above already warmed up
        rounds, warmup = (1 if impl == "svd" else 3), 0
    else:
        rounds, warmup = ROUNDS.get(impl, 10), 1
    benchmark.pedantic(refresh, rounds=rounds, warmup_rounds=warmup, iterations=1)
