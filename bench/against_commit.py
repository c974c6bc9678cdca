"""This checkout's step time against an earlier commit's, interleaved in one run (LLaMA-60M shapes).

    python bench/against_commit.py 92497a3                     # plain steps of every preset
    python bench/against_commit.py 92497a3 --refresh           # steps that refresh every subspace
    python bench/against_commit.py 92497a3 --presets galore,frugal --rounds 21

The earlier commit's ``lowrank_optim/`` is exported with ``git archive`` into a temporary folder as the
package ``lowrank_optim_then`` (the package imports itself relatively, so it runs unchanged beside this
one). Each round steps both optimizers once, in alternating order, so a shared machine's drift hits
both alike; the table gives medians and their ratio. Same shapes, ranks and gradients as
bench/interleaved.py.
"""

from __future__ import annotations

import argparse
import importlib
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import torch

from shapes import make_params

ROOT = Path(__file__).resolve().parent.parent
#: preset: (class name, rank)
PRESETS = {"galore": ("GaLoreAdamW", 128), "apollo": ("APOLLO", 128), "apollo_mini": ("APOLLOMini", 1),
           "frugal": ("FRUGAL", 128), "fira": ("Fira", 128), "galore_adafactor": ("GaLoreAdafactor", 128),
           "sumo": ("SUMO", 128), "galore8bit": ("GaLoreAdamW8bit", 128), "qgalore": ("QGaLoreAdamW", 128)}
NEVER = 10**9
SLOW = ("galore8bit", "qgalore")  # the CPU reference kernels: seconds a step, so 3 rounds


def export(ref: str, into: Path):
    """``ref``'s package, importable as ``lowrank_optim_then``."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "lowrank_optim"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    shutil.move(str(into / "lowrank_optim"), str(into / "lowrank_optim_then"))
    sys.path.insert(0, str(into))
    return importlib.import_module("lowrank_optim_then")


def build(lib, preset: str, gap: int) -> torch.optim.Optimizer:
    cls, rank = PRESETS[preset]
    params, projected = make_params("llama_60m")
    low = [p for n, p in params if n in projected]
    plain = [p for n, p in params if n not in projected]
    groups = [{"params": low, "rank": rank, "update_proj_gap": gap}, {"params": plain}]
    return getattr(lib, cls)(groups, lr=1e-3, weight_decay=0.0)


def timed(opt: torch.optim.Optimizer) -> float:
    t = time.perf_counter()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the earlier commit (any git revision)")
    parser.add_argument("--refresh", action="store_true", help="refresh every subspace at every step")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--presets", default=",".join(p for p in PRESETS if p not in SLOW))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import lowrank_optim as now

    with tempfile.TemporaryDirectory() as tmp:
        then = export(args.ref, Path(tmp))
        print(f"llama_60m shapes, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'refresh' if args.refresh else 'plain'} steps, against {args.ref}")
        print()
        print(f"| preset | {args.ref} (ms) | this checkout (ms) | ratio |")
        print("|---|---:|---:|---:|")
        for preset in args.presets.split(","):
            opts = {"then": build(then, preset, 1 if args.refresh else NEVER),
                    "now": build(now, preset, 1 if args.refresh else NEVER)}
            for opt in opts.values():  # state allocation and the first refresh stay out of the timing
                opt.step()
            times: dict[str, list[float]] = {k: [] for k in opts}
            order = list(opts)
            for r in range(3 if preset in SLOW else args.rounds):
                for k in order[r % 2:] + order[: r % 2]:
                    times[k].append(timed(opts[k]))
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"| {preset} | {med['then']:.1f} | {med['now']:.1f} | {med['now'] / med['then']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
