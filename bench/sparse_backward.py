"""Grass's sparse backward against the plain one: gradient memory and backward time on LLaMA shapes.

    OMP_NUM_THREADS=1 python bench/sparse_backward.py [--config configs/llama_60m.json] [--batch 2] [--seq 240]
        [--rounds 5] [--selection multinomial] [--json bench/results/sparse_backward.json]

One ``LlamaForCausalLM`` from the config (float32, seed 0) and ``lro.Grass`` at rank hidden/4 on every
linear layer but the head (the training commands' groups), with a refresh gap longer than the run, so every
measured backward is a step between refreshes. One step is taken first (it refreshes from the dense
gradient, as every weight's first step does), then, per round and interleaved, a plain backward (the
handle removed: every weight gets its m×n ``.grad``) and a sparse one (``lro.sparse_grad``: each projected
linear writes its r×n or m×r R). Reported, all from this one run:

* gradient bytes after the backward: the projected weights' (``.grad`` or R) and everything's;
* the backward's peak of live allocated bytes (activations' gradients included), counted by a
  ``TorchDispatchMode`` that records every tensor an op allocates and when it is freed (CPU-exact; the
  saved activations from the forward are not counted, being the same in both);
* how many tensors of a projected weight's shape (or its transpose) the backward allocates (the plain
  one: its weight gradients; the sparse one: none);
* the backward's wall time, median over the rounds (timed without the dispatch mode), and that of one
  linear layer of each projected shape alone at the same number of tokens (5x the rounds), which is the
  part the sparse backward changes (the head and the embeddings' gradients stay dense in both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowrank_optim as lro  # noqa: E402
from lowrank_optim.allocations import Allocations  # noqa: E402
from lowrank_optim.models import load_config  # noqa: E402
from lowrank_optim.train.loop import build_model  # noqa: E402


def grad_bytes(model, opt, projected: set) -> tuple[int, int]:
    """(projected weights' gradient bytes, all gradient bytes), dense .grad and R alike."""
    low = lro.optim.step.low_rank_grads(opt)
    proj = total = 0
    for p in model.parameters():
        g = low.get(p, p.grad)
        if g is None:
            continue
        size = g.numel() * g.element_size()
        total += size
        proj += size if p in projected else 0
    return proj, total


def one_backward(model, opt, tokens, measure: bool):
    loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
    log = Allocations() if measure else None
    start = time.perf_counter()
    if log is None:
        loss.backward()
    else:
        with log:
            loss.backward()
    return time.perf_counter() - start, log


def layer_times(config: dict, tokens: int, rank: int, rounds: int, selection: str) -> dict[str, dict[str, float]]:
    """Backward of one linear layer of each projected shape (out × in) alone, dense against sparse,
    interleaved, medians in ms: the part of the model's backward the sparse one changes."""
    h, f = config["hidden_size"], config["intermediate_size"]
    out = {}
    for o, i in ((h, h), (f, h), (h, f)):
        torch.manual_seed(0)
        layer = torch.nn.ModuleDict({"linear": torch.nn.Linear(i, o, bias=False)})
        opt = lro.Grass(lro.param_groups(layer, rank=rank, update_proj_gap=10**6,
                                         projector_options={"selection": selection}), lr=1e-3)
        x = torch.randn(tokens, i, requires_grad=True)
        dy = torch.randn(tokens, o)
        layer.linear(x).backward(dy)
        opt.step()
        opt.zero_grad()
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        for _ in range(rounds):
            for kind in times:
                handle = lro.sparse_grad(layer, opt) if kind == "sparse" else None
                y = layer.linear(x)
                start = time.perf_counter()
                y.backward(dy)
                times[kind].append(time.perf_counter() - start)
                opt.zero_grad()
                x.grad = None
                if handle is not None:
                    handle.remove()
        d, s_ = (statistics.median(times[k]) * 1e3 for k in ("dense", "sparse"))
        out[f"{o}x{i}"] = {"dense_ms": d, "sparse_ms": s_, "ratio": s_ / d,
                           "side": opt._projectors[layer.linear.weight].side}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "llama_60m.json"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--selection", default="multinomial")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    config = load_config(args.config)
    model = build_model(config, seed=0, dtype=torch.float32, device=torch.device("cpu"))
    rank = config["hidden_size"] // 4
    groups = lro.param_groups(model, rank=rank, update_proj_gap=10**6, projector_options={"selection": args.selection})
    opt = lro.Grass(groups, lr=1e-3)
    projected = {p for g in opt.param_groups for p in g["params"] if opt.is_low_rank(p, g)}
    shapes = {tuple(p.shape) for p in projected} | {tuple(p.shape)[::-1] for p in projected}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config["vocab_size"], (args.batch, args.seq + 1), generator=gen)
    handle = lro.sparse_grad(model, opt)
    one_backward(model, opt, tokens, False)
    opt.step()  # the first step refreshes every weight from its dense gradient
    opt.zero_grad()
    out: dict[str, dict] = {}
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for round_ in range(args.rounds + 1):
        for kind in ("dense", "sparse"):
            if kind == "dense":
                handle.remove()
            else:
                handle = lro.sparse_grad(model, opt)
            seconds, log = one_backward(model, opt, tokens, measure=round_ == 0)
            if log is not None:  # round 0 measures memory (slower under the dispatch mode) and warms up
                proj, total = grad_bytes(model, opt, projected)
                out[kind] = {"projected_grad_bytes": proj, "all_grad_bytes": total, "backward_peak_bytes": log.peak,
                             "full_size_tensors": sum(1 for t in log.shapes if t in shapes)}
            else:
                times[kind].append(seconds)
            opt.zero_grad()
    for kind in times:
        out[kind]["backward_s"] = statistics.median(times[kind])
    d, s = out["dense"], out["sparse"]
    out["ratios"] = {k: s[k] / d[k] for k in ("projected_grad_bytes", "all_grad_bytes", "backward_peak_bytes", "backward_s")}
    out["setup"] = {"config": Path(args.config).name, "batch": args.batch, "seq": args.seq, "rank": rank,
                    "selection": args.selection, "rounds": args.rounds, "threads": torch.get_num_threads(),
                    "projected_weights": len(projected)}
    out["layers"] = layer_times(config, args.batch * args.seq, rank, 5 * args.rounds, args.selection)
    mib = 2.0**20
    print(f"{out['setup']}")
    print(f"{'':28s}{'plain':>12s}{'sparse':>12s}{'sparse/plain':>14s}")
    for key, unit in (("projected_grad_bytes", mib), ("all_grad_bytes", mib), ("backward_peak_bytes", mib), ("backward_s", 1.0)):
        label = key.replace("_bytes", " (MiB)").replace("_s", " (s)")
        print(f"{label:28s}{d[key] / unit:12.2f}{s[key] / unit:12.2f}{out['ratios'][key]:14.3f}")
    print(f"{'m x n tensors allocated':28s}{d['full_size_tensors']:12d}{s['full_size_tensors']:12d}")
    for shape, row in out["layers"].items():
        print(f"{'one linear ' + shape + ' (ms)':28s}{row['dense_ms']:12.2f}{row['sparse_ms']:12.2f}{row['ratio']:14.3f}"
              f"   ({row['side']} side)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
