"""What the non-finite gradient check costs: its share of one optimizer step, LLaMA-60M shapes.

    python bench/nonfinite_cost.py [--rounds 15] [--presets galore,apollo_mini]

For each preset, two optimizers on their own copies of the same weights and gradients, one with
``nonfinite="raise"`` (the check) and one with ``"ignore"`` (none), plus the check alone
(``lowrank_optim.optim.nonfinite.skip_step``), timed interleaved in rotating order (see
``bench/interleaved.py``) so that drift on a shared machine hits all three alike. Reports medians
and the check's share of the step without it. Plain steps only (no refresh inside the timed steps).
``--clock cpu`` times this process's CPU time instead of the wall clock: on a machine shared with
other jobs it is disturbed less (run it with one thread, ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from lowrank_optim.optim import nonfinite
from test_step_presets import DEVICE, MODEL, NEVER, PRESETS, _split


def build(preset: str, mode: str):
    cls, rank, keys, _ = PRESETS[preset]
    _, low, plain = _split()
    return cls([{"params": low, "rank": rank, "update_proj_gap": NEVER, **keys}, {"params": plain}],
               lr=1e-3, weight_decay=0.0, nonfinite=mode)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, clock=time.perf_counter) -> float:
    _sync()
    t = clock()
    fn()
    _sync()
    return clock() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--presets", default="galore,apollo,apollo_mini,fira")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="cpu: this process's CPU time (CPU only), which other jobs on a shared machine disturb less")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"{MODEL} shapes, device {DEVICE}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, {args.clock} clock")
    print()
    print("| preset | step, nonfinite='ignore' (ms) | step, 'raise' (ms) | the check alone (ms) | check / step |")
    print("|---|---:|---:|---:|---:|")
    for preset in args.presets.split(","):
        checked, unchecked = build(preset, "raise"), build(preset, "ignore")
        for opt in (checked, unchecked):  # state allocation and the first (refresh) step stay out
            opt.step()
            opt.step()
        runs = {"ignore": unchecked.step, "raise": checked.step,
                "check": lambda opt=checked: nonfinite.skip_step(opt, None)}
        names = list(runs)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                times[n].append(timed(runs[n], CLOCKS[args.clock]))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"| {preset} | {med['ignore']:.1f} | {med['raise']:.1f} | {med['check']:.1f} | "
              f"{med['check'] / med['ignore']:.1%} |")


if __name__ == "__main__":
    main()
