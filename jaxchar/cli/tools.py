"""The smaller commands: evaluate, export, plot, info, env."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from jaxchar.cli.common import add_common, add_step, add_unknown, info, say_notes
from jaxchar.config import ConfigError, load_config, shipped_names
from jaxchar.version import __version__


def evaluate(args: argparse.Namespace) -> int:
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


def export(args: argparse.Namespace) -> int:
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


def plot(args: argparse.Namespace) -> int:
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


def show(args: argparse.Namespace) -> int:
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


def env(args: argparse.Namespace) -> int:
    """What this machine has, and which backend each config runs for training and sampling."""
    import jax

    from jaxchar.lstm.backends import choices, machine

    for name, value in machine().items():
        print(f"{name + ':':<22}{value}")
    for name in args.config or shipped_names():
        cfg = load_config(name)
        model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 64)
        print(f"\nconfig {name} (impl = {model.impl}, {model.layers} x {model.hidden}):")
        for purpose, choice in choices(model, jax.default_backend()).items():
            print(f"  {purpose + ':':<22}{choice.backend:<7} {choice.reason}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Training and generation speed of each config on this machine's default device."""
    from jaxchar.bench import bench as measure
    from jaxchar.bench import table

    names = args.config or (["fast"] if args.quick else shipped_names())

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


def add_parsers(sub) -> None:
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
    ev.set_defaults(func=evaluate)

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
    ex.set_defaults(func=export)

    pl = sub.add_parser(
        "plot",
        help="PNG of train/validation loss for one or more runs",
        description="Plot the training and validation loss of runs against steps and time.",
    )
    pl.add_argument("run_dirs", nargs="+", help="one or more runs' --run-dir")
    pl.add_argument("--output", default="loss.png", help="the PNG to write (default: loss.png)")
    add_common(pl)
    pl.set_defaults(func=plot)

    inf = sub.add_parser(
        "info",
        help="show a run's config and kept checkpoints",
        description="A run's config, vocabulary, kept checkpoints with their losses, and "
        "the backends it runs with on this machine.",
    )
    inf.add_argument("run_dir", help="the --run-dir of a training run")
    add_common(inf)
    inf.set_defaults(func=show)

    en = sub.add_parser(
        "env",
        help="show this machine (devices, CPU instruction sets, C++ kernels) and the backend "
        "each config runs",
        description="This machine's JAX devices, CPU instruction sets and C++ kernels, and "
        "the LSTM backend each config runs for training and sampling.",
    )
    en.add_argument(
        "--config",
        action="append",
        help="a config name or TOML file, repeatable (default: every shipped one)",
    )
    add_common(en)
    en.set_defaults(func=env)

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
        help="a config name or TOML file, repeatable (default: every shipped one; with "
        "--quick, fast)",
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
    be.set_defaults(func=bench)
