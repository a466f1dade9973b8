"""`jaxchar COMMAND`: parse arguments, call the library, print.

One module per command (train, generate, serve, evaluate, export, plot, info, env, bench);
each adds its parser and runs through `jaxchar.run` and the other library modules.
Generated text alone goes to stdout; the summary, progress and logs go to stderr. Every
refusal is one line on stderr and exit 2 (a traceback only with --debug). The CLI is the
only place that reads environment variables (JAXCHAR_DATA, JAXCHAR_CACHE). JAX and orbax are
imported only when a command runs, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxchar.cli import bench, env, evaluate, export, generate, info, plot, serve, train
from jaxchar.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, err, quiet_library_noise
from jaxchar.version import __version__

# the library's refusals: (module, class). A module the command never imported cannot have
# raised, so they are looked up after the fact instead of imported up front
EXPECTED = (
    ("jaxchar.config", "ConfigError"),
    ("jaxchar.corpus", "CorpusError"),
    ("jaxchar.checkpoint", "CheckpointError"),
    ("jaxchar.train", "TrainingError"),
    ("jaxchar.distributed", "DistributedError"),
    ("jaxchar.lstm.backends", "BackendError"),
)


def expected(error: BaseException) -> bool:
    """Whether `error` is one of the library's one-line refusals."""
    classes = tuple(getattr(sys.modules[m], name) for m, name in EXPECTED if m in sys.modules)
    return isinstance(error, classes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxchar",
        description="Train a character-level LSTM on a text file and generate text from it.",
    )
    parser.add_argument("--version", action="version", version=f"jaxchar {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of (each has --help):"
    )
    train.add_parser(sub)
    generate.add_parser(sub)
    serve.add_parser(sub)
    for command in (evaluate, export, plot, info, env, bench):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        quiet_library_noise()
    try:
        return args.func(args)
    except BrokenPipeError:  # stdout closed early (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.debug:
            raise
        if expected(error):
            err(str(error))
            return EXIT_USAGE
        # anything unforeseen: still one line
        err(f"unexpected {error.__class__.__name__}: {error} (run again with --debug for details)")
        return 1
