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


def say_notes(notes: list[str], quiet: bool = False) -> None:
    """The library's notes (a damaged checkpoint passed over, a backend replaced), once."""
    while notes:
        info(f"note: {notes.pop(0)}", quiet)


def quiet_library_noise() -> None:
    """Without --debug, the libraries' own logs and leftover tracebacks stay off stderr: a
    damaged checkpoint makes orbax log JSON errors (absl) and leaves coroutines and threads
    that complain at exit; jaxchar's one-line notes and errors say what happened."""
    import logging
    import threading

    for name in ("absl", "asyncio", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    default = threading.excepthook

    def threads(args) -> None:
        if not (args.exc_type is RuntimeError and "Event loop is closed" in str(args.exc_value)):
            default(args)

    threading.excepthook = threads
