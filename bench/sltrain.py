"""SLTrain's layer against a dense nn.Linear on LLaMA-60M shapes: forward+backward time and memory.

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 bench/sltrain.py [--tokens 2048] [--rank 128] [--density 0.03]

For each distinct linear shape of configs/llama_60m.json (q/k/v/o 512x512, gate/up 1376x512, down
512x1376), one block's worth of layers in a row, timed as the median of --repeats forward+backward
passes over --tokens tokens, for three layers:

- ``dense``: ``nn.Linear``;
- ``sltrain``: ``lro.nn.SparseLowRankLinear`` (CSR sparse products, no W formed);
- ``formed-W``: the same parameters with ``W = (alpha/r) B A + S`` formed by autograd (what the
  official C++ extension does in its forward and again in its backward, with dense ``dY^T X``).

Memory, summed over the block's layers of a shape: the bytes the backward keeps from the forward
beyond the input, parameters and buffers (saved tensors, through ``saved_tensors_hooks``; unique
storages), the parameters' gradients, and the largest weight-shaped (out x in) tensor any op creates
in the forward or backward (a TorchDispatchMode): the temporaries a formed W costs. On CUDA also
``max_memory_allocated`` over the pass (``--json``). Ratios are against ``dense`` in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from lowrank_optim.allocations import Allocations
from lowrank_optim.nn import SparseLowRankLinear

SHAPES = {"attn 512x512 (x4)": (512, 512, 4), "gate/up 1376x512 (x2)": (512, 1376, 2), "down 512x1376 (x1)": (1376, 512, 1)}


class FormedW(nn.Module):
    """The official algorithm in plain torch: W formed from the same parameters, dense autograd."""

    def __init__(self, layer: SparseLowRankLinear) -> None:
        super().__init__()
        self.layer = layer
        rows = torch.repeat_interleave(torch.arange(layer.out_features), torch.diff(layer.sparse_crow.long()))
        self.register_buffer("flat", rows * layer.in_features + layer.sparse_col.long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layer
        w = (lay.lora_B @ (lay.lora_A * lay.scale)).reshape(-1).scatter_add(0, self.flat, lay.sparse_value)
        return x @ w.reshape(lay.out_features, lay.in_features).T


def make_layer(kind: str, inp: int, out: int, rank: int, density: float, device: str) -> nn.Module:
    if kind == "dense":
        return nn.Linear(inp, out, bias=False, device=device)
    layer = SparseLowRankLinear(inp, out, rank, density, alpha=32.0, seed=0, device=device)
    nn.init.normal_(layer.lora_B, std=0.02)  # B starts at zero; trained values are not
    return layer if kind == "sltrain" else FormedW(layer).to(device)


def memory(layer: nn.Module, x: torch.Tensor, out: int) -> dict[str, int]:
    saved: dict[int, int] = {}
    # the input (the previous layer's output), the parameters and buffers exist anyway: count what the layer adds
    kept = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters(), *layer.buffers()]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.untyped_storage().data_ptr() not in kept:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    inp = x.shape[-1]
    with Allocations() as seen:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.backward(torch.ones_like(y))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in layer.parameters() if p.grad is not None)
    layer.zero_grad(set_to_none=True)
    return {"saved": sum(saved.values()), "grads": grads, "largest_temp": seen.largest_bytes({(out, inp), (inp, out), (out * inp,)})}


def timed(layers: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward+backward seconds of each layer, the layers taking turns (a shared machine's load
    falls on all of them alike); the first round is a warm-up."""
    times: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(repeats + 1):
        for kind, layer in layers.items():
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            layer(x).sum().backward()
            if x.is_cuda:
                torch.cuda.synchronize()
            times[kind].append(time.perf_counter() - start)
            layer.zero_grad(set_to_none=True)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def cuda_peak(layer: nn.Module, x: torch.Tensor) -> int | None:
    if not x.is_cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    layer(x).sum().backward()
    torch.cuda.synchronize()
    layer.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - base


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, (inp, out, count) in SHAPES.items():
        x = torch.randn(args.tokens, inp, device=args.device, requires_grad=True)
        layers = {}
        for kind in ("dense", "sltrain", "formed-W"):
            torch.manual_seed(0)
            layers[kind] = make_layer(kind, inp, out, args.rank, args.density, args.device)
        seconds = timed(layers, x, args.repeats)
        for kind, layer in layers.items():
            peak = cuda_peak(layer, x)
            rows.append({"shape": name, "kind": kind, "ms": 1e3 * count * seconds[kind],
                         **{k: count * v for k, v in memory(layer, x, out).items()},
                         "cuda_peak": None if peak is None else count * peak})
    return rows


def table(rows: list[dict]) -> str:
    dense = {r["shape"]: r for r in rows if r["kind"] == "dense"}
    lines = ["| shape | layer | fwd+bwd ms | vs dense | saved MiB | grads MiB | vs dense | W-sized temp MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = dense[r["shape"]]
        lines.append(f"| {r['shape']} | {r['kind']} | {r['ms']:.1f} | {r['ms'] / d['ms']:.2f}x | {r['saved'] / 2**20:.2f} "
                     f"| {r['grads'] / 2**20:.2f} | {r['grads'] / d['grads']:.2f}x | {r['largest_temp'] / 2**20:.2f} |")
    total = {k: sum(r["ms"] for r in rows if r["kind"] == k) for k in ("dense", "sltrain", "formed-W")}
    lines.append("")
    lines.append("one block: " + ", ".join(f"{k} {v:.1f} ms ({v / total['dense']:.2f}x)" for k, v in total.items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per pass (batch x sequence; default 2048)")
    p.add_argument("--rank", type=int, default=128, help="SLTrain rank (default 128, the paper's at 60M)")
    p.add_argument("--density", type=float, default=0.03, help="SLTrain density (default 0.03)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per layer (median; default 5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = run(args)
    print(json.dumps(rows) if args.json else table(rows))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.device}, {args.tokens} tokens, "
          f"rank {args.rank}, density {args.density}")


if __name__ == "__main__":
    main()
