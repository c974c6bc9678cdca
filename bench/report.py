"""Print Markdown tables of ratios from a pytest-benchmark JSON file.

    python bench/report.py bench/results/step_galore.json
    python bench/report.py bench/results/refresh_cost.json

Each row is one benchmark; its median is divided by the medians of the baselines measured in the
same run and group:

* optimizer steps (bench/test_step_galore.py, bench/test_step_presets.py): torch AdamW (its plain
  step, in the same group or the file's only AdamW group) and the group's reference package (any
  implementation other than ``adamw`` and ``lowrank_optim``);
* projector refreshes (bench/test_refresh_cost.py, ``extra_info["kind"] == "refresh_cost"``): the
  full SVD (``svd``), reported as a speedup (svd median / projector median).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

OURS = "lowrank_optim"
REFRESH_KIND = "refresh_cost"
REFRESH_BASELINE = "svd"


def step_table(by_group: dict[str, dict[str, float]]) -> None:
    adamw_groups = [v["adamw"] for v in by_group.values() if "adamw" in v]
    only_adamw = adamw_groups[0] if len(adamw_groups) == 1 else None
    print("| group | implementation | median (ms) | vs AdamW step | vs reference package |")
    print("|---|---|---:|---:|---:|")
    for group, impls in by_group.items():
        adamw = impls.get("adamw") or by_group.get(group.replace("refresh", "plain"), {}).get("adamw") or only_adamw
        refs = [t for impl, t in impls.items() if impl not in ("adamw", OURS)]
        ref = refs[0] if len(refs) == 1 else None
        for impl, t in sorted(impls.items(), key=lambda kv: kv[1]):
            ra = f"{t / adamw:.2f}x" if adamw else "-"
            rr = f"{t / ref:.2f}x" if ref else "-"
            print(f"| {group} | {impl} | {t * 1e3:.1f} | {ra} | {rr} |")


def refresh_table(by_group: dict[str, dict[str, float]]) -> None:
    print(f"| group | projector | median (ms) | speedup vs {REFRESH_BASELINE} |")
    print("|---|---|---:|---:|")
    for group, impls in by_group.items():
        base = impls.get(REFRESH_BASELINE)
        for impl, t in sorted(impls.items(), key=lambda kv: kv[1]):
            speedup = f"{base / t:.1f}x" if base else "-"
            print(f"| {group} | {impl} | {t * 1e3:.2f} | {speedup} |")


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    steps: dict[str, dict[str, float]] = defaultdict(dict)
    refreshes: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        table = refreshes if info.get("kind") == REFRESH_KIND else steps
        table[b["group"]][info["impl"]] = b["stats"]["median"]
    machine = data.get("machine_info", {})
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cores, "
          f"torch {machine.get('torch', '?')}, device {machine.get('device', '?')}")
    if steps:
        print()
        step_table(steps)
    if refreshes:
        print()
        refresh_table(refreshes)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/step_galore.json")
