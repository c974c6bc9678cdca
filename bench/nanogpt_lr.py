"""Do AdamW's learning rates carry over? A nanoGPT-style GPT trained the way nanoGPT trains it.

The model is nanoGPT's (Karpathy's ``model.py``, written again here, not downloaded): token and
position embeddings, pre-LayerNorm blocks of causal self-attention (one ``c_attn`` for q, k, v) and a
4x GELU MLP, a final LayerNorm and an output head tied to the token embedding; n_layer 4, n_head 4,
n_embd 128, biases on, no dropout. The loop is nanoGPT's ``train.py``: AdamW with betas (0.9, 0.99)
(its character-level config), weight decay 0.1 on the 2-D parameters and none on the rest
(``configure_optimizers``), linear warmup then cosine to lr / 10, gradient clipping at 1.0.

The data is the training commands' offline corpus (the standard library's sources, byte-level,
``lowrank_optim.train.data.stdlib_corpus``), batches of 16 x 128 tokens in the seeded order
``lowrank-optim pretrain`` uses, and the same 32,768 held-out tokens.

Each entry of ``--optimizers`` is ``adamw`` (nanoGPT's own optimizer, exactly) or a preset of
``lro.PRESETS`` with ``key=value`` options, built as a nanoGPT user would swap it in::

    optimizer = lro.GaLoreAdamW(lro.param_groups(model), lr=learning_rate, betas=betas,
                                weight_decay=weight_decay)

    python3 bench/nanogpt_lr.py --optimizers adamw,galore,galore:lr=0.01 --steps 300

An entry ``ref:PRESET[:options]`` is the method's reference package (galore-torch, apollo-torch, fira)
at the settings our preset resolves to with those options (:mod:`lowrank_optim.train.references`, as in
``lowrank-optim compare``). It tells a gap that is the method's (its own code has it too) from ours::

    python3 bench/nanogpt_lr.py --lr 0.004 --optimizers adamw,apollo_mini:match_adamw_rms=True,ref:apollo_mini:match_adamw_rms=True
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, ".")
import lowrank_optim as lro  # noqa: E402
from lowrank_optim.optim.options import option_value  # noqa: E402
from lowrank_optim.train.data import stdlib_corpus  # noqa: E402
from lowrank_optim.train.errors import TrainError  # noqa: E402
from lowrank_optim.train.references import PREFIX, preset_of, reference_twin  # noqa: E402


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT's GPT: tied embedding and head, nanoGPT's initialization (normal 0.02; residual
    projections 0.02 / sqrt(2 n_layer))."""

    def __init__(self, vocab: int = 260, block: int = 128, n_layer: int = 4, n_head: int = 4, n_embd: int = 128) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def loss_of(model: nn.Module, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction=reduction)


def nanogpt_adamw(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.Optimizer:
    """nanoGPT's ``configure_optimizers``: decay on every parameter of 2 or more dimensions."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def build(entry: str, model: nn.Module, lr: float, betas: tuple[float, float], wd: float) -> tuple[torch.optim.Optimizer, float]:
    name, *pairs = entry.split(":")
    reference = name == "ref"
    if reference:
        if not pairs:
            raise SystemExit(f"{entry}: write ref:PRESET, e.g. ref:galore")
        name, *pairs = pairs
    options = {k: option_value(v) for k, _, v in (p.partition("=") for p in pairs)}
    lr = float(options.pop("lr", lr))
    if name == "adamw":
        return nanogpt_adamw(model, lr, betas, wd), lr
    group_keys = {k: options.pop(k) for k in ("rank",) if k in options}
    ours = lro.PRESETS[name](lro.param_groups(model, **group_keys), lr=lr, betas=betas, weight_decay=wd, **options)
    if not reference:
        return ours, lr
    try:
        return reference_twin(preset_of(PREFIX + name), ours), lr
    except TrainError as err:
        raise SystemExit(str(err)) from None


def run(entry: str, args: argparse.Namespace, corpus, heldout: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    model = GPT()
    opt, lr = build(entry, model, args.lr, (0.9, 0.99), args.weight_decay)
    data = corpus.sequences(128, args.seed)
    warmup = max(1, args.steps // 10)

    def factor(s: int) -> float:  # nanoGPT's get_lr: linear warmup, cosine to min_lr = lr / 10
        if s < warmup:
            return (s + 1) / warmup
        ratio = (s - warmup) / max(1, args.steps - 1 - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * ratio))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    start = time.perf_counter()
    for step in range(args.steps):
        loss = loss_of(model, data.get(step * args.batch, args.batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        total = sum(float(loss_of(model, heldout[i:i + 32], "sum")) for i in range(0, len(heldout), 32))
    held = total / heldout[:, 1:].numel()
    return {"entry": entry, "lr": lr, "heldout_loss": held, "train_loss": loss.item(), "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizers", default="adamw,galore,apollo,apollo_mini,frugal,fira")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="nanoGPT's learning rate, for every entry without lr=")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    for entry in args.optimizers.split(","):  # every entry's name and options, before any trains
        build(entry, GPT(), args.lr, (0.9, 0.99), args.weight_decay)
    corpus = stdlib_corpus()
    heldout = corpus.heldout_sequences(128, 32768)
    rows = []
    print(f"nanoGPT (n_layer 4, n_head 4, n_embd 128), {args.steps} steps of {args.batch} x 128 tokens, seed {args.seed}")
    print("| optimizer | lr | held-out loss | vs adamw | time |\n|---|---:|---:|---:|---:|", flush=True)
    for entry in args.optimizers.split(","):
        rows.append(run(entry, args, corpus, heldout))
        base = next((r["heldout_loss"] for r in rows if r["entry"] == "adamw"), None)
        r = rows[-1]
        vs = f"{r['heldout_loss'] / base:.3f}" if base else "-"
        print(f"| {r['entry']} | {r['lr']:g} | {r['heldout_loss']:.4f} | {vs} | {r['seconds']:.0f} s |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
