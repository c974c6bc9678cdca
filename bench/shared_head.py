"""GaLore+'s cross-head basis (``shared_head``) against GaLore's per-weight SVD on LLaMA-60M's attention weights:
the refresh's cost and the share of the gradient the basis keeps.

    OMP_NUM_THREADS=1 python bench/shared_head.py [--config configs/llama_60m.json] [--checkpoint PATH]
        [--ranks 128,64,32] [--batch 4] [--rounds 7] [--clock cpu]

One forward and backward of the config's LLaMA (freshly initialized, seed 0, or the weights of a
``pretrain`` checkpoint) on ``--batch`` × 128 held-out tokens of the offline corpus gives real q/k/v/o
gradients (LLaMA-60M: 512×512, 8 heads of 64). For every projector and rank: the median over ``--rounds``
of one ``update(G)`` on layer 0's q_proj, and the captured energy ‖project(G)‖² / ‖G‖² (every basis here
is orthonormal) averaged over all attention weights, beside ``svd`` at the same rank. ``--clock cpu``
times this process's CPU time (less disturbed on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import lowrank_optim as lro

ROOT = Path(__file__).resolve().parent.parent
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def cases(ranks: list[int], head_dim: int) -> list[tuple[str, int, dict]]:
    out = []
    for r in ranks:
        out += [("svd", r, {}), ("rsvd", r, {})]
        if r <= head_dim:
            out += [("shared_head", r, {}), ("shared_head", r, {"head": "largest"})]
    return out


def attention_gradients(config: str, checkpoint: str | None, batch: int) -> tuple[dict[str, torch.Tensor], int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank_optim.train.data import (
        stdlib_corpus,  # the byte-level standard-library corpus
    )

    cfg = LlamaConfig(**json.loads(Path(config).read_text()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    tokens = stdlib_corpus().heldout_sequences(128, batch * 128)[:batch].long()
    model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if n.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj")}, cfg.hidden_size // cfg.num_attention_heads


def projector(name: str, rank: int, opts: dict, weight: str, head_dim: int):
    if name != "shared_head":
        return lro.projectors.make(name, rank)
    axis = "cols" if "o_proj" in weight else "rows"
    return lro.projectors.make(name, rank, head_dim=head_dim, head_axis=axis, **opts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "llama_60m.json"))
    ap.add_argument("--checkpoint", default=None, help="a pretrain checkpoint.pt whose weights to take")
    ap.add_argument("--ranks", default="128,64,32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = ap.parse_args()
    clock = CLOCKS[args.clock]
    grads, head_dim = attention_gradients(args.config, args.checkpoint, args.batch)
    q = grads["model.layers.0.self_attn.q_proj.weight"]
    print(f"torch threads: {torch.get_num_threads()}; {len(grads)} attention gradients of {tuple(q.shape)}, "
          f"heads of {head_dim}")
    print(f"| projector | rank | refresh (ms) | vs svd r={args.ranks.split(',')[0]} | captured energy | vs svd, same rank |")
    print("|---|---:|---:|---:|---:|---:|")
    base_ms, energy_svd = None, {}
    for name, rank, opts in cases([int(r) for r in args.ranks.split(",")], head_dim):
        times = []
        for _ in range(args.rounds):
            p = projector(name, rank, opts, "q_proj", head_dim)
            start = clock()
            p.update(q)
            times.append((clock() - start) * 1e3)
        ms = statistics.median(times)
        base_ms = base_ms or ms
        shares = []
        for w, g in grads.items():
            p = projector(name, rank, opts, w, head_dim)
            p.update(g)
            shares.append(float(p.project(g).norm() ** 2 / g.norm() ** 2))
        energy = statistics.mean(shares)
        energy_svd.setdefault(rank, energy) if name == "svd" else None
        label = name + ("" if not opts else f" ({', '.join(f'{k}={v!r}' for k, v in opts.items())})")
        print(f"| {label} | {rank} | {ms:.2f} | {base_ms / ms:.1f}x | {energy:.3f} | {energy / energy_svd[rank]:.3f} |")


if __name__ == "__main__":
    main()
