"""`jaxchar info RUN`: a run's config, vocabulary, kept checkpoints and backends."""

from __future__ import annotations

import argparse

from jaxchar.cli.common import add_common, info
from jaxchar.version import __version__


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxchar.lstm.backends import choices
    from jaxchar.run import Run

    with Run.open(args.run_dir) as trained:
        if trained.note:
            info(trained.note, args.quiet)
        best = trained.best_step()
        writer = trained.dir.written_by or "before 0.2.0"
        print(f"run: {trained.path} (written by jaxchar {writer})")
        print(f"this jaxchar: {__version__}")
        print(f"vocabulary ({len(trained.vocab)}): {''.join(trained.vocab.chars)!r}")
        print(f"monitored: {trained.dir.monitor} (lower is better)")
        for name, section in trained.stored_cfg.to_dict().items():
            print(f"[{name}] " + ", ".join(f"{k}={v}" for k, v in section.items()))
        print(f"{'step':>8} {'epoch':>6} {'train loss':>11} {'val loss':>9} {'bits/char':>9}")
        for step in trained.steps():
            damage = trained.damage(step)
            if damage == "its metrics cannot be read":
                print(f"{step:>8} (damaged: {damage})")
                continue
            m = trained.metrics(step)
            val = f"{m['val_loss']:.4f}" if "val_loss" in m else "-"
            bpc = m.get("val_bpc", m.get("train_bpc"))
            if damage and trained.dir.misfit(step):  # another run's checkpoint
                mark = f"  (skipped: {damage})"
            elif damage:
                mark = f"  (damaged: {damage})"
            elif step == best:
                mark = "  <- best, used by generate"
            else:
                mark = "  (interrupted: for resuming)" if m.get("interrupted") else ""
            print(f"{step:>8} {m['epoch']:>6} {m['train_loss']:>11.4f} {val:>9} {bpc:>9.3f}{mark}")
        for purpose, choice in choices(trained.cfg.model, jax.default_backend()).items():
            print(f"backend, {purpose}: {choice.backend} ({choice.reason})")
    return 0


def add_parser(sub) -> None:
    inf = sub.add_parser(
        "info",
        help="show a run's config and kept checkpoints",
        description="A run's config, vocabulary, kept checkpoints with their losses, and "
        "the backends it runs with on this machine.",
    )
    inf.add_argument("run_dir", help="the --run-dir of a training run")
    add_common(inf)
    inf.set_defaults(func=run)
