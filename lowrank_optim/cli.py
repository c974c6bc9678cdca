"""The ``lowrank-optim`` command: ``list`` the methods, ``memory`` of a model under one of them.

``pretrain`` and ``compare`` arrive with their issue.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__


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
        "estimated activations, in GiB, for one of our optimizers beside AdamW.",
    )
    mem.add_argument("--config", required=True, help="a LlamaConfig JSON, e.g. configs/llama_7b.json")
    mem.add_argument("--optimizer", default="galore", help="adamw or a preset: galore, apollo, apollo_mini, frugal, fira, lowrank")
    mem.add_argument("--rank", type=int, default=None, help="rank of the projected weights (default 128; apollo_mini 1)")
    mem.add_argument("--projector", default=None, help="override the preset's projector (svd, rsvd, dct, random, sparse, online_pca)")
    mem.add_argument("--weights", choices=["bf16", "fp32"], default="bf16", help="weight (and gradient) dtype")
    mem.add_argument("--layerwise", action="store_true", help="layer-wise updates: one gradient at a time")
    mem.add_argument("--batch", type=int, default=None, help="batch size, for the activation estimate")
    mem.add_argument("--seq", type=int, default=None, help="sequence length, for the activation estimate")
    mem.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    mem.add_argument("--measure", action="store_true",
                     help="on CUDA, also run 3 real training steps of our optimizer (transformers' LLaMA) and report the measured peak")
    mem.add_argument("--json", action="store_true", help='print {"ours": {...}, "adamw": {...}} in bytes')
    return parser


def _memory(args: argparse.Namespace) -> int:
    from . import memory

    keys = {"projector": args.projector} if args.projector else {}
    report = memory.estimate(
        args.config, args.optimizer, rank=args.rank, weights=args.weights, layerwise=args.layerwise,
        batch=args.batch, seq=args.seq, checkpointing=args.checkpointing, **keys,
    )
    measured = None
    if args.measure:
        measured = memory.measure_peak(
            args.config, args.optimizer, rank=args.rank, weights=args.weights, layerwise=args.layerwise,
            batch=args.batch or 1, seq=args.seq or 256, checkpointing=args.checkpointing, **keys,
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


def _list() -> int:
    import inspect

    from . import PRESETS, projectors

    print("optimizers (lowrank_optim.<Class>):")
    for key, cls in PRESETS.items():
        own = cls.preset or cls.base_defaults
        keys = ", ".join(f"{k}={v!r}" for k, v in own.items())
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"  {key:<12} {cls.__name__:<13} {summary}")
        print(f"  {'':<12} {'':<13} sets: {keys}")
    print("projectors (lowrank_optim.projectors.make(name, rank)):")
    for name in projectors.available():
        cls = projectors.REGISTRY[name]
        doc = (inspect.getmodule(cls).__doc__ or cls.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<12} {doc}")
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
            print(f"lowrank-optim memory: error: {err}", file=sys.stderr)
            return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
