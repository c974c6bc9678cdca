"""``lowrank-optim compare``: several optimizers trained on the same data from the same initial
weights, one table, ``compare.json`` and ``compare.png``.

Each entry of ``--optimizers`` is a name from :func:`lowrank_optim.train.available` with optional
overrides of its defaults, ``name:key=value:key=value`` (``galore:lr=0.02:rank=16``); the entry as
written labels its row. ``ref:PRESET[:key=value...]`` is the method's reference package at the settings
the preset resolves to (:mod:`lowrank_optim.train.references`). Each run writes
``DIR/<label>/metrics.jsonl`` and no checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .data import Corpus, local_corpus, stdlib_corpus
from .._console import stderr_line
from ..optim.options import option_value
from .errors import TrainError
from .checkpoint import umask
from .loop import RunResult, TrainArgs, check_args, distributed, pretrain, process_group
from .preempt import StopSignals
from .optimizers import available, build_optimizer, optimizer_settings
from .references import PREFIX

MIB = 2**20


def parse_optimizers(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"adamw,galore:lr=0.02"`` -> ``[("adamw", "adamw", {}), ("galore:lr=0.02", "galore", {"lr": 0.02})]``."""
    entries = [e.strip() for e in text.split(",")]
    if not any(entries):
        raise TrainError(f"--optimizers is empty; give a comma-separated list of: {', '.join(available())}")
    if not all(entries):
        raise TrainError(f"--optimizers {text!r} has an empty entry (two commas, or one at an end); name every entry")
    out, seen = [], set()
    for entry in entries:
        name, *pairs = entry.split(":")
        if name + ":" == PREFIX and pairs:  # ref:PRESET:key=value
            name = PREFIX + pairs.pop(0)
        options = {}
        for pair in pairs:
            key, eq, val = pair.partition("=")
            if not eq or not key:
                raise TrainError(f"--optimizers: {entry!r}: options are written name:key=value, got {pair!r}")
            key = key.replace("-", "_")
            if key in options:
                raise TrainError(f"--optimizers: {entry!r} sets {key} twice; give it once")
            options[key] = option_value(val)
        optimizer_settings(name, None, **options)  # unknown names fail here, listing the valid ones
        if entry in seen:
            raise TrainError(f"--optimizers names {entry!r} twice")
        seen.add(entry)
        out.append((entry, name, options))
    return out


def check_entries(config: Any, specs: list[tuple[str, str, dict[str, Any]]], options: dict[str, Any] | None = None) -> None:
    """Build every entry's optimizer on the config's model skeleton (meta device: no memory, no step),
    so that a misspelled option or a bad value fails before any entry trains, naming the entry."""
    from ..models import llama_skeleton, load_config

    cfg = load_config(config)
    skeleton = llama_skeleton(cfg)
    skeleton.config = cfg  # the width-dependent defaults read it
    for label, name, opts in specs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_optimizer(name, skeleton, **{**(options or {}), **opts})
        except (TrainError, TypeError, ValueError) as err:
            raise TrainError(f"--optimizers: entry {label!r}: {err}") from None


def table(results: list[RunResult], baseline: str = "adamw") -> str:
    """The results as a Markdown table; ``vs adamw`` is each held-out loss over AdamW's: the entry named
    ``baseline``, or else the first with options (``adamw:lr=0.002``), whose label the column then names."""
    ref = next((r for r in results if r.label == baseline), None) or next(
        (r for r in results if r.label.split(":")[0] == baseline), None)
    base = None if ref is None else ref.final_eval_loss
    head = ["optimizer", "lr", "rank", "held-out loss", f"vs {baseline if ref is None else ref.label}", "perplexity", "tokens/s",
            "optimizer state (MiB)", "peak memory (MiB)"]
    rows = []
    for r in results:
        rank = r.settings.get("rank")
        rows.append([
            r.label,
            f"{r.settings.get('lr'):g}",
            "-" if rank is None else str(rank),
            f"{r.final_eval_loss:.4f}",
            f"{r.final_eval_loss / base:.3f}" if base else "-",
            f"{r.final_perplexity:.3f}",
            f"{r.tokens_per_s:,.0f}",
            f"{r.state_bytes / MIB:.3f}",
            "n/a" if r.peak_memory is None else f"{r.peak_memory / MIB:.1f}",
        ])
    right = {1, 2, 3, 4, 5, 6, 7, 8}
    widths = [max(len(head[i]), *(len(row[i]) for row in rows)) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(results: list[RunResult], path: Path, title: str) -> bool:
    """Training loss (moving average) and held-out loss per optimizer; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn('compare.png not written: matplotlib is missing (pip install "lowrank-optim[train]")', stacklevel=2)
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps_max = max((r.curve[-1][0] for r in results if r.curve), default=1)
    window = max(1, steps_max // 40)
    top = []
    for r in results:
        if not r.curve:
            continue
        steps = [s for s, _ in r.curve]
        smooth = _smooth([v for _, v in r.curve], window)
        left.plot(steps, smooth, label=r.label, linewidth=1.2)
        tail = [v for s, v in zip(steps, smooth) if s >= steps_max * 0.15]
        if tail:
            top.append(max(tail))
        right.plot([s for s, _ in r.evals], [v for _, v in r.evals], marker="o", markersize=3, label=r.label)
    if top:
        lows = [min(_smooth([v for _, v in r.curve], window)) for r in results if r.curve]
        left.set_ylim(min(lows) - 0.05 * (max(top) - min(lows)), max(top))
    left.set(title=f"training loss (moving average of {window} steps)", xlabel="step", ylabel="loss (nats/token)")
    evals = [v for r in results for s, v in r.evals if s >= steps_max * 0.15]
    if evals:
        span = max(evals) - min(evals)
        right.set_ylim(min(evals) - 0.05 * span - 1e-3, max(evals) + 0.05 * span + 1e-3)
    right.set(title="held-out loss", xlabel="step", ylabel="loss (nats/token)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def compare(base: TrainArgs, optimizers: str | list[tuple[str, str, dict[str, Any]]], out: str | Path,
            log: Callable[[str], None] | None = None) -> list[RunResult]:
    """Train each optimizer from ``base`` (same data, seed, schedule and sizes), print the table,
    and write ``out/compare.json`` and ``out/compare.png``."""
    specs = parse_optimizers(optimizers) if isinstance(optimizers, str) else optimizers
    check_entries(base.config, specs, base.options)
    out = Path(out)
    runs = [(label, replace(base, optimizer=name, options={**base.options, **options}, out=str(out / _dirname(label)),
                            save=False, resume=False, overwrite=True, label=label)) for label, name, options in specs]
    for label, args in runs:  # the flags each entry runs with (a ref: entry and --layerwise), before any trains
        try:
            check_args(args)
        except TrainError as err:
            raise TrainError(f"--optimizers: entry {label!r}: {err}") from None
    say = log if log is not None else stderr_line
    rank = distributed()[0]
    corpus: Corpus | None = None
    results = []
    with process_group():
        if base.data != "c4":
            if base.data is None:
                corpus = stdlib_corpus()
            else:
                corpus = local_corpus(base.data, base.tokenizer)
        for _, args in runs:
            results.append(pretrain(args, corpus=corpus, log=say))
    if rank != 0:
        return results
    with StopSignals() as stop, stop.saving():  # a preemption now waits for complete files, then stops
        _write_results(results, base, specs, out, say)
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        say(f"compare: {name} arrived while the results were written; they are complete, stopping")
        raise SystemExit(128 + stop.signum)
    return results


def _write_results(results: list[RunResult], base: TrainArgs, specs: list[tuple[str, str, dict[str, Any]]],
                   out: Path, say: Callable[[str], None]) -> None:
    """The table on stdout, ``compare.json`` (written whole or not at all) and ``compare.png``."""
    text = table(results)
    print(text)
    cfg = base.config if isinstance(base.config, str) else "config"
    per_run = ("optimizer", "options", "out", "resume", "overwrite", "save", "label", "progress", "stop_at")
    settings = {k: v for k, v in asdict(base).items() if k not in per_run}
    settings["optimizers"] = [label for label, _, _ in specs]  # each run's own optimizer and options: "runs"
    doc = {"settings": settings, "table": text, "runs": []}
    for r in results:
        d = r.to_dict()
        summary = {k: d.pop(k) for k in ("final_eval_loss", "final_perplexity", "tokens_per_s", "state_bytes", "peak_memory", "train_seconds", "steps")}
        doc["runs"].append({**d, "summary": summary})
    _write_atomic(out / "compare.json", json.dumps(doc, indent=1, default=str) + "\n")
    title = f"{Path(cfg).stem if isinstance(cfg, str) else cfg}: {base.max_steps} steps, batch {base.batch_size}x{base.seq_len}"
    if base.grad_accum > 1:
        title += f"x{base.grad_accum}"
    if plot(results, out / "compare.png", title):
        say(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    else:
        say(f"wrote {out / 'compare.json'}")


def _write_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)`` through a temporary file in the same folder and ``os.replace``: a reader (or
    a run killed midway) sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _dirname(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-=" else "_" for c in label)


__all__ = ["check_entries", "compare", "parse_optimizers", "plot", "table"]
