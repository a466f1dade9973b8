"""`jaxchar train CORPUS --run-dir DIR`: options to a config, then `jaxchar.run.train`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from jaxchar.cli.common import EXIT_INTERRUPTED, FROM_CONFIG, add_common, info
from jaxchar.config import DEFAULT_CONFIG, Config, ConfigError, load_config, override, shipped_names

# flag -> config field: the common fields have their own flags, under the field's own name
FLAG_FIELDS = {
    "val_fraction": "data.val_fraction",
    "seq_length": "data.seq_length",
    "encoding": "data.encoding",
    "errors": "data.errors",
    "lowercase": "data.lowercase",
    "layers": "model.layers",
    "hidden": "model.hidden",
    "dropout": "model.dropout",
    "input_encoding": "model.encoding",
    "dtype": "model.dtype",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate",
    "seed": "train.seed",
}
# switches -> the field and value they set
SWITCH_FIELDS = {
    "keep_gutenberg_header": "data.strip_gutenberg=false",
    "remove_punctuation": "data.remove_punctuation=true",
    "skip_nonfinite": "train.skip_nonfinite=true",
    "shard_params": "train.shard_params=true",
}


def build_config(args: argparse.Namespace) -> Config:
    """The --config file (or the default), with the flags and --set applied in that order."""
    cfg = load_config(args.config or DEFAULT_CONFIG)
    sets = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_FIELDS.items()]
    sets = [s for s, flag in zip(sets, FLAG_FIELDS, strict=True) if getattr(args, flag) is not None]
    sets += [value for flag, value in SWITCH_FIELDS.items() if getattr(args, flag)]
    return override(cfg, sets + list(args.set or []))


def resume_changes(args: argparse.Namespace) -> list[str]:
    """--resume keeps the run's stored config: the options that may change then (more
    epochs or steps) as `section.key=value`; any other config option is refused."""
    from jaxchar.run import RESUMABLE

    given = [f for f in FLAG_FIELDS if getattr(args, f) is not None]
    given += [f for f in SWITCH_FIELDS if getattr(args, f)]
    given += ["config"] * bool(args.config) + ["set"] * bool(args.set)
    fixed = [f for f in given if FLAG_FIELDS.get(f) not in RESUMABLE]
    if fixed:
        flags = ", ".join("--" + f.replace("_", "-") for f in fixed)
        raise ConfigError(
            f"--resume continues the run with its stored config, so {flags} cannot apply: "
            "only --epochs and --max-steps may change (or start a new run)"
        )
    return [f"{FLAG_FIELDS[f]}={getattr(args, f)}" for f in given]


def cache_dir() -> Path:
    if os.environ.get("JAXCHAR_CACHE"):
        return Path(os.environ["JAXCHAR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxchar"


class StopFlag:
    """SIGINT/SIGTERM: the first asks the loop to save and stop; a second exits at once
    (orbax writes each checkpoint to a temporary folder and renames it, so nothing saved
    is damaged by leaving mid-write)."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self, signum, frame) -> None:
        if self.stop:
            os._exit(EXIT_INTERRUPTED)
        self.stop = True
        info("jaxchar: stopping: saving a checkpoint first (press Ctrl-C again to quit at once)")

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


class Progress:
    """The training events on stderr: a tqdm bar on a terminal, plain periodic lines
    otherwise; saves, samples and notes as lines."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.tty = quiet, None, sys.stderr.isatty()

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            info(text)

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if self.quiet and kind != "note":
            return
        if kind in ("corpus", "backend", "samples"):
            self.line(event["text"])
        elif kind == "note":
            self.line(f"note: {event['text']}")
        elif kind == "start":
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=event["total_steps"], initial=event["step"], unit="step")
            what = "resuming at" if event["step"] else "training from"
            self.line(
                f"{what} step {event['step']} of {event['total_steps']} "
                f"({event['steps_per_epoch']} steps per epoch)"
            )
        elif kind == "progress":
            speed = f"{event['chars_per_s']:,.0f} chars/s"
            if self.bar is not None:
                self.bar.n = event["step"]
                self.bar.set_postfix_str(f"loss {event['loss']:.4f}, {speed}")
            else:
                info(
                    f"epoch {event['epoch']} step {event['step']}/{event['total_steps']} "
                    f"loss {event['loss']:.4f} nats/char {speed}"
                )
        elif kind == "save":
            text = (
                f"saved step {event['step']} (epoch {event['epoch']}): train loss "
                f"{event['train_loss']:.4f} nats/char ({event['train_bpc']:.3f} bits/char)"
            )
            if "val_loss" in event:
                text += f", val loss {event['val_loss']:.4f} ({event['val_bpc']:.3f} bits/char)"
                scored, whole = event["val_chars"], event["val_text_chars"]
                if scored < 0.95 * whole:  # train.eval_batches: say which part it measured
                    text += f" on the first {scored:,} of {whole:,} held-out characters"
            if event.get("interrupted"):
                text += " (mid-epoch, for resuming: validation runs at the next regular save)"
            self.line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        print(json.dumps(build_config(args).to_dict(), indent=2))
        return 0
    if args.run_dir is None:
        raise ConfigError("give --run-dir DIR: the folder where checkpoints are kept")
    cfg, changes = (None, resume_changes(args)) if args.resume else (build_config(args), [])

    from jaxchar import distributed
    from jaxchar.corpus import resolve_corpus
    from jaxchar.run import train_run

    mesh = distributed.start(
        args.distributed, args.coordinator, args.num_processes, args.process_id, args.devices
    )
    quiet = args.quiet or not distributed.is_primary()  # only process 0 prints
    corpus = resolve_corpus(args.corpus, os.environ.get("JAXCHAR_DATA"), cache_dir())
    stop, progress = StopFlag(), Progress(quiet)
    stop.install()
    began = time.perf_counter()
    try:
        trained = train_run(
            corpus,
            args.run_dir,
            cfg,
            resume=args.resume,
            changes=changes,
            overwrite=args.overwrite,
            mesh=mesh,
            log=progress,
            should_stop=lambda: stop.stop,
            tensorboard=args.tensorboard,
        )
    finally:
        progress.close()
    info(
        f"done in {time.perf_counter() - began:.0f} s; checkpoints in {trained.path} "
        f"(best: step {trained.best_step})",
        quiet,
    )
    if trained.interrupted:
        again = f"jaxchar train {args.corpus} --run-dir {trained.path} --resume"
        info(f"interrupted: continue with  {again}")
        return EXIT_INTERRUPTED
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a model on a text file",
        description="Train on a text file (or `alice`, `shakespeare`) and keep the best "
        f"checkpoints. Shipped configs: {', '.join(shipped_names())}. Options left out "
        "come from the config.",
    )
    t.add_argument(
        "corpus", help="a text file, or alice / shakespeare (looked up in $JAXCHAR_DATA)"
    )
    t.add_argument(
        "--run-dir",
        help="folder for checkpoints, config and metrics (required, except with --print-config)",
    )
    t.add_argument(
        "--config",
        help=f"a TOML file or a shipped config's name (default: {DEFAULT_CONFIG})",
    )
    start = t.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir with its config"
    )
    start.add_argument(
        "--overwrite", action="store_true", help="replace an existing run in --run-dir"
    )
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to RUN/tensorboard",
    )
    g = t.add_argument_group("data")
    g.add_argument(
        "--val-fraction",
        type=float,
        help=f"share of the text held out, from its end ({FROM_CONFIG})",
    )
    g.add_argument("--seq-length", type=int, help=f"characters of context ({FROM_CONFIG})")
    g.add_argument("--encoding", help=f"text encoding of the file ({FROM_CONFIG}: utf-8)")
    g.add_argument(
        "--errors",
        choices=("strict", "replace", "ignore"),
        help=f"what to do with undecodable bytes ({FROM_CONFIG}: strict)",
    )
    g.add_argument(
        "--keep-gutenberg-header",
        action="store_true",
        help="keep the Project Gutenberg header and footer (default: they are removed)",
    )
    g.add_argument(
        "--lowercase",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"lowercase the text, as the tutorial ({FROM_CONFIG})",
    )
    g.add_argument(
        "--remove-punctuation", action="store_true", help="drop punctuation from the text"
    )
    g = t.add_argument_group("model")
    g.add_argument("--layers", type=int, help=f"LSTM layers ({FROM_CONFIG})")
    g.add_argument("--hidden", type=int, help=f"units per LSTM layer ({FROM_CONFIG})")
    g.add_argument("--dropout", type=float, help=f"dropout after each LSTM layer ({FROM_CONFIG})")
    g.add_argument(
        "--input-encoding",
        choices=("scaled", "onehot", "embed"),
        help=f"scaled: id / vocab (the tutorial); onehot; embed, learned ({FROM_CONFIG})",
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help=f"matrix products in this type; params and loss stay float32 ({FROM_CONFIG})",
    )
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"passes over the text ({FROM_CONFIG})")
    g.add_argument(
        "--max-steps", type=int, help=f"stop after this many steps in all ({FROM_CONFIG})"
    )
    g.add_argument("--batch-size", type=int, help=f"rows per step ({FROM_CONFIG})")
    g.add_argument("--learning-rate", type=float, help=f"Adam's step size ({FROM_CONFIG})")
    g.add_argument(
        "--seed",
        type=int,
        help=f"the seed of initialization, data order and dropout ({FROM_CONFIG})",
    )
    g.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="drop an update whose loss is NaN/inf instead of stopping",
    )
    g = t.add_argument_group("devices and hosts")
    g.add_argument(
        "--devices", type=int, help="data-parallel over the first N devices (default: all of them)"
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (automatic on Slurm, Kubernetes, Cloud TPU)",
    )
    g.add_argument("--coordinator", help="with --distributed: ADDRESS:PORT of process 0")
    g.add_argument("--num-processes", type=int, help="with --distributed: processes in all")
    g.add_argument("--process-id", type=int, help="with --distributed: this process' index")
    g.add_argument(
        "--shard-params",
        action="store_true",
        help="split params and optimizer state over the devices (FSDP-style)",
    )
    g = t.add_argument_group("any field")
    g.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a config field, e.g. --set model.hidden=512 (repeatable)",
    )
    add_common(t)
    t.set_defaults(func=run)
