"""Step times of every preset, its reference package and torch AdamW, measured interleaved.

    python bench/interleaved.py                # plain steps of every preset, LLaMA-60M shapes
    python bench/interleaved.py --refresh      # GaLore refresh steps (an SVD of every weight)

The pytest-benchmark suites time one implementation after another; on a shared or throttling
machine that drift shows up as a ratio. Here each round steps every implementation once, in
rotating order, so drift hits all of them alike; the table gives medians and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from test_step_presets import DEVICE, MODEL, PRESETS, _split, build_ours, build_reference


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(opt) -> float:
    _sync()
    t = time.perf_counter()
    opt.step()
    _sync()
    return time.perf_counter() - t


def measure(optimizers: dict[str, torch.optim.Optimizer], rounds: int) -> dict[str, list[float]]:
    for opt in optimizers.values():  # state allocation and the first refresh stay out of the timing
        opt.step()
        opt.step()
    names = list(optimizers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(timed(optimizers[n]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refresh", action="store_true", help="time GaLore refresh steps instead")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--presets", default=",".join(PRESETS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"{MODEL} shapes, device {DEVICE}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print("| preset | step | lowrank-optim (ms) | reference (ms) | AdamW (ms) | vs reference | vs AdamW |")
    print("|---|---|---:|---:|---:|---:|---:|")
    presets = ["galore"] if args.refresh else args.presets.split(",")
    for preset in presets:
        opts = {"ours": build_ours(preset)}
        try:
            opts["reference"] = build_reference(preset)
        except BaseException:  # noqa: BLE001 - pytest.skip when there is no reference package
            pass
        if args.refresh:
            for opt in opts.values():
                for group in opt.param_groups:
                    if "rank" in group and group["rank"] is not None:
                        group["update_proj_gap"] = 1
        else:
            params, _, _ = _split()
            opts["adamw"] = torch.optim.AdamW([p for _, p in params], lr=1e-3, foreach=True)
        times = measure(opts, args.rounds or (4 if args.refresh else 15))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ref = med.get("reference")
        adamw = med.get("adamw")
        cell = lambda x: f"{x:.1f}" if x else "-"  # noqa: E731
        ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
        kind = "refresh" if args.refresh else "plain"
        print(f"| {preset} | {kind} | {cell(med['ours'])} | {cell(ref)} | {cell(adamw)} | "
              f"{ratio(med['ours'], ref)} | {ratio(med['ours'], adamw)} |")


if __name__ == "__main__":
    main()
