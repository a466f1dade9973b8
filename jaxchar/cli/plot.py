"""`jaxchar plot RUN...`: a PNG of the runs' train and validation loss (matplotlib)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxchar.cli.common import add_common, info
from jaxchar.config import ConfigError


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plot needs matplotlib: pip install 'jaxchar[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in args.run_dirs:
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            raise ConfigError(f"{run_dir} has no metrics.jsonl: is it a jaxchar run?")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        name = Path(run_dir).name
        for ax, x in zip(axes, ("step", "wall_s"), strict=True):
            xs = [r.get(x, 0.0) for r in rows]
            ax.plot(xs, [r["train_loss"] for r in rows], label=f"{name} train")
            if any("val_loss" in r for r in rows):
                ax.plot(xs, [r.get("val_loss") for r in rows], "--", label=f"{name} validation")
            ax.set_xlabel("step" if x == "step" else "wall time (s)")
            ax.set_ylabel("loss (nats/char)")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    plt.close(fig)
    info(f"wrote {args.output}", args.quiet)
    return 0


def add_parser(sub) -> None:
    pl = sub.add_parser(
        "plot",
        help="PNG of train/validation loss for one or more runs",
        description="Plot the training and validation loss of runs against steps and time.",
    )
    pl.add_argument("run_dirs", nargs="+", help="one or more runs' --run-dir")
    pl.add_argument("--output", default="loss.png", help="the PNG to write (default: loss.png)")
    add_common(pl)
    pl.set_defaults(func=run)
