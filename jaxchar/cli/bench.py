"""`jaxchar bench`: training and generation speed of each config (jaxchar.bench)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxchar.cli.common import add_common, info
from jaxchar.config import shipped_names


def run(args: argparse.Namespace) -> int:
    """Training and generation speed of each config on this machine's default device."""
    from jaxchar.bench import bench as measure
    from jaxchar.bench import table

    names = args.config or (["fast"] if args.quick else _default_names(args.quiet))

    def save(record: dict) -> None:  # after each config: a run cut short keeps its figures
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    log = lambda line: info(line, args.quiet)  # noqa: E731
    record = measure(
        names, quick=args.quick, log=log, changes=args.set, save=save if args.json else None
    )
    print(table(record))
    if args.json:
        info(f"wrote {args.json}", args.quiet)
    return 0


def _default_names(quiet: bool) -> list[str]:
    """Every shipped config, less those sized for accelerators (named *_gpu) on a CPU, where
    one of their steps takes seconds; naming one with --config measures it anyway."""
    import jax

    names = shipped_names()
    if jax.default_backend() != "cpu":
        return names
    left = [n for n in names if n.endswith("_gpu")]
    if left:
        info(
            f"not measured on a CPU (sized for a GPU; name it with --config): {', '.join(left)}",
            quiet,
        )
    return [n for n in names if n not in left]


def add_parser(sub) -> None:
    be = sub.add_parser(
        "bench",
        help="training and generation speed of each config on this machine",
        description="Measure jaxchar alone on the default device (CPU, GPU or TPU): each "
        "config's compile time, time per training step, training chars/s and achieved "
        "FLOP/s, and generation chars/s at 1 and 64 rows (medians after a warm-up). "
        "Comparisons with PyTorch and Keras are in benchmarks/.",
    )
    be.add_argument(
        "--config",
        action="append",
        help="a config name or TOML file, repeatable (default: every shipped one, less those "
        "sized for a GPU when on a CPU; with --quick, fast)",
    )
    be.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions and shorter samples: about a minute on a 2-core CPU",
    )
    be.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change every measured config, e.g. model.impl=cudnn (repeatable)",
    )
    be.add_argument("--json", help="also write the figures to this JSON file")
    add_common(be)
    be.set_defaults(func=run)
