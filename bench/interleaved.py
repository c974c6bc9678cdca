"""Step times of every preset, its reference package and torch AdamW, measured interleaved, in one run.

    python bench/interleaved.py                    # plain steps, refresh work and stalls (LLaMA-60M shapes)
    python bench/interleaved.py --only plain       # or refresh, or stall
    python bench/interleaved.py --stall-gap 50     # a shorter stall run (default: the papers' gap, 200)

* **plain**: one step without a refresh, every preset against its reference package (galore-torch,
  apollo-torch, fira) and ``torch.optim.AdamW(foreach=True)``;
* **refresh**: the work of renewing all 56 subspaces, a step that refreshes every weight minus a plain
  step, for GaLoreAdamW at its defaults (the short side's Gram matrix and eigh) and galore-torch (SVD),
  on the bench's Gaussian gradients and on a real backward pass's (``shapes.real_gradients``: their
  steep spectra send our refresh to float64, see ``top_singular_pairs``);
* **stall**: two gaps of steps at ``update_proj_gap`` (after the first step, which builds every subspace
  in both packages), on real gradients where transformers is installed, slowest step / median step:
  GaLoreAdamW's staggered refresh against galore-torch's all-at-once one; each implementation's steps in
  a row (not interleaved, see :func:`stall`).

The pytest-benchmark suites time one implementation after another; on a shared or throttling machine
that drift shows up as a ratio. Here each round steps every implementation once, in rotating order, so
drift hits all of them alike; the tables give medians, their ratios and (plain steps) the median of the
per-round ratios to AdamW, which divides out drift between rounds. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from shapes import llama_shapes, projected_names, real_gradients
from test_step_presets import DEVICE, MODEL, NEVER, PRESETS, _split, build_ours, build_reference


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(opt) -> float:
    _sync()
    t = time.perf_counter()
    opt.step()
    _sync()
    return time.perf_counter() - t


def measure(optimizers: dict[str, torch.optim.Optimizer], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    for opt in optimizers.values():  # state allocation and the first refresh stay out of the timing
        for _ in range(warmup):
            opt.step()
    names = list(optimizers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(timed(optimizers[n]))
    return times


def reference_or_none(preset: str, gap: int = NEVER):
    try:
        return build_reference(preset, gap)
    except BaseException:  # noqa: BLE001 - pytest.skip when there is no reference package
        return None


def ms(x: float | None) -> str:
    return f"{x:.1f}" if x else "-"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def paired(times: dict[str, list[float]], a: str, b: str) -> float | None:
    """The median over rounds of a's step / b's step in the same round: the two ran within one round, so
    drift over the run (another job on the machine, a throttled core) divides out, where the ratio of two
    medians keeps whatever moved between the rounds."""
    if a not in times or b not in times:
        return None
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def plain(presets: list[str], rounds: int) -> list[dict]:
    print("| preset | lowrank-optim (ms) | reference (ms) | AdamW (ms) | vs reference | vs AdamW | vs AdamW, paired |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for preset in presets:
        opts = {"ours": build_ours(preset)}
        ref = reference_or_none(preset)
        if ref is not None:
            opts["reference"] = ref
        params, _, _ = _split()
        opts["adamw"] = torch.optim.AdamW([p for _, p in params], lr=1e-3, foreach=True)
        slow = preset in ("galore8bit", "qgalore") and DEVICE == "cpu"
        times = measure(opts, 5 if slow else rounds)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        pair = paired(times, "ours", "adamw")
        row = {"preset": preset, **{f"{k}_ms": v for k, v in med.items()}, "ours_over_adamw_paired": pair}
        rows.append(row)
        print(f"| {preset} | {ms(med['ours'])} | {ms(med.get('reference'))} | {ms(med['adamw'])} | "
              f"{ratio(med['ours'], med.get('reference'))} | {ratio(med['ours'], med['adamw'])} | {pair:.2f}x |",
              flush=True)
    return rows


def use_real_gradients(optimizers) -> bool:
    """Give every optimizer's projected weights (its first group, in ``llama_shapes``' order) the gradients of
    a real backward pass (``shapes.real_gradients``); False, changing nothing, without transformers."""
    grads = real_gradients(MODEL)
    if grads is None:
        return False
    projected = projected_names(MODEL)
    names = [n for n, _ in llama_shapes(MODEL) if n in projected]
    for opt in optimizers:  # a copy each, as make_params gives: no optimizer sees another's gradient tensor
        for p, n in zip(opt.param_groups[0]["params"], names, strict=True):
            p.grad = grads[n].to(device=p.device, dtype=p.dtype, copy=True)
    return True


def refresh(rounds: int, real: bool = False) -> dict | None:
    """Refresh work on the bench's Gaussian gradients or (``real``) on a real backward pass's."""
    opts = {"ours refresh": build_ours("galore", gap=1, stagger=False), "ours plain": build_ours("galore"),
            "galore-torch refresh": reference_or_none("galore", gap=1),
            "galore-torch plain": reference_or_none("galore")}
    opts = {k: v for k, v in opts.items() if v is not None}
    label = "Gaussian gradients"
    if real:
        if not use_real_gradients(opts.values()):
            print("(no refresh on real gradients: transformers is not installed)")
            return None
        label = "real gradients"
    med = {k: statistics.median(v) * 1e3 for k, v in measure(opts, rounds).items()}
    ours = med["ours refresh"] - med["ours plain"]
    theirs = med.get("galore-torch refresh", 0) - med.get("galore-torch plain", 0) or None
    print(f"| refresh of every subspace (GaLore, 56 weights, {label}) | lowrank-optim (ms) | galore-torch (ms) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| refresh step | {ms(med['ours refresh'])} | {ms(med.get('galore-torch refresh'))} | "
          f"{ratio(med['ours refresh'], med.get('galore-torch refresh'))} |")
    print(f"| refresh work (refresh step − plain step) | {ms(ours)} | {ms(theirs)} | {ratio(ours, theirs)} |", flush=True)
    return {"ours_refresh_work_ms": ours, "galore_torch_refresh_work_ms": theirs, **{k + " ms": v for k, v in med.items()}}


def stall(gap: int) -> dict:
    opts = {"lowrank-optim": build_ours("galore", gap=gap), "galore-torch": reference_or_none("galore", gap=gap)}
    opts = {k: v for k, v in opts.items() if v is not None}
    # a refresh's cost is a real gradient's (float64 where its spectrum is steep), not a Gaussian one's
    real = use_real_gradients(opts.values())
    # Not interleaved: a stall is one implementation's own slowest step over its median, and stepping the two
    # in turn lets one's refresh (galore-torch frees and re-allocates SVD workspaces) slow the other's next
    # steps (seen: steps 2-6 after galore-torch's refresh at 1 and 201 were 2x slower in both).
    times = {name: measure({name: opt}, 2 * gap, warmup=1)[name] for name, opt in opts.items()}
    # The schedule repeats every gap, so a step and the one a gap later do the same work: the slower of each
    # such pair's faster one ("slowest phase") is a stall that recurs, where one slow step alone may be
    # another job's noise. The step numbers say which: galore-torch refreshes at multiples of the gap.
    print(f"| two gaps of {gap} steps (GaLore, {'real' if real else 'Gaussian'} gradients) | median step (ms) | slowest step (ms) | slowest / median "
          "| slowest phase / median | slowest steps (number: ms) |")
    print("|---|---:|---:|---:|---:|---|")
    out = {}
    for name, t in times.items():
        med, worst = statistics.median(t) * 1e3, max(t) * 1e3
        phase = max(min(t[i], t[i + gap]) for i in range(gap)) * 1e3
        top = sorted(range(len(t)), key=lambda i: -t[i])[:3]
        out[name] = {"median_ms": med, "slowest_ms": worst, "slowest_over_median": worst / med,
                     "slowest_phase_over_median": phase / med, "steps_ms": [x * 1e3 for x in t]}
        slow = ", ".join(f"{i + 2}: {t[i] * 1e3:.0f}" for i in top)  # step 1 was the warm-up
        print(f"| {name} | {med:.1f} | {worst:.1f} | {worst / med:.2f} | {phase / med:.2f} | {slow} |", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("plain", "refresh", "stall"), action="append")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--stall-gap", type=int, default=200)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    parts = args.only or ["plain", "refresh", "stall"]
    print(f"{MODEL} shapes, device {DEVICE}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    figures: dict = {"model": MODEL, "device": DEVICE, "threads": torch.get_num_threads()}
    if "plain" in parts:
        figures["plain"] = plain(args.presets.split(","), args.rounds)
        print()
    if "refresh" in parts:
        figures["refresh"] = refresh(max(3, args.rounds // 3))
        print()
        figures["refresh_real"] = refresh(max(3, args.rounds // 3), real=True)
        print()
    if "stall" in parts:
        figures["stall"] = stall(args.stall_gap)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
