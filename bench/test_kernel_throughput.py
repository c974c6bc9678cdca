"""Kernel throughput with pytest-benchmark: each op's reference, Triton kernel and CUDA extension
(where it has the op) on the same device, in one run. Cases and byte counts: bench/kernel_throughput.py.

    pytest bench/test_kernel_throughput.py --benchmark-json=bench/results/kernels.json
    python bench/kernel_throughput.py          # the same cases, interleaved, as a Markdown table with GB/s

Each benchmark's extra_info holds the bytes it moves and its GB/s at the median. Without CUDA only
the reference is timed: Triton on a CPU runs in its interpreter, which is no measure of speed.
(Named apart from tests/test_kernels.py: pytest would import both as one module ``test_kernels``.)
"""

from __future__ import annotations

import pytest
import torch

from kernel_throughput import DEVICE, cases, implementations

NUMEL = 2**24 if DEVICE == "cuda" else 2**20
CASES = cases(NUMEL)
IMPLS = ["reference", "triton", "cuda_ext"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.label.replace(" → ", " to ") for c in CASES])
def test_throughput(benchmark, case, impl):
    if DEVICE != "cuda" and impl != "reference":
        pytest.skip("no CUDA device: Triton would run in its interpreter, which is no measure of speed")
    impls = implementations()
    if impl not in impls:
        pytest.skip(f"{impl} is not available on this machine")
    module = impls[impl]
    if not hasattr(module, case.op):
        pytest.skip(f"{impl} has no {case.op}")
    args, kwargs = case.args()
    fn = getattr(module, case.op)

    def run():
        fn(*args, **kwargs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{case.label} ({NUMEL:,} elements, {DEVICE})"
    benchmark.extra_info.update(impl=impl, op=case.op, bytes=case.nbytes, numel=NUMEL, device=DEVICE)
    benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = round(case.nbytes / benchmark.stats.stats.median / 1e9, 3)
