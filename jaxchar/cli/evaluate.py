"""`jaxchar evaluate RUN FILE`: a checkpoint's loss on any text (Run.evaluate)."""

from __future__ import annotations

import argparse

from jaxchar.cli.common import add_common, add_step, add_unknown, info, say_notes


def run(args: argparse.Namespace) -> int:
    from jaxchar.run import Run

    with Run.open(args.run_dir) as trained:
        if trained.note:
            info(trained.note, args.quiet)
        result = trained.evaluate(
            file=args.file,
            step=args.step,
            encoding=args.encoding,
            unknown=args.unknown,
            context=args.context,
        )
        say_notes(trained.notes, args.quiet)
    how = f", each with 1 to {args.context} characters before it" if args.context else ""
    print(
        f"{args.file}: {result.loss:.4f} nats/char, {result.bpc:.4f} bits/char "
        f"({result.chars} characters scored{how}; checkpoint step {result.step})"
    )
    return 0


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="loss and bits/char of a checkpoint on any text",
        description="Loss (nats/char and bits/char) of a run's checkpoint on a text file, "
        "prepared as the run's training text was.",
    )
    ev.add_argument("run_dir", help="the --run-dir of a training run")
    ev.add_argument("file", help="a text file (normalized as the run's training text)")
    add_step(ev)
    ev.add_argument("--encoding", help="text encoding of the file (default: the run's)")
    ev.add_argument(
        "--context",
        type=int,
        help="score the text in in-order chunks of N characters, each read from a fresh "
        "state: every character but the first is scored once, with 1 to N characters "
        "before it, as a fixed-context model of N sees them (default: as training scores "
        "its held-out text)",
    )
    add_unknown(ev, "text")
    add_common(ev)
    ev.set_defaults(func=run)
