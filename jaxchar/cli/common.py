"""What every command shares: messages on stderr, exit codes, the common flags.

Imports nothing heavy: the parser is built and `--help` answered before JAX is imported.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
FROM_CONFIG = "default: from the config"


def err(message: str) -> None:
    print(f"jaxchar: error: {message}", file=sys.stderr)


def info(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--quiet", action="store_true", help="print only errors (and generated text)")


def add_step(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--step", type=int, help="use this checkpoint (default: the best one, as `info` marks)"
    )


def add_unknown(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--unknown",
        choices=("error", "skip"),
        default="error",
        help=f"{what} characters outside the run's vocabulary: refuse them or leave them out "
        "(default: error)",
    )
