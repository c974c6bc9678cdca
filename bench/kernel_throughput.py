"""Throughput of every kernel op: Triton (and the CUDA C++ extension where it has the op) against the
plain-torch reference on the same device, measured in one run.

    python bench/kernel_throughput.py                     # a Markdown table for the README
    python bench/kernel_throughput.py --numel 67108864    # elements per tensor (default 2^24 on CUDA, 2^20 on CPU)

GB/s counts the bytes an op must read and write (inputs, outputs, per-block scales), divided by the
median time of one call; each round calls every implementation once, in rotating order, so drift
hits all alike (as bench/interleaved.py does). On CUDA the rows are the reference, Triton and the
extension; on a CPU the reference and the C kernel (cpu_ext: the 8-bit Adam step): Triton there runs in its interpreter
(TRITON_INTERPRET=1), which checks results, not speed. bench/test_kernel_throughput.py times the
same cases with pytest-benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch

from lowrank_optim.kernels import BLOCK, GROUP, cpu_ext, cuda_ext, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Case:
    op: str  # the function's name in every implementation
    label: str  # the row's name
    nbytes: int  # bytes read + written by one call
    args: Callable[[], tuple[tuple, dict[str, Any]]]  # fresh (args, kwargs) for one implementation


def cases(n: int, device: str = DEVICE) -> list[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(n, generator=g) * 1e-3).to(device)
    blocks = -(-n // BLOCK)
    groups = -(-n // GROUP)
    codes, absmax = reference.quantize_blockwise(x)
    gcodes, scale, zero = reference.quantize_grouped(x, bits=8)
    qcodes, qscale, qzero = reference.quantize_grouped(x, bits=4)
    packed = reference.pack_int4(qcodes)
    m = reference.quantize_blockwise(x, signed=True)
    v = reference.quantize_blockwise(x * x, signed=False)

    def adam_args():  # fresh moments: the op updates them in place
        return (x, m[0].clone(), m[1].clone(), v[0].clone(), v[1].clone()), dict(beta1=0.9, beta2=0.999, eps=1e-8,
                                                                                  step=10)

    f32, u8 = 4, 1
    return [
        Case("quantize_blockwise", "quantize_blockwise (INT8, dynamic)", n * f32 + n * u8 + blocks * f32,
             lambda: ((x,), {})),
        Case("dequantize_blockwise", "dequantize_blockwise → fp32", n * u8 + blocks * f32 + n * f32,
             lambda: ((codes, absmax), {})),
        Case("adam8bit_direction", "adam8bit_direction (one step)",
             n * f32 + 2 * 2 * (n * u8 + blocks * f32) + n * f32, adam_args),
        Case("quantize_grouped", "quantize_grouped INT8 nearest", n * f32 + n * u8 + 2 * groups * f32,
             lambda: ((x,), {"bits": 8})),
        Case("quantize_grouped", "quantize_grouped INT8 stochastic", n * f32 + n * u8 + 2 * groups * f32,
             lambda: ((x,), {"bits": 8, "stochastic": True, "seed": 1})),
        Case("dequantize_grouped", "dequantize_grouped → fp32", n * u8 + 2 * groups * f32 + n * f32,
             lambda: ((gcodes, scale, zero), {})),
        Case("pack_int4", "pack_int4", n * u8 + n // 2, lambda: ((qcodes,), {})),
        Case("unpack_int4", "unpack_int4", n // 2 + n * u8, lambda: ((packed, n), {})),
        Case("dequantize_int4", "dequantize_int4 → fp32", n // 2 + 2 * groups * f32 + n * f32,
             lambda: ((packed, qscale, qzero, n), {})),
        Case("dequantize_int4", "dequantize_int4 → bf16", n // 2 + 2 * groups * f32 + n * 2,
             lambda: ((packed, qscale, qzero, n), {"dtype": torch.bfloat16})),
        Case("stochastic_round_bf16", "stochastic_round_bf16", n * f32 + n * 2, lambda: ((x,), {"seed": 3})),
    ]


def implementations(device: str = DEVICE) -> dict[str, ModuleType]:
    """The implementations worth timing on ``device``: the reference always; on CUDA Triton and the
    CUDA extension (when they import / build); on a CPU the C kernel (when it builds)."""
    impls: dict[str, ModuleType] = {"reference": reference}
    if device == "cpu" and cpu_ext.load() is not None:
        impls["cpu_ext"] = cpu_ext
    if device == "cuda":
        try:
            from lowrank_optim.kernels import triton_kernels
        except ImportError:
            pass
        else:
            impls["triton"] = triton_kernels
        ext = cuda_ext.load()
        if ext is not None:
            impls["cuda_ext"] = cuda_ext
    return impls


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def call(impl: ModuleType, case: Case, args: tuple, kwargs: dict) -> None:
    getattr(impl, case.op)(*args, **kwargs)


def measure(case: Case, impls: dict[str, ModuleType], rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each implementation that has the op."""
    have = {k: m for k, m in impls.items() if hasattr(m, case.op)}
    prepared = {k: case.args() for k in have}
    for k, m in have.items():  # compile / warm up
        call(m, case, *prepared[k])
    _sync()
    times: dict[str, list[float]] = {k: [] for k in have}
    names = list(have)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            _sync()
            t = time.perf_counter()
            for _ in range(inner):
                call(have[k], case, *prepared[k])
            _sync()
            times[k].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def outputs(impl: ModuleType, case: Case) -> list[torch.Tensor]:
    """Everything one call of ``case`` leaves: its results and its (in-place updated) tensor arguments."""
    args, kwargs = case.args()
    result = getattr(impl, case.op)(*args, **kwargs)
    result = result if isinstance(result, tuple) else (result,)
    return [t for t in (*result, *args) if isinstance(t, torch.Tensor)]


def check(case: Case, impls: dict[str, ModuleType]) -> dict[str, str]:
    """Each implementation's outputs against the reference's, bit for bit: every op is deterministic given
    its seed, and the kernels promise the reference's exact bits (tests/test_kernels.py)."""
    want = outputs(reference, case)
    verdict = {}
    for name, impl in impls.items():
        if name == "reference" or not hasattr(impl, case.op):
            continue
        got = outputs(impl, case)
        same = len(got) == len(want) and all(
            g.shape == w.shape and g.dtype == w.dtype and torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want))
        verdict[name] = "bit-identical" if same else "DIFFERS"
    return verdict


def copy_bandwidth(numel: int = 2**28) -> float:
    """Bytes per second of a device-to-device copy of ``numel`` bytes (read + write): the memory
    bandwidth this device reaches in practice, the denominator of the table's fraction."""
    x = torch.empty(numel, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(5):
        _sync()
        t = time.perf_counter()
        y.copy_(x)
        _sync()
        times.append(time.perf_counter() - t)
    return 2 * numel / statistics.median(times)


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=2**24 if DEVICE == "cuda" else 2**20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=None, help="calls per timing (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--check", action="store_true",
                        help="also compare every implementation's outputs with the reference's, bit for bit (exit 1 if any differs)")
    args = parser.parse_args()
    inner = args.inner or (10 if DEVICE == "cuda" else 1)
    impls = implementations()
    versions = f"torch {torch.__version__}"
    if "triton" in impls:
        import triton

        versions += f", triton {triton.__version__}"
    print(f"Kernel throughput on {device_name()}, {versions}, {args.numel:,} elements per tensor")
    if DEVICE != "cuda":
        print("No CUDA device: the torch reference and the C kernel are timed (Triton on a CPU runs in its "
              "interpreter, which checks results and is no measure of speed).")
    peak = copy_bandwidth()
    print(f"A device-to-device copy reaches {peak / 1e9:,.0f} GB/s here: the 'of copy' column is each op's "
          "GB/s as a fraction of it.\n")
    print("| op | implementation | median (µs) | GB/s | of copy | vs reference | result |")
    print("|---|---|---:|---:|---:|---:|---|")
    differ = []
    for case in cases(args.numel):
        med = measure(case, impls, args.rounds, inner)
        verdict = check(case, impls) if args.check else {}
        differ += [f"{case.label} ({k})" for k, v in verdict.items() if v != "bit-identical"]
        base = med.get("reference")
        for impl, t in med.items():
            speedup = f"{base / t:.2f}x" if base and impl != "reference" else "-"
            rate = case.nbytes / t
            print(f"| {case.label} | {impl} | {t * 1e6:,.1f} | {rate / 1e9:.3g} | {rate / peak:.0%} | {speedup} | "
                  f"{verdict.get(impl, '-')} |")
    if differ:
        print("differs from the reference: " + ", ".join(differ))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
