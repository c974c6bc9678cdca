"""How large is each optimizer's step, parameter by parameter? The update RMS against AdamW's.

For each entry of ``--optimizers`` (as ``bench/nanogpt_lr.py`` or ``lowrank-optim compare`` build them),
train the model from the same initial weights on the same batches for ``--steps`` steps (the runs'
warmup and cosine, clipping at 1.0) and record, per parameter and step, RMS(ΔW) / lr_t: the size of
the step in units of the learning rate (weight decay included, lr·wd·W, which is 1e-5 of it here).
Parameters are pooled into kinds (``projected`` 2-D weights, ``embed/head``, ``1-D`` norms and biases),
each kind's RMS taken as √(mean over its parameters and steps of RMS²), and printed with its ratio to
the first entry's (AdamW's)::

    python3 bench/update_rms.py --model nanogpt --lr 0.004 --optimizers adamw,galore:match_adamw_rms=True
    python3 bench/update_rms.py --model llama_tiny --lr 0.002 --optimizers adamw,galore:match_adamw_rms=True
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowrank_optim as lro  # noqa: E402
from lowrank_optim.train import loop  # noqa: E402
from lowrank_optim.train.compare import parse_optimizers  # noqa: E402
from lowrank_optim.train.data import stdlib_corpus  # noqa: E402
from lowrank_optim.train.optimizers import build_optimizer  # noqa: E402


def setup(model_name: str, entry: str, lr: float, seed: int, total: int):
    """(model, optimizer, loss function) built as the model's own benchmark builds them."""
    if model_name == "nanogpt":
        import nanogpt_lr

        torch.manual_seed(seed)
        model = nanogpt_lr.GPT()
        opt, _ = nanogpt_lr.build(entry, model, lr, (0.9, 0.99), 0.1)
        return model, opt, nanogpt_lr.loss_of
    config = json.loads(Path("configs/llama_tiny.json").read_text())
    model = loop.build_model(config, seed, torch.float32, torch.device("cpu"))
    (_, name, options), = parse_optimizers(entry)
    return model, build_optimizer(name, model, max_steps=total, **{"lr": lr, **options}), loop.lm_loss


def kinds_of(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter's kind, the same for every entry: ``projected`` (the weights ``lro.param_groups``
    projects), ``embed/head`` (the other 2-D parameters) or ``1-D``."""
    low = {id(p) for g in lro.param_groups(model) if g["rank"] is not None for _, p in g["params"]}
    return {n: "projected" if id(p) in low else ("embed/head" if p.dim() >= 2 else "1-D")
            for n, p in model.named_parameters()}


def measure(args: argparse.Namespace, entry: str, corpus) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Per parameter name, RMS(ΔW)/lr_t at each step; and each name's kind."""
    model, opt, loss_of = setup(args.model, entry, args.lr, args.seed, args.total)
    data = corpus.sequences(128, args.seed)
    warmup = max(1, args.total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.schedule(warmup, args.total, 0.1))
    named = list(model.named_parameters())
    out: dict[str, list[float]] = {n: [] for n, _ in named}
    for step in range(args.steps):
        lr_t = opt.param_groups[0]["lr"]
        before = [p.detach().clone() for _, p in named]
        loss_of(model, data.get(step * 16, 16)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        for (n, p), b in zip(named, before):
            out[n].append(float((p.detach() - b).norm()) / math.sqrt(p.numel()) / lr_t)
    kinds = kinds_of(model)
    return out, kinds


def pooled(rms: dict[str, list[float]], kinds: dict[str, str], skip: int) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for n, values in rms.items():
        acc.setdefault(kinds[n], []).extend(v * v for v in values[skip:])
    return {k: math.sqrt(sum(v) / len(v)) for k, v in acc.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("nanogpt", "llama_tiny"), default="nanogpt")
    p.add_argument("--optimizers", default="adamw,galore:match_adamw_rms=True")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--steps", type=int, default=50, help="steps measured")
    p.add_argument("--total", type=int, default=300, help="the run length the schedule spans")
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the pooled RMS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-param", action="store_true", help="also print each parameter's RMS")
    args = p.parse_args()
    corpus = stdlib_corpus()
    base = None
    print(f"{args.model}, lr {args.lr:g}, steps {args.skip}..{args.steps} of {args.total}: RMS(dW)/lr")
    for entry in args.optimizers.split(","):
        rms, kinds = measure(args, entry, corpus)
        pool = pooled(rms, kinds, args.skip)
        base = base or pool
        cells = [f"{k} {v:.4f} ({v / base[k]:.2f}x)" for k, v in sorted(pool.items())]
        print(f"| {entry} | " + " | ".join(cells) + " |", flush=True)
        if args.per_param:
            for n, values in rms.items():
                tail = values[args.skip:]
                print(f"    {kinds[n]:10s} {n:40s} {math.sqrt(sum(v * v for v in tail) / len(tail)):.4f}")


if __name__ == "__main__":
    main()
