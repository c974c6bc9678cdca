"""What the checkpoint digests cost: SHA-256 of every tensor, against the save and load themselves.

    python bench/checkpoint_cost.py [--rounds 5] [--model llama_60m]

A GaLoreAdamW checkpoint of the model's shapes (weights, and the optimizer's state after one step:
the plain parameters' AdamW moments, the low-rank moments and bases, rank hidden/4), as the training
command writes it. Each round, interleaved: ``checkpoint.save_atomic`` of it without a digest, the
digest (:func:`lowrank_optim.train.integrity.with_digest`), ``torch.load(weights_only=True)`` of the
file, and the check on resume (:func:`lowrank_optim.train.integrity.verify_tree`). Medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import lowrank_optim as lro
from lowrank_optim.train import checkpoint, integrity
from shapes import make_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="llama_60m")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    params, projected = make_params(args.model)
    hidden = min(p.shape[-1] for n, p in params if n in projected)
    opt = lro.GaLoreAdamW([{"params": [p for n, p in params if n in projected], "rank": hidden // 4},
                           {"params": [p for n, p in params if n not in projected]}], lr=1e-3)
    opt.step()
    obj = {"model": {n: p.detach() for n, p in params}, "optimizer": opt.state_dict(), "step": 1}
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(obj))
    times: dict[str, list[float]] = {"save": [], "digest": [], "load": [], "verify": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        signed = integrity.with_digest(obj)
        for _ in range(args.rounds):
            t = time.perf_counter()
            checkpoint.save_atomic(obj, path)
            times["save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            signed = integrity.with_digest(obj)
            times["digest"].append(time.perf_counter() - t)
            checkpoint.save_atomic(signed, path)
            t = time.perf_counter()
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            times["load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            integrity.verify_tree(loaded, path)
            times["verify"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} GaLoreAdamW checkpoint, {nbytes / 2**20:.0f} MiB of tensors, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (medians)")
    print()
    print("| save (s) | digest at save (s) | load (s) | check on resume (s) | digest / save | check / load |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {med['save']:.2f} | {med['digest']:.2f} | {med['load']:.2f} | {med['verify']:.2f} | "
          f"{med['digest'] / med['save']:.0%} | {med['verify'] / med['load']:.0%} |")


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


if __name__ == "__main__":
    main()
