"""The ``lowrank-optim`` command.

Subcommands arrive with their issues (``memory``, ``pretrain``, ``compare``); today it reports the
version and lists the optimizers and projectors this installation provides.
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
    return parser


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
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
