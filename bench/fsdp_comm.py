"""What the low-rank optimizers keep and send under FSDP2: 2 CPU processes (gloo) against one process.

    python bench/fsdp_comm.py [--config configs/llama_tiny.json] [--rank 32]

For every projector built for row shards (``lro.distributed.SHARDED_PROJECTORS``: svd, rsvd, random;
presets GaLoreAdamW, GaLoreAdamW(projector="rsvd"), APOLLO, SUMO) and for ``torch.optim.AdamW``, each
of 2 workers trains a transformers ``LlamaForCausalLM`` built from the config, fully_shard'ed per
decoder layer and at the root, for 3 steps with ``update_proj_gap=2`` (steps 1 and 3 refresh the
subspace, step 2 does not), on its half of a global batch. It measures:

* per-rank optimizer-state bytes (local tensors of ``opt.state``, the nested ``"projector"`` dicts
  included, ``.to_local()`` for DTensors) against the same optimizer's state on the unsharded model in
  one process (the ratio; 0.5 is a perfect split over 2 ranks);
* the bytes the optimizer's own collectives count in ``lro.distributed.COMM_BYTES`` (by purpose:
  project, refresh, norms, rule) for each step: "bytes/step" is step 2 (no refresh), "bytes/refresh"
  is step 3 minus step 2 (the extra a refresh costs; step 1 is reported too, in the JSON);
* the naive baseline: gathering the full gradient of every projected 2-D weight, Σ m·n·4·(w−1)/w
  bytes per rank.

COMM_BYTES counts what each rank hands to a collective: the tensor's size for an all-reduce (a ring
all-reduce puts about 2·(w−1)/w of that on the wire), the (w−1) other ranks' pieces for an
all-gather. FSDP's own parameter all-gathers and gradient reduce-scatters are not in it (they are the
same for every optimizer). Results go to bench/results/fsdp_comm.json, keyed by config and rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lowrank_optim as lro  # noqa: E402
from lowrank_optim import distributed as lro_dist  # noqa: E402

WORLD = 2
STEPS = 3
GAP = 2

# name -> (optimizer class or None for torch AdamW, extra group keys, projector)
CASES = {
    "adamw (baseline)": (None, {}, "-"),
    "galore (svd)": ("GaLoreAdamW", {}, "svd"),
    "galore (rsvd)": ("GaLoreAdamW", {"projector": "rsvd"}, "rsvd"),
    "apollo (random)": ("APOLLO", {}, "random"),
    "sumo (rsvd)": ("SUMO", {}, "rsvd"),
}


def build_model(config_path: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_json_file(config_path)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_opt(model, name: str, rank: int):
    cls, keys, _ = CASES[name]
    if cls is None:
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lro.RankFallbackWarning)
        groups = lro.param_groups(model, rank=rank, update_proj_gap=GAP, **keys)
        return getattr(lro, cls)(groups, lr=1e-3, weight_decay=0.01)


def projected_weights(model, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """The 2-D weights param_groups puts in the low-rank group (what a low-rank preset projects)."""
    groups = lro.param_groups(model, rank=rank)
    low = [g for g in groups if g.get("rank") is not None]
    return [(n, tuple(p.shape)) for n, p in (low[0]["params"] if low else []) if p.dim() == 2]


def projected_params(model, name: str, rank: int) -> list[torch.Tensor]:
    """The parameters the low-rank presets project (none for the AdamW baseline)."""
    if CASES[name][0] is None:
        return []
    return [p for g in lro.param_groups(model, rank=rank) if g.get("rank") is not None for _, p in g["params"]]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(opt, params=None) -> int:
    """Bytes of the tensors in ``opt.state`` (nested "projector" dicts included), local pieces only."""
    ids = None if params is None else {id(p) for p in params}
    total = 0
    for p, state in opt.state.items():
        if ids is not None and id(p) not in ids:
            continue
        values = list(state.values())
        values += list(state.get("projector", {}).values()) if isinstance(state.get("projector"), dict) else []
        for v in values:
            if isinstance(v, torch.Tensor):
                t = _local(v)
                total += t.numel() * t.element_size()
    return total


def batches(vocab: int, seq: int, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(STEPS)]


def one_step(model, opt, tokens) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
    loss.backward()
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def shard_model(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _worker(rank: int, world: int, init: str, out: str, args: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        report = {}
        per = args["batch"] // world
        for name in CASES:
            model = shard_model(build_model(args["config"]))
            opt = build_opt(model, name, args["rank"])
            low = projected_params(model, name, args["rank"])
            data = batches(model.config.vocab_size, args["seq"], args["batch"])
            steps = []
            for tokens in data:
                lro_dist.COMM_BYTES.clear()
                dist.barrier()
                opt_s = one_step(model, opt, tokens[rank * per:(rank + 1) * per])
                steps.append({"bytes": dict(lro_dist.COMM_BYTES), "total": sum(lro_dist.COMM_BYTES.values()),
                              "opt_step_s": round(opt_s, 4)})
            report[name] = {"state_bytes": state_bytes(opt), "state_bytes_projected": state_bytes(opt, low),
                            "steps": steps}
            del model, opt
        gathered = [None] * world
        dist.all_gather_object(gathered, report)
        if rank == 0:
            Path(out, "ranks.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def single_process(args: dict) -> dict:
    """State bytes of each optimizer on the unsharded model after one step, one process, the whole batch."""
    out = {}
    for name in CASES:
        model = build_model(args["config"])
        opt = build_opt(model, name, args["rank"])
        low = projected_params(model, name, args["rank"])
        lro_dist.COMM_BYTES.clear()
        # one step allocates every state tensor at its final size (later steps only refresh or rotate)
        one_step(model, opt, batches(model.config.vocab_size, args["seq"], args["batch"])[0])
        out[name] = {"state_bytes": state_bytes(opt), "state_bytes_projected": state_bytes(opt, low),
                     "comm_bytes": sum(lro_dist.COMM_BYTES.values())}
        del model, opt
    return out


def fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "llama_tiny.json"))
    ap.add_argument("--rank", type=int, default=None, help="projection rank (default: 32 for hidden ≤ 256, else 128)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="global batch (split over the 2 ranks)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fsdp_comm.json"))
    ns = ap.parse_args(argv)
    config = json.loads(Path(ns.config).read_text())
    rank = ns.rank if ns.rank is not None else (32 if config["hidden_size"] <= 256 else 128)
    args = {"config": ns.config, "rank": rank, "seq": ns.seq, "batch": ns.batch}
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "bench/fsdp_comm.py",
                                      *(sys.argv[1:] if argv is None else argv)])

    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(WORLD, f"file://{Path(tmp, 'rendezvous')}", tmp, args), nprocs=WORLD, join=True)
        ranks = json.loads(Path(tmp, "ranks.json").read_text())
    t_sharded = time.perf_counter() - t0
    torch.set_num_threads(2)
    single = single_process(args)
    wall = time.perf_counter() - t0

    shapes = projected_weights(build_model(ns.config), rank)
    gather = sum(m * n * 4 * (WORLD - 1) / WORLD for _, (m, n) in shapes)

    rows = []
    for name, (_, _, projector) in CASES.items():
        per_rank = [r[name] for r in ranks]
        state = max(r["state_bytes"] for r in per_rank)
        steps = [[s["total"] for s in r["steps"]] for r in per_rank]
        no_refresh = max(s[1] for s in steps)
        refresh = max(s[2] - s[1] for s in steps)
        rows.append({
            "case": name,
            "projector": projector,
            "state_bytes_per_rank": [r["state_bytes"] for r in per_rank],
            "state_bytes_projected_per_rank": [r["state_bytes_projected"] for r in per_rank],
            "state_bytes_single": single[name]["state_bytes"],
            "state_bytes_projected_single": single[name]["state_bytes_projected"],
            "ratio_vs_single": state / single[name]["state_bytes"],
            "bytes_per_step_no_refresh": no_refresh,
            "bytes_per_refresh": refresh,
            "step_bytes_by_purpose": [[s["bytes"] for s in r["steps"]] for r in per_rank],
            "step_bytes_total": steps,
            "opt_step_seconds": [[s["opt_step_s"] for s in r["steps"]] for r in per_rank],
            "full_gradient_gather_bytes": gather if projector != "-" else None,
        })

    name = Path(ns.config).stem
    print(f"\n{name}: rank {rank}, {WORLD} ranks (FSDP2, gloo, CPU), update_proj_gap={GAP}, "
          f"{len(shapes)} projected weights; sharded {t_sharded:.0f} s, total {wall:.0f} s\n")
    print("| projector / preset | per-rank state bytes | ratio vs 1 process | bytes/step (no refresh) "
          "| bytes/refresh | full-gradient gather bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = r["case"]
        g = "-" if r["full_gradient_gather_bytes"] is None else fmt(r["full_gradient_gather_bytes"])
        print(f"| {label} | {fmt(max(r['state_bytes_per_rank']))} | {r['ratio_vs_single']:.3f} | "
              f"{fmt(r['bytes_per_step_no_refresh'])} | {fmt(r['bytes_per_refresh'])} | {g} |")
    print("\nbytes: per rank, the larger of the 2 ranks; bytes/refresh = step 3 (refresh) − step 2 (none).")

    result = {
        "command": command,
        "config": os.path.relpath(Path(ns.config).resolve(), ROOT),
        "rank": rank,
        "world": WORLD,
        "update_proj_gap": GAP,
        "seq": ns.seq,
        "global_batch": ns.batch,
        "torch": torch.__version__,
        "device": "cpu (gloo)",
        "projected_weights": [[n, list(s)] for n, s in shapes],
        "wall_seconds": round(wall, 1),
        "rows": rows,
    }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    everything = json.loads(out.read_text()) if out.exists() else {}
    everything[f"{name}/rank{rank}"] = result
    out.write_text(json.dumps(everything, indent=1) + "\n")
    print(f"wrote {os.path.relpath(out, ROOT)}")
    return result


if __name__ == "__main__":
    main()
