"""The ``lfpass`` command line. Errors become one line on stderr and a non-zero exit:
0 done, 1 validation outside tolerance, 2 bad input or usage.

One module per subcommand (``analyze``, ``optimize`` with ``validate``,
``retrain``, ``demo``), each with a ``register(sub)`` that adds its parser; ``options``
holds the options and exit codes they share, ``output`` what the ONNX
subcommands print. The CLI only calls down into the library: no library
module imports from here.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Sequence

from lfpass.cli import analyze, demo, optimize, retrain
from lfpass.cli.options import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE
from lfpass.core.errors import LfpassError, first_line
from lfpass.core.fileio import Terminated, cleanup_on_sigterm

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: `analyze --plan` must not silently mean `--plan-out` and write a file
    parser = argparse.ArgumentParser(prog="lfpass", description="Compress neural networks by layer fusion.",
                                     allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))
    for command in (analyze, demo, optimize, retrain):
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="lfpass: %(message)s")
    try:
        with cleanup_on_sigterm():
            return args.func(args)
    except LfpassError as exc:
        print(f"lfpass: error: {first_line(exc, width=400)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lfpass: interrupted; nothing was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("lfpass: terminated; nothing was left half-written", file=sys.stderr)
        return EXIT_TERMINATED
    except MemoryError:
        print("lfpass: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a bug in lfpass: still one line, the traceback under -v
        if args.verbose:
            raise
        print(f"lfpass: error: internal error ({type(exc).__name__}: {first_line(exc)}); "
              "rerun with -v for the traceback and report it", file=sys.stderr)
        return EXIT_USAGE
