"""`jaxchar export RUN OUT`: params, config and vocabulary for use without jaxchar (Run.export,
jaxchar.export for the StableHLO sampler)."""

from __future__ import annotations

import argparse

from jaxchar.cli.common import add_common, add_step, info, say_notes


def run(args: argparse.Namespace) -> int:
    from jaxchar.run import Run

    with Run.open(args.run_dir) as trained:
        if args.format == "stablehlo":
            from jaxchar.export import export_sampler

            params, _ = trained.params(args.step)
            sizes = {"length": args.length, "rows": args.rows, "prompt_length": args.prompt_length}
            out = export_sampler(params, trained.stored_cfg, trained.vocab, args.out, **sizes)
        else:
            out = trained.export(args.out, args.step)
        say_notes(trained.notes, args.quiet)
    files = "sampler.bin, sampler.json, README.md, " if args.format == "stablehlo" else ""
    info(f"wrote {out}/{files}params.npz, config.json, vocab.json", args.quiet)
    return 0


def add_parser(sub) -> None:
    ex = sub.add_parser(
        "export",
        help="params as .npz plus config and vocabulary as JSON",
        description="Write a checkpoint's params (.npz), config and vocabulary (JSON): "
        "everything needed to use the model without jaxchar or orbax.",
    )
    ex.add_argument("run_dir", help="the --run-dir of a training run")
    ex.add_argument("out", help="a new (or empty) folder")
    add_step(ex)
    ex.add_argument(
        "--format",
        choices=("npz", "stablehlo"),
        default="npz",
        help="npz: the arrays, config and vocabulary; stablehlo: also the jitted sampler "
        "serialized with jax.export for cpu, cuda and tpu, runnable with jax and numpy "
        "alone (default: npz)",
    )
    ex.add_argument(
        "--length", type=int, default=200, help="stablehlo: characters generated (default: 200)"
    )
    ex.add_argument("--rows", type=int, default=1, help="stablehlo: samples per call (default: 1)")
    ex.add_argument(
        "--prompt-length",
        type=int,
        default=16,
        help="stablehlo: characters of every prompt (default: 16)",
    )
    add_common(ex)
    ex.set_defaults(func=run)
