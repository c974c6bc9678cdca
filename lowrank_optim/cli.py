"""The ``lowrank-optim`` command: ``list`` the methods, ``memory`` of a model under one of them,
``pretrain`` a LLaMA with one of them, ``compare`` several on the same data.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from ._console import stderr_line
from ._version import __version__

#: compare's defaults, sized so that ``lowrank-optim compare --config configs/llama_tiny.json`` is a
#: first run of about two minutes; every flag still overrides them.
FIRST_RUN = {"optimizers": "adamw,galore", "max_steps": 150, "seq_len": 128, "eval_every": 50}
COMPARE_OPTIMIZERS_HELP = (
    "comma-separated names, each optionally with overrides: adamw,muon,adafactor,galore,apollo_mini:lr=0.02; "
    "ref:galore, ref:apollo, ref:apollo_mini, ref:fira run the paper's own package at the preset's settings "
    f"(default {FIRST_RUN['optimizers']})")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowrank-optim",
        description="Memory-efficient low-rank optimizers for LLM training (GaLore and friends).",
    )
    parser.add_argument("--version", action="version", version=f"lowrank-optim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="list the optimizer presets and projectors, with their defaults")
    mem = sub.add_parser(
        "memory",
        help="memory of training a LLaMA config with an optimizer, beside AdamW",
        description="Weights, gradients, optimizer states (measured on the meta device), projections and "
        "estimated activations, in GiB, for one of our optimizers (or the adafactor or muon baseline) beside AdamW.",
    )
    mem.add_argument("--config", required=True, help="a LlamaConfig JSON, e.g. configs/llama_7b.json")
    mem.add_argument("--optimizer", default="galore",
                     help="a baseline (adamw, adafactor, muon) or a preset: galore, apollo, apollo_mini, frugal, fira, lowrank, ...")
    mem.add_argument("--rank", type=int, default=None,
                     help="rank of the projected weights (default: the preset's, hidden size / 4; apollo_mini 1)")
    mem.add_argument("--projector", default=None, help="override the preset's projector (any name of `lowrank-optim list`: svd, rsvd, dct, random, sparse, ...)")
    mem.add_argument("--weights", choices=["bf16", "fp32", "int8"], default="bf16",
                     help="weight dtype (gradients bf16 for int8: the projected linear weights stored as INT8, Q-GaLore)")
    mem.add_argument("--state-bits", type=int, choices=[32, 8], default=None,
                     help="8: INT8 optimizer moments, ours and the baseline's (8-bit AdamW); default: the preset's own")
    mem.add_argument("--ef-bits", type=int, choices=[32, 8, 4], default=None,
                     help="residual='error_feedback' (dct_adamw): its buffer in 32, 8 or 4 bits (default: the preset's, 32)")
    mem.add_argument("--layerwise", action="store_true", help="layer-wise updates: one gradient at a time")
    mem.add_argument("--grad-accum", type=int, default=1,
                     help="micro-batches per optimizer step (default 1); with --layerwise more than 1 holds every gradient")
    mem.add_argument("--sample-layers", type=int, default=None,
                     help="layer sampling (LISA/OwLore): only this many decoder layers hold gradients and optimizer state")
    mem.add_argument("--batch", type=int, default=None, help="batch size, for the activation estimate")
    mem.add_argument("--seq", type=int, default=None, help="sequence length, for the activation estimate")
    mem.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    mem.add_argument("--measure", action="store_true",
                     help="on CUDA, also run 3 real training steps of our optimizer (transformers' LLaMA) and report the measured peak")
    mem.add_argument("--cap-gib", type=float, default=None,
                     help="with --measure: cap torch's CUDA allocator at this many GiB (e.g. 24), so a setup that would not "
                     "fit a card of that size fails with out-of-memory (the CUDA context's few hundred MiB are not counted)")
    mem.add_argument("--json", action="store_true", help='print {"ours": {...}, "adamw": {...}} in bytes')
    mem.add_argument("--sltrain", default=None, metavar="RANK:DENSITY[:ALPHA]",
                     help="SLTrain (lro.nn.to_sltrain) trained by AdamW, beside dense AdamW; with --optimizer adamw")
    _add_train_parsers(sub)
    return parser


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    """The flags pretrain and compare share (see README "Pretraining")."""
    p.add_argument("--config", required=True, help="a LlamaConfig JSON, e.g. configs/llama_tiny.json")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps (default 1000); the schedule spans them")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per process (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--data", default=None, metavar="PATH|c4",
                   help="training text: a .txt/.jsonl file or a folder of them, or c4 (streamed, needs the network); "
                        "default: the Python standard library's source, byte-level, offline")
    p.add_argument("--tokenizer", default=None,
                   help="Hugging Face tokenizer name or path for --data (default: bytes; t5-base for c4)")
    p.add_argument("--layerwise", action="store_true", help="layer-wise updates inside the backward (lro.layerwise)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every decoder layer")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="weight dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (default: max-steps / 10)")
    p.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens per evaluation (default 32768)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: max-steps / 10)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to this fraction of the lr (default 0.1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradients' global norm (default 1.0; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one when stderr is a terminal)")


def _add_train_parsers(sub: argparse._SubParsersAction) -> None:
    pre = sub.add_parser(
        "pretrain",
        help="pretrain a LLaMA (transformers) from a config with one optimizer",
        description="Pretrain transformers' LlamaForCausalLM from a config with a baseline (adamw, adafactor, muon) "
        "or one of our presets: "
        "warmup + cosine schedule, clipping, held-out perplexity, DIR/metrics.jsonl, atomic checkpoints "
        "(--resume continues exactly), DDP under torchrun, or FSDP2 with --fsdp.",
    )
    pre.add_argument("--optimizer", default="galore",
                     help="adamw, adafactor, muon (Muon on hidden weights + AdamW) or a preset (lowrank-optim list); default galore")
    pre.add_argument("--rank", type=int, default=None, help="rank of the projected weights (default: hidden size / 4; apollo_mini 1)")
    pre.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the optimizer's, see README)")
    pre.add_argument("--weight-decay", type=float, default=None, help="decoupled weight decay (default 0)")
    pre.add_argument("--update-proj-gap", type=int, default=None, help="steps between subspace refreshes (default 200)")
    pre.add_argument("--scale", type=float, default=None, help="the low-rank update's scale (default: the preset's)")
    pre.add_argument("--projector", default=None, help="override the preset's projector (any name of `lowrank-optim list`: svd, rsvd, dct, random, sparse, ...)")
    _add_training_flags(pre)
    pre.add_argument("--layer-sampling", choices=["lisa", "owl"], default=None,
                     help="train a few sampled decoder layers at a time (lro.LayerSampler): lisa uniformly, owl (OwLore) "
                          "by OWL outlier ratio; frozen layers hold no optimizer state")
    pre.add_argument("--sample-every", type=int, default=50, help="steps between layer choices (default 50, OwLore's K)")
    pre.add_argument("--sample-layers", type=int, default=5,
                     help="layers trained at a time (default 5, OwLore's; clamped to the model's layers)")
    pre.add_argument("--owl-threshold", type=float, default=13.0,
                     help="OWL's outlier threshold M for --layer-sampling owl (default 13, OwLore's)")
    pre.add_argument("--out", default=None, help="folder for metrics.jsonl and checkpoint.pt (checkpoint.dcp/ with --fsdp) "
                     "(default runs/<config>-<optimizer>)")
    pre.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    pre.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds a checkpoint")
    pre.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: as --eval-every; 0: at the end only)")
    pre.add_argument("--stop-at", type=int, default=None,
                     help="stop after this step with a checkpoint (the schedule still spans --max-steps); --resume goes on")
    pre.add_argument("--sltrain", default=None, metavar="RANK:DENSITY[:ALPHA]",
                     help="SLTrain: replace the attention and MLP linears by lro.nn.SparseLowRankLinear (W = alpha/r BA + S, "
                          "S a fixed random support of DENSITY of the entries; alpha default 32) before the optimizer; "
                          "paper: --optimizer adamw --lr 3e-3, 128:0.03 at 60M")
    pre.add_argument("--fsdp", action="store_true",
                     help="shard weights, gradients and optimizer states over the ranks with FSDP2 (fully_shard per "
                          "decoder layer, then the root) instead of DDP: run under torchrun, e.g. torchrun "
                          "--nproc-per-node 8 -m lowrank_optim.cli pretrain --fsdp ...; without torchrun, one process "
                          "(a 1-rank mesh). Checkpoints are torch.distributed.checkpoint folders (DIR/checkpoint.dcp), "
                          "--resume needs the same number of ranks. Not with --layerwise or the adafactor baseline; "
                          "optimizer options not built for shards yet (e.g. Q-GaLore's INT4 bases and lazy refresh, "
                          "the dct/sparse/online_pca projectors) are refused when the optimizer is built")

    cmp = sub.add_parser(
        "compare",
        help="train several optimizers on the same data and seed; one table, compare.json, compare.png",
        description="Train each optimizer on the same data from the same initial weights, print one table "
        "(held-out loss and perplexity, tokens/s, optimizer state, peak memory) and write DIR/compare.json "
        "and DIR/compare.png. With only --config: adamw and galore, 150 steps of 16 x 128 tokens, held-out "
        "loss every 50 (about two minutes for llama_tiny on a 2-core CPU); the flags override each of these.",
    )
    cmp.add_argument("--optimizers", default=FIRST_RUN["optimizers"], help=COMPARE_OPTIMIZERS_HELP)
    _add_training_flags(cmp)
    # the first run: with only --config, about two minutes on llama_tiny on a 2-core CPU (README, Quick start)
    cmp.set_defaults(**{k: v for k, v in FIRST_RUN.items() if k != "optimizers"})
    cmp.add_argument("--out", default=None, help="folder for the results (default runs/compare-<config>)")


def _train_args(args: argparse.Namespace, **extra):
    from .train import TrainArgs

    return TrainArgs(
        config=args.config, max_steps=args.max_steps, batch_size=args.batch_size, seq_len=args.seq_len,
        grad_accum=args.grad_accum, data=args.data, tokenizer=args.tokenizer, layerwise=args.layerwise,
        checkpointing=args.checkpointing, dtype=args.dtype, device=args.device, eval_every=args.eval_every,
        eval_tokens=args.eval_tokens, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
        max_grad_norm=args.max_grad_norm, seed=args.seed, progress=False if args.no_progress else None,
        **extra,
    )


def _pretrain(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .train import pretrain

    options = {"lr": args.lr, "rank": args.rank, "weight_decay": args.weight_decay,
               "update_proj_gap": args.update_proj_gap, "scale": args.scale, "projector": args.projector}
    out = args.out or str(Path("runs") / f"{Path(args.config).stem}-{args.optimizer}")
    a = _train_args(args, optimizer=args.optimizer, options={k: v for k, v in options.items() if v is not None},
                    out=out, resume=args.resume, overwrite=args.overwrite, save_every=args.save_every,
                    stop_at=args.stop_at, fsdp=args.fsdp, layer_sampling=args.layer_sampling,
                    sample_every=args.sample_every, sample_layers=args.sample_layers, owl_threshold=args.owl_threshold,
                    sltrain=args.sltrain)
    result = pretrain(a)
    if os.environ.get("RANK", "0") == "0":
        # a resumed run that was already finished trains no step: no speed to report
        speed = "no step left to train" if math.isnan(result.tokens_per_s) else f"{result.tokens_per_s:,.0f} tokens/s"
        print(f"{args.optimizer}: step {result.steps}, held-out loss {result.final_eval_loss:.4f}, perplexity "
              f"{result.final_perplexity:.3f}, {speed}; metrics and checkpoint in {out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train import compare, parse_optimizers

    specs = parse_optimizers(args.optimizers)
    out = args.out or str(Path("runs") / f"compare-{Path(args.config).stem}")
    compare(_train_args(args), specs, out)
    return 0


def _run_train_command(name: str, fn, args: argparse.Namespace) -> int:
    """Run pretrain/compare; bad input is one line on stderr and exit status 2; a run stopped by SIGTERM
    or SIGINT (saved at a step boundary) one line and 128 + the signal's number (143, 130)."""
    from .train import TrainError
    from .train.preempt import Stopped

    try:
        return fn(args)
    except (TrainError, ValueError, FileNotFoundError) as err:
        stderr_line(f"lowrank-optim {name}: error: {err}")
        return 2
    except Stopped as stop:
        stderr_line(f"lowrank-optim {name}: {stop}")
        return stop.exit_status
    except KeyboardInterrupt:
        stderr_line(f"lowrank-optim {name}: interrupted (the last checkpoint, if any, is intact)")
        return 130


def _memory(args: argparse.Namespace) -> int:
    from . import memory

    keys = {"projector": args.projector} if args.projector else {}
    if args.ef_bits is not None:
        keys["ef_bits"] = args.ef_bits
    if args.measure and args.grad_accum != 1:
        raise ValueError("--measure steps one micro-batch per step; drop --grad-accum for the measured run")
    if args.cap_gib is not None and not args.measure:
        raise ValueError("--cap-gib caps the measured run's CUDA memory: add --measure, or drop --cap-gib")
    if args.sltrain is not None:
        return _memory_sltrain(args)
    from .train.optimizers import BASELINES

    given = [flag for flag, value in (("--rank", args.rank), ("--projector", args.projector),
                                      ("--ef-bits", args.ef_bits)) if value is not None]
    if args.optimizer in BASELINES and given:  # counted as if absent, before: pretrain refuses them too
        raise ValueError(f"{args.optimizer} takes no low-rank options ({', '.join(given)}); drop them, or pick a "
                         "low-rank preset (lowrank-optim list)")
    report = memory.estimate(
        args.config, args.optimizer, rank=args.rank, weights=args.weights, state_bits=args.state_bits, layerwise=args.layerwise,
        batch=args.batch, seq=args.seq, checkpointing=args.checkpointing, sample_layers=args.sample_layers,
        accumulation_steps=args.grad_accum, **keys,
    )
    measured = None
    if args.measure:
        measured = memory.measure_peak(
            args.config, args.optimizer, rank=args.rank, weights=args.weights, state_bits=args.state_bits, layerwise=args.layerwise,
            batch=args.batch or 1, seq=args.seq or 256, checkpointing=args.checkpointing, cap_gib=args.cap_gib, **keys,
        )
    if args.json:
        import json

        out = report.to_dict()
        if measured is not None:
            out["ours"]["measured_peak"] = measured
        print(json.dumps(out))
    else:
        print(report.table())
        if measured is not None:
            print(f"\nmeasured peak (CUDA, {args.optimizer}): {measured / 2**30:.2f} GiB "
                  f"against an estimated total of {report.ours.total / 2**30:.2f} GiB")
    return 0


def _memory_sltrain(args: argparse.Namespace) -> int:
    """``memory --sltrain``: SLTrain under AdamW beside dense AdamW (lro.memory.estimate_sltrain)."""
    from . import memory

    if (args.optimizer != "adamw" or args.projector or args.rank is not None or args.measure
            or args.sample_layers is not None or args.ef_bits is not None):
        raise ValueError("--sltrain counts SLTrain trained by AdamW (the paper's recipe): use --optimizer adamw "
                         "(--state-bits 8 for 8-bit AdamW), without --rank, --projector, --ef-bits, --sample-layers "
                         "or --measure")
    report = memory.estimate_sltrain(args.config, args.sltrain, weights=args.weights, state_bits=args.state_bits,
                                     layerwise=args.layerwise, batch=args.batch, seq=args.seq,
                                     checkpointing=args.checkpointing, accumulation_steps=args.grad_accum)
    if args.json:
        import json

        print(json.dumps(report.to_dict()))
    else:
        print(report.table())
    return 0


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring, as one line."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in first.splitlines())


def _list() -> int:
    import inspect
    import shutil
    import textwrap

    from . import PRESETS, GoLore, projectors
    from .train import references

    width = max(60, min(120, shutil.get_terminal_size((100, 24)).columns))
    rows: list[tuple[str, list[tuple[str, str]]]] = [("baselines (pretrain, compare and memory --optimizer):", [
        ("adamw", "torch.optim.AdamW on every parameter"),
        ("adafactor", "torch.optim.Adafactor on every parameter (factored second moment)"),
        ("muon", "torch.optim.Muon on the hidden 2-D weights, torch.optim.AdamW on the rest"),
    ])]
    presets = []
    # golore is not in PRESETS (it needs the run's length for its switch), but pretrain and compare take it
    for key, cls in [*PRESETS.items(), ("golore", GoLore)]:
        own = cls.preset or cls.base_defaults
        sets = ", ".join(f"{k}={v!r}" for k, v in own.items())
        rank = getattr(cls, "default_rank", None)
        tail = (f"; rank {rank} when a group asks for one without a number." if rank else
                "; switch_step at rand_ratio (0.8) of --max-steps." if cls is GoLore else ".")
        presets.append((f"{key} ({cls.__name__})", f"{_summary(cls.__doc__)} Sets: {sets}{tail}"))
    rows.append(("optimizers (lowrank_optim.<Class>; lowrank-optim pretrain/compare --optimizer <name>):", presets))
    rows.append(("reference packages (lowrank-optim compare --optimizers ref:<preset>):", [
        (f"ref:{preset}", f"{references.REFERENCES[preset][1]} at the settings {preset} resolves to (the same groups, "
                          "lr, rank, gap, scale, projection, limiter); compare only, no checkpoints.")
        for preset in references.REFERENCES]))
    rows.append(("model reparameterizations (lowrank_optim.nn; pretrain and memory --sltrain RANK:DENSITY[:ALPHA]):", [
        ("sltrain", "SLTrain (Han et al. 2024): attention and MLP weights as (alpha/r) B A + S, S a fixed random sparse "
                    "support (paper: density 0.03, rank 128 at 60M), trained with AdamW (lr 3e-3); no W formed."),
    ]))
    rows.append(("projectors (lowrank_optim.projectors.make(name, rank)):", [
        (name, _summary(inspect.getmodule(projectors.REGISTRY[name]).__doc__ or projectors.REGISTRY[name].__doc__))
        for name in projectors.available()]))
    rows.append(("layer sampling (lowrank_optim.LayerSampler; lowrank-optim pretrain --layer-sampling <name>):", [
        ("lisa", "LISA: every --sample-every steps train --sample-layers decoder layers drawn uniformly; the others "
                 "frozen, their optimizer state freed. Any --optimizer."),
        ("owl", "OwLore: the same, layers drawn in proportion to OWL's outlier ratio (lowrank_optim.owl_ratios); "
                "lowrank_optim.OwLore builds GaLore (rank 256, gap 100, scale 1) with it."),
    ]))
    left = max(len(name) for _, items in rows for name, _ in items) + 4
    for title, items in rows:
        print(title)
        for name, text in items:
            lines = textwrap.wrap(text, width=width - left, break_on_hyphens=False) or [""]
            print(f"  {name:<{left - 2}}{lines[0]}")
            for line in lines[1:]:
                print(" " * left + line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list()
    if args.command == "memory":
        try:
            return _memory(args)
        except (ValueError, FileNotFoundError, TypeError, RuntimeError) as err:
            stderr_line(f"lowrank-optim memory: error: {err}")
            return 2
    if args.command == "pretrain":
        return _run_train_command("pretrain", _pretrain, args)
    if args.command == "compare":
        return _run_train_command("compare", _compare, args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
