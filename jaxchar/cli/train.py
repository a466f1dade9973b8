"""`jaxchar train CORPUS --run-dir DIR`: options to a config, then `jaxchar.run.train_run`."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from jaxchar.cli.common import EXIT_INTERRUPTED, FROM_CONFIG, add_common, info
from jaxchar.cli.progress import Progress, StopFlag
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
    "minutes": "train.minutes",
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


def resume_request(args: argparse.Namespace) -> tuple[Config | None, list[str]]:
    """What a --resume command line says of the config: the --config it names (None if
    none) and its flags and --set as `section.key=value`. The run keeps its stored config:
    options that restate it are accepted (the command that started the run, repeated with
    --resume), more epochs or steps change it, and jaxchar.run refuses any other difference,
    naming the run's value and the given one."""
    sets = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_FIELDS.items()]
    sets = [s for s, flag in zip(sets, FLAG_FIELDS, strict=True) if getattr(args, flag) is not None]
    sets += [value for flag, value in SWITCH_FIELDS.items() if getattr(args, flag)]
    return (load_config(args.config) if args.config else None), sets + list(args.set or [])


def cache_dir() -> Path:
    if os.environ.get("JAXCHAR_CACHE"):
        return Path(os.environ["JAXCHAR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxchar"


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        print(json.dumps(build_config(args).to_dict(), indent=2))
        return 0
    if args.run_dir is None:
        raise ConfigError("give --run-dir DIR: the folder where checkpoints are kept")
    cfg, changes = resume_request(args) if args.resume else (build_config(args), [])

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
        if trained.result.time_up:  # stopped where the user asked: not a failure
            info(f"the time is up before the schedule's end: finish it with  {again}")
            return 0
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
    t.add_argument("corpus", help="a text file, or alice / shakespeare (shipped with jaxchar)")
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
    g.add_argument(
        "--minutes",
        type=float,
        help="train for about this long on this machine: the steps that fit are timed first "
        f"and replace --epochs ({FROM_CONFIG}: train.minutes, 0 = off)",
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
