"""One prepared device check: the CUDA tests, every kernel against its reference (results and throughput as
a fraction of the device's memory bandwidth), the interleaved step table, and measured peak memory of
llama_1b and of llama_7b capped at 24 GiB. Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``.

    bash bench/gpu_check.sh [OUT]            # the wrapper: a time limit, then this script
    python bench/gpu_check.py --out results  # the same, by hand

On a machine without CUDA it runs end to end: the parts that need a GPU are listed as skipped, by name,
with the reason, and the rest run reduced (the reference kernels only, a short step table) so the check
itself is tested here. Every part runs in its own subprocess with its own time limit: a part that fails or
runs out of time is recorded as such and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()

#: The measured-memory runs: (name, config, arguments of ``lowrank-optim memory``, CUDA cap in GiB).
MEMORY_RUNS = [
    ("llama_1b GaLore", "llama_1b", ["--optimizer", "galore"], None, 90),
    ("llama_7b GaLore 8-bit layer-wise, 24 GiB cap", "llama_7b",
     ["--optimizer", "galore8bit", "--layerwise", "--checkpointing"], 24.0, 180),
    ("llama_7b APOLLO-Mini, INT8 weights, 8-bit states, 24 GiB cap", "llama_7b",
     ["--optimizer", "apollo_mini", "--weights", "int8", "--state-bits", "8", "--layerwise", "--checkpointing"], 24.0,
     120),
]
#: The whole check's budget on a GPU, in seconds; a part that would start past it is recorded as not run.
BUDGET = 8 * 60


class Clock:
    """Seconds left of the check's budget: each part gets the smaller of its own limit and what is left."""

    def __init__(self, budget: float) -> None:
        self.end = time.perf_counter() + budget

    def limit(self, own: float) -> float:
        return min(own, self.end - time.perf_counter())


def run(cmd: list[str], limit: float, env: dict[str, str] | None = None) -> dict:
    """``cmd`` in a subprocess under ``limit`` seconds: its status, seconds and output tail."""
    if limit < 5:
        return {"status": "not run: the check's time budget was spent", "command": " ".join(cmd)}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"status": "timed out", "seconds": limit, "output": out[-4000:], "command": " ".join(cmd)}
    status = "passed" if done.returncode == 0 else f"failed (rc {done.returncode})"
    return {"status": status, "seconds": round(time.perf_counter() - start, 1),
            "output": (done.stdout + done.stderr)[-4000:], "command": " ".join(cmd)}


def skipped(why: str) -> dict:
    return {"status": "skipped", "reason": why}


def tests_part(limit: float) -> dict:
    """The CUDA tests: the compiled kernels against the reference, and the measured-peak memory test."""
    if not CUDA:
        return skipped("no CUDA device: tests/test_kernels.py's needs_cuda tests and test_memory's measured "
                       "peak need one (the CPU suite runs the Triton kernels in the interpreter instead)")
    return run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                "tests/test_kernels.py", "tests/test_memory.py"], limit)


def kernels_part(limit: float) -> dict:
    numel = str(2**26 if CUDA else 2**18)
    result = run([sys.executable, "bench/kernel_throughput.py", "--numel", numel, "--rounds", "7", "--check"], limit)
    if not CUDA:
        result["skipped"] = ("Triton and the CUDA C++ extension: no CUDA device (only the torch reference is "
                             "timed; the CPU suite checks the Triton kernels in the interpreter)")
    return result


def steps_part(limit: float, out: Path) -> dict:
    cmd = [sys.executable, "bench/interleaved.py", "--json", str(out / "interleaved.json")]
    if not CUDA:  # a reduced table: the full one takes about 20 minutes on 2 cores
        cmd += ["--presets", "galore,apollo", "--rounds", "3", "--stall-gap", "10"]
    result = run(cmd, limit)
    if not CUDA:
        result["reduced"] = "no CUDA device: galore and apollo only, 3 rounds, stall over a gap of 10"
    return result


def memory_part(clock: Clock) -> list[dict]:
    rows = []
    for name, config, args, cap, own in MEMORY_RUNS:
        limit = clock.limit(own if CUDA else 120)
        cmd = [sys.executable, "-m", "lowrank_optim.cli", "memory", "--config", f"configs/{config}.json", *args,
               "--batch", "1", "--seq", "256", "--json"]
        if not CUDA:
            row = run(cmd, limit)  # the estimate needs no GPU; the measured peak does
            row["measured"] = "skipped: --measure runs real training steps and needs a CUDA device"
        else:
            row = run(cmd + ["--measure"] + ([] if cap is None else ["--cap-gib", str(cap)]), limit)
        row["name"] = name
        try:
            row["figures"] = json.loads(row["output"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
        rows.append(row)
    return rows


def gib(x: float | None) -> str:
    return f"{x / 2**30:.2f}" if x else "-"


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "", f"torch {report['torch']}, {report['started']}", "",
             "| part | status | seconds |", "|---|---|---:|"]
    for part in ("tests", "kernels", "steps"):
        r = report[part]
        lines.append(f"| {part} | {r['status']}{': ' + r['reason'] if 'reason' in r else ''} | {r.get('seconds', '-')} |")
    for part in ("kernels", "steps"):
        r = report[part]
        if r.get("status") == "passed":
            lines += ["", f"## {part}", "", *[ln for ln in r["output"].splitlines() if ln.startswith("|")]]
        for key in ("skipped", "reduced"):
            if key in r:
                lines += ["", f"{key}: {r[key]}"]
    lines += ["", "## memory (GiB, batch 1 × 256 tokens)", "",
              "| run | status | estimated total | AdamW estimated | measured peak |", "|---|---|---:|---:|---:|"]
    for r in report["memory"]:
        fig = r.get("figures", {})
        ours, adamw = fig.get("ours", {}), fig.get("adamw", {})
        lines.append(f"| {r['name']} | {r['status']} | {gib(ours.get('total'))} | {gib(adamw.get('total'))} | "
                     f"{gib(ours.get('measured_peak')) if CUDA else 'skipped (no CUDA)'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="folder for gpu_check.json and gpu_check.md")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if CUDA else f"CPU ({platform.machine()}), no CUDA device"
    report = {"device": device, "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "cuda": CUDA}
    clock = Clock(BUDGET if CUDA else 4 * BUDGET)  # the CPU's reduced run is slower, and only tests the check
    report["tests"] = tests_part(clock.limit(120))
    report["kernels"] = kernels_part(clock.limit(60 if CUDA else 300))
    report["memory"] = memory_part(clock)
    report["steps"] = steps_part(clock.limit(150 if CUDA else 900), out=out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    bad = [p for p in ("tests", "kernels", "steps") if report[p]["status"] not in ("passed", "skipped")]
    bad += [r["name"] for r in report["memory"] if r["status"] != "passed"]
    if bad:
        print("failed or timed out: " + ", ".join(bad), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
