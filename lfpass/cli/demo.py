"""``lfpass demo``: train a small CNN on real digits, fuse it, retrain, and compare
(the work is :func:`lfpass.demo.run_demo`; this prints its table)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lfpass.cli.options import EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``lfpass`` parser."""
    p = sub.add_parser("demo", help="train a small CNN on real digits, fuse it, retrain, and compare")
    p.add_argument("--quick", action="store_true", help="a few seconds of training instead of a minute")
    p.add_argument("--seconds", type=float, help="training budget before fusing (default 60, or 5 with --quick)")
    p.add_argument("--out", default="lfpass-demo", help="folder for the demo's files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lfpass.demo import run_demo

    result = run_demo(quick=args.quick, seconds=args.seconds, out_dir=Path(args.out))
    print(result["report"], end="")
    return EXIT_OK
