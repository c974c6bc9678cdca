"""Print a Markdown table of ratios from a pytest-benchmark JSON file.

    python bench/report.py bench/results/step_galore.json

Each row is one benchmark; its median is divided by the medians of the baselines measured in the
same run and group (torch AdamW, the reference package).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

BASELINES = ("adamw", "galore_torch")


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    by_group: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        by_group[b["group"]][b["extra_info"]["impl"]] = b["stats"]["median"]
    plain_adamw = {g.replace("refresh", "plain"): v.get("adamw") for g, v in by_group.items()}
    machine = data.get("machine_info", {})
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cores; "
          f"torch {data.get('extra', {}).get('torch', '')}".rstrip("; "))
    print()
    print("| group | implementation | median (ms) | vs AdamW plain step | vs galore-torch |")
    print("|---|---|---:|---:|---:|")
    for group, impls in by_group.items():
        adamw = impls.get("adamw") or plain_adamw.get(group)
        ref = impls.get("galore_torch")
        for impl, t in sorted(impls.items(), key=lambda kv: kv[1]):
            ra = f"{t / adamw:.2f}x" if adamw else "-"
            rr = f"{t / ref:.2f}x" if ref else "-"
            print(f"| {group} | {impl} | {t * 1e3:.1f} | {ra} | {rr} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/step_galore.json")
