"""`jaxchar train | generate | info`: parse arguments, call the library, print.

Generated text alone goes to stdout; the summary, progress and logs go to stderr. Every
refusal is one line on stderr and a non-zero exit (a traceback only with --debug). The CLI is
the only place that reads environment variables (JAXCHAR_DATA, JAXCHAR_CACHE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from jaxchar.config import Config, ConfigError, load_config, override, shipped_dir
from jaxchar.version import __version__

REPO_CONFIGS = shipped_dir()
DEFAULT_CONFIG = "fast"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _err(message: str) -> None:
    print(f"jaxchar: error: {message}", file=sys.stderr)


def _info(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def resolve_config_path(spec: str) -> Path:
    """A config file path, or the name of a shipped one (small, stacked, fast, tiny, ...)."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        return path
    shipped = REPO_CONFIGS / f"{spec}.toml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in REPO_CONFIGS.glob("*.toml"))
    raise ConfigError(f"no config file {spec!r}: give a .toml path or one of {', '.join(names)}")


def build_config(args: argparse.Namespace) -> Config:
    cfg = load_config(resolve_config_path(args.config or DEFAULT_CONFIG))
    sets = []
    flag_fields = {  # flag -> section.key: the common fields have their own flags
        "epochs": "train.epochs",
        "max_steps": "train.max_steps",
        "batch_size": "train.batch_size",
        "seed": "train.seed",
        "learning_rate": "train.learning_rate",
        "val_fraction": "data.val_fraction",
        "seq_length": "data.seq_length",
        "encoding": "data.encoding",
        "layers": "model.layers",
        "hidden": "model.hidden",
        "dropout": "model.dropout",
        "input_encoding": "model.encoding",
        "errors": "data.errors",
    }
    for flag, key in flag_fields.items():
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    if args.keep_gutenberg_header:
        sets.append("data.strip_gutenberg=false")
    if args.lowercase is not None:
        sets.append(f"data.lowercase={args.lowercase}")
    if args.remove_punctuation:
        sets.append("data.remove_punctuation=true")
    if args.skip_nonfinite:
        sets.append("train.skip_nonfinite=true")
    if args.dtype:
        sets.append(f"model.dtype={args.dtype}")
    if args.shard_params:
        sets.append("train.shard_params=true")
    return override(cfg, sets + list(args.set or []))


class _StopFlag:
    """SIGINT/SIGTERM: the first asks the loop to save and stop; a second exits at once
    (orbax writes each checkpoint to a temporary folder and renames it, so nothing saved
    is damaged by leaving mid-write)."""

    def __init__(self, quiet: bool):
        self.stop, self.quiet = False, quiet

    def __call__(self, signum, frame) -> None:
        if self.stop:
            os._exit(EXIT_INTERRUPTED)
        self.stop = True
        _info("jaxchar: stopping: saving a checkpoint first (press Ctrl-C again to quit at once)")

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


class _Progress:
    """Progress on stderr: a tqdm bar on a terminal, plain periodic lines otherwise."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.tty = quiet, None, sys.stderr.isatty()

    def __call__(self, event: dict) -> None:
        if self.quiet:
            return
        kind = event["event"]
        if kind == "start":
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=event["total_steps"], initial=event["step"], unit="step")
            what = "resuming at" if event["step"] else "training from"
            _info(
                f"{what} step {event['step']} of {event['total_steps']} "
                f"({event['steps_per_epoch']} steps per epoch)"
            )
        elif kind == "progress":
            text = (
                f"epoch {event['epoch']} step {event['step']}/{event['total_steps']} "
                f"loss {event['loss']:.4f} nats/char {event['chars_per_s']:,.0f} chars/s"
            )
            if self.bar is not None:
                self.bar.n = event["step"]
                self.bar.set_postfix_str(
                    f"loss {event['loss']:.4f}, {event['chars_per_s']:,.0f} chars/s"
                )
            else:
                _info(text)
        elif kind == "save":
            line = (
                f"saved step {event['step']} (epoch {event['epoch']}): train loss "
                f"{event['train_loss']:.4f} nats/char ({event['train_bpc']:.3f} bits/char)"
            )
            if "val_loss" in event:
                line += f", val loss {event['val_loss']:.4f} ({event['val_bpc']:.3f} bits/char)"
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                _info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _start_devices(args: argparse.Namespace):
    """jax.distributed first (before any other JAX call), then the data-parallel mesh:
    all devices when there are several, none (plain single-device jit) otherwise."""
    from jaxchar import distributed

    if args.distributed:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    count = args.devices or jax.device_count()
    if count == 1 and jax.process_count() == 1:
        return None
    return distributed.make_mesh(count)


def cmd_train(args: argparse.Namespace) -> int:
    from jaxchar import distributed
    from jaxchar.checkpoint import RunDir
    from jaxchar.corpus import load_corpus, prepare, read_text, resolve_corpus
    from jaxchar.train import fit, with_vocab

    mesh = _start_devices(args)
    primary = distributed.is_primary()
    args.quiet = args.quiet or not primary  # only process 0 prints
    if args.resume:
        run = RunDir.open(args.run_dir)
        cfg = run.cfg
        if args.set or args.config:
            _info("note: --resume uses the run's stored config; --config/--set are ignored")
        corpus_path = resolve_corpus(args.corpus, os.environ.get("JAXCHAR_DATA"), _cache_dir())
        corpus = prepare(read_text(corpus_path, cfg.data.encoding, cfg.data.errors), cfg.data)
        if corpus.vocab != run.vocab:
            from jaxchar.corpus import CorpusError

            raise CorpusError(
                f"{corpus_path} does not give the run's vocabulary: resume with the same text"
            )
    else:
        cfg = build_config(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        corpus_path = resolve_corpus(args.corpus, os.environ.get("JAXCHAR_DATA"), _cache_dir())
        corpus = load_corpus(corpus_path, cfg.data)
        cfg = with_vocab(cfg, len(corpus.vocab))
        if args.run_dir is None:
            raise ConfigError("give --run-dir DIR: the folder where checkpoints are kept")
        _backend(cfg.model, "layer")  # a forced backend this machine lacks: refused here
        if distributed.is_single_process():
            run = RunDir.create(args.run_dir, cfg, corpus.vocab, overwrite=args.overwrite)
        else:  # files by process 0, then orbax's collective manager on every process
            if primary:
                RunDir.prepare(args.run_dir, cfg, corpus.vocab, overwrite=args.overwrite)
            distributed.barrier("jaxchar-run-dir")
            run = RunDir.open(args.run_dir)
        if primary:
            _write_corpus_note(run.path, corpus_path)
    _info(corpus.summary(cfg.data.seq_length), args.quiet)
    if args.resume:
        cfg = _runnable(cfg, args.quiet)
    choice = _backend(cfg.model, "layer")
    _info(f"backend: {choice.backend} ({choice.reason})", args.quiet)
    stop = _StopFlag(args.quiet)
    stop.install()
    progress = _Progress(args.quiet)
    hooks = []
    if cfg.train.sample_chars and distributed.is_single_process():
        seed_ids = corpus.train_ids[: cfg.data.seq_length]
        hooks.append(_TrainingSamples(run.path, cfg, run.vocab, seed_ids, args.quiet))
    if args.tensorboard and primary:
        hooks.append(_TensorBoard(run.path / "tensorboard"))

    def on_save(params, metrics: dict) -> None:
        for hook in hooks:
            hook(params, metrics)

    began = time.perf_counter()
    try:
        result = fit(
            cfg,
            corpus.train_ids,
            corpus.val_ids,
            checkpointer=run,
            log=progress,
            should_stop=lambda: stop.stop,
            mesh=mesh,
            on_save=on_save,
            train_spans=corpus.train_spans,
            val_spans=corpus.val_spans,
        )
    finally:
        progress.close()
        run.close()
    best = run.best_step()
    _info(
        f"done in {time.perf_counter() - began:.0f} s; checkpoints in {run.path} "
        f"(best: step {best})",
        args.quiet,
    )
    if result.interrupted:
        _info(
            f"interrupted: continue with  jaxchar train {args.corpus} --run-dir {run.path} --resume"
        )
        return EXIT_INTERRUPTED
    return 0


SAMPLE_TEMPERATURES = (0.2, 0.5, 1.0)  # the Keras example's "diversity" values


class _TrainingSamples:
    """At each save: a short sample per temperature from the opening of the text, shown on
    stderr and appended to RUN/samples.txt, so progress can be read, not only measured."""

    def __init__(self, run_path: Path, cfg: Config, vocab, seed_ids, quiet: bool):
        self.path, self.cfg, self.vocab, self.quiet = run_path / "samples.txt", cfg, vocab, quiet
        self.seed_ids = seed_ids

    def __call__(self, params, metrics: dict) -> None:
        import jax

        from jaxchar.sampling import sample

        mode = "window" if self.cfg.data.objective == "window" else "stateful"
        lines = [f"--- step {metrics['step']} (epoch {metrics['epoch']}) ---"]
        for i, temperature in enumerate(SAMPLE_TEMPERATURES):
            ids = sample(
                params,
                jax.random.PRNGKey(metrics["step"] + i),
                self.seed_ids,
                cfg=self.cfg.model,
                length=self.cfg.train.sample_chars,
                temperature=temperature,
                mode=mode,
                seq_length=self.cfg.data.seq_length,
            )
            lines.append(f"[temperature {temperature}] {self.vocab.decode(ids)!r}")
        text = "\n".join(lines)
        _info(text, self.quiet)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


class _TensorBoard:
    """--tensorboard: the saved metrics as TensorBoard scalars in RUN/tensorboard."""

    def __init__(self, folder: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs tensorboardX: pip install 'jaxchar[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(str(folder))

    def __call__(self, params, metrics: dict) -> None:
        for name, value in metrics.items():
            if isinstance(value, float) and name != "wall_s":
                self.writer.add_scalar(name, value, metrics["step"], walltime=None)
        self.writer.flush()


def _cache_dir() -> Path:
    if os.environ.get("JAXCHAR_CACHE"):
        return Path(os.environ["JAXCHAR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxchar"


def _write_corpus_note(run_path: Path, corpus_path: Path) -> None:
    """Where the text came from, so that `generate` can draw a seed window from it."""
    (run_path / "corpus.json").write_text(json.dumps({"path": str(Path(corpus_path).absolute())}))


def _random_window(run, length: int, rng) -> str | None:
    """A random window of the training text, as the tutorial's seed (None if unavailable)."""
    from jaxchar.corpus import CorpusError, prepare, read_text

    note = run.path / "corpus.json"
    try:
        path = json.loads(note.read_text())["path"]
        corpus = prepare(read_text(path, run.cfg.data.encoding, run.cfg.data.errors), run.cfg.data)
    except (OSError, KeyError, ValueError, CorpusError):
        return None
    ids = corpus.train_ids
    start = int(rng.integers(0, max(len(ids) - length, 1)))
    return run.vocab.decode(ids[start : start + length])


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from jaxchar.checkpoint import RunDir
    from jaxchar.config import SampleConfig

    run = RunDir.open(args.run_dir)
    cfg = _runnable(run.cfg, args.quiet)
    s = cfg.sample
    opts = SampleConfig(
        length=args.length if args.length is not None else s.length,
        temperature=args.temperature if args.temperature is not None else s.temperature,
        top_k=args.top_k if args.top_k is not None else s.top_k,
        top_p=args.top_p if args.top_p is not None else s.top_p,
        mode=args.mode or s.mode,
        num_samples=args.num_samples if args.num_samples is not None else s.num_samples,
    )
    if args.top_k is not None and not 1 <= args.top_k <= len(run.vocab):
        raise ConfigError(f"--top-k must be between 1 and the vocabulary size {len(run.vocab)}")
    with run:
        params, step = run.load_params(args.step)
    if args.prompt_file:
        from jaxchar.corpus import read_text

        prompt = read_text(args.prompt_file, corpus=False)
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = _random_window(run, cfg.data.seq_length, np.random.default_rng(args.seed))
        if prompt is None:
            prompt = run.vocab.chars[int(np.random.default_rng(args.seed).integers(len(run.vocab)))]
    args.lowercase_prompt = cfg.data.lowercase
    if cfg.data.lowercase:
        prompt = prompt.lower()
    if not prompt:
        raise ConfigError("the prompt is empty: give --prompt with at least one character")
    prompt_ids = run.vocab.encode(prompt, unknown=args.unknown)
    if len(prompt_ids) == 0:
        raise ConfigError("no character of the prompt is in the vocabulary")
    mode = (
        opts.mode
        if opts.mode != "auto"
        else ("window" if cfg.data.objective == "window" else "stateful")
    )
    model = dataclasses.replace(cfg.model, dtype=args.dtype) if args.dtype else cfg.model
    settings = {
        "cfg": model,
        "top_k": opts.top_k or None,
        "top_p": opts.top_p if opts.top_p < 1 else None,
        "mode": mode,
        "seq_length": cfg.data.seq_length,
    }
    if args.interactive:
        return _interactive(params, run.vocab, settings, opts, args)
    _info(f'checkpoint step {step}, {mode} mode; seed: "{prompt}"', args.quiet)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        _write_samples(params, run.vocab, prompt_ids, settings, opts, args.seed, out)
    finally:
        if args.output:
            out.close()
    return 0


def _write_samples(params, vocab, prompt_ids, settings, opts, seed: int, out) -> None:
    """One sample streams as it is made (jitted chunks); several are made as one batch."""
    import jax
    import numpy as np

    from jaxchar.sampling import sample, sample_stream

    key = jax.random.PRNGKey(seed)
    common = {**settings, "length": opts.length, "temperature": opts.temperature}
    if opts.num_samples == 1:
        for chunk in sample_stream(params, key, prompt_ids, **common):
            out.write(vocab.decode(np.asarray(chunk)))
            out.flush()
        out.write("\n")
        return
    rows = sample(params, key, prompt_ids, num_samples=opts.num_samples, **common)
    for i, row in enumerate(np.asarray(rows)):
        out.write(f"===== sample {i + 1} of {opts.num_samples} =====\n{vocab.decode(row)}\n")


def _interactive(params, vocab, settings, opts, args) -> int:
    """Read a prompt per line; `:temp T`, `:len N`, `:seed S` change settings; `:quit`."""
    import dataclasses

    seed = args.seed
    interactive = sys.stdin.isatty()
    if interactive:
        _info("type a prompt and press Enter; :temp T, :len N, :seed S, :quit")
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in (":quit", ":q"):
            return 0
        text = line.rstrip("\n")
        try:
            if text.startswith(":"):
                name, _, value = text[1:].partition(" ")
                field = {"temp": "temperature", "len": "length"}.get(name)
                if name == "seed":
                    seed = int(value)
                elif field:
                    kind = float if field == "temperature" else int
                    opts = dataclasses.replace(opts, **{field: kind(value)})
                else:
                    raise ConfigError(f"unknown command :{name} (:temp, :len, :seed, :quit)")
                _info(f"temperature {opts.temperature}, length {opts.length}, seed {seed}")
                continue
            if args.lowercase_prompt:
                text = text.lower()
            ids = vocab.encode(text, unknown=args.unknown)
            if len(ids) == 0:
                raise ConfigError("the prompt is empty")
            _write_samples(params, vocab, ids, settings, opts, seed, sys.stdout)
            sys.stdout.flush()
            seed += 1
        except (ConfigError, ValueError) as err:  # one bad line does not end the session
            _err(str(err))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from jaxchar.checkpoint import RunDir
    from jaxchar.corpus import normalize, read_text, sentence_spans, strip_gutenberg
    from jaxchar.train import LN2, evaluate

    with RunDir.open(args.run_dir) as run:
        params, step = run.load_params(args.step)
    d = run.cfg.data
    text = read_text(args.file, args.encoding or d.encoding, d.errors)
    if d.strip_gutenberg:
        text = strip_gutenberg(text)[0]
    ids = run.vocab.encode(normalize(text, d.lowercase, d.remove_punctuation), args.unknown)
    if len(ids) < d.seq_length + 1:
        raise ConfigError(f"{args.file} has fewer than seq_length + 1 = {d.seq_length + 1} chars")
    spans = None
    if d.objective == "sentences":
        spans = sentence_spans(ids, run.vocab, d.seq_length)
        if not len(spans):
            raise ConfigError(f"{args.file} has no sentence of two or more characters to score")
    loss = evaluate(params, _runnable(run.cfg, args.quiet), ids, spans)
    print(
        f"{args.file}: {loss:.4f} nats/char, {loss / LN2:.4f} bits/char "
        f"({len(ids)} characters, checkpoint step {step})"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxchar.checkpoint import export_run

    out = export_run(args.run_dir, args.out, args.step)
    _info(f"wrote {out}/params.npz, config.json, vocab.json")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
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
    _info(f"wrote {args.output}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from jaxchar.checkpoint import RunDir

    with RunDir.open(args.run_dir) as run:
        cfg = run.cfg
        best = run.best_step()
        print(f"run: {run.path} (written by jaxchar {run.written_by or 'before 0.2.0'})")
        print(f"this jaxchar: {__version__}")
        print(f"vocabulary ({len(run.vocab)}): {''.join(run.vocab.chars)!r}")
        print(f"monitored: {run.monitor} (lower is better)")
        for name, section in cfg.to_dict().items():
            print(f"[{name}] " + ", ".join(f"{k}={v}" for k, v in section.items()))
        print(f"{'step':>8} {'epoch':>6} {'train loss':>11} {'val loss':>9} {'bits/char':>9}")
        for step in run.steps():
            try:
                m = run.meta(step)["metrics"]
            except Exception:
                print(f"{step:>8} (damaged: cannot be read)")
                continue
            val = f"{m['val_loss']:.4f}" if "val_loss" in m else "-"
            bpc = m.get("val_bpc", m.get("train_bpc"))
            mark = "  <- best, used by generate" if step == best else ""
            print(f"{step:>8} {m['epoch']:>6} {m['train_loss']:>11.4f} {val:>9} {bpc:>9.3f}{mark}")
    import jax

    from jaxchar.lstm.backends import choices

    model = _runnable(cfg, args.quiet).model
    for purpose, choice in choices(model, jax.default_backend()).items():
        print(f"backend, {purpose}: {choice.backend} ({choice.reason})")
    return 0


def _backend(model, purpose: str):
    """jaxchar.lstm's choice for `model` on this machine (BackendError if forced and
    impossible)."""
    import jax

    from jaxchar.lstm import select

    return select(model, purpose, platform=jax.default_backend())


def _runnable(cfg: Config, quiet: bool) -> Config:
    """A stored run's config with a backend this machine can run (see lstm.backends)."""
    import jax

    from jaxchar.lstm.backends import runnable

    model, note = runnable(cfg.model, jax.default_backend())
    if note:
        _info(note, quiet)
    return dataclasses.replace(cfg, model=model)


def cmd_env(args: argparse.Namespace) -> int:
    """What this machine has, and which backend each config runs for training and sampling."""
    import jax

    from jaxchar.lstm.backends import choices, machine

    for name, value in machine().items():
        print(f"{name + ':':<22}{value}")
    names = args.config or sorted(p.stem for p in REPO_CONFIGS.glob("*.toml"))
    for name in names:
        cfg = load_config(resolve_config_path(name))
        model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 64)
        print(f"\nconfig {name} (impl = {model.impl}, {model.layers} x {model.hidden}):")
        for purpose, choice in choices(model, jax.default_backend()).items():
            print(f"  {purpose + ':':<22}{choice.backend:<7} {choice.reason}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--quiet", action="store_true", help="print only errors (and generated text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxchar",
        description="Train a character-level LSTM on a text file and generate text from it.",
    )
    parser.add_argument("--version", action="version", version=f"jaxchar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a model on a text file",
        description="Train on a text file (or `alice`, `shakespeare`); keeps the best checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument(
        "corpus", help="a text file, or alice / shakespeare (looked up in $JAXCHAR_DATA)"
    )
    t.add_argument("--run-dir", help="folder for checkpoints, config and metrics")
    t.add_argument("--config", help=f"a TOML file or a shipped name (default: {DEFAULT_CONFIG})")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    start.add_argument(
        "--overwrite", action="store_true", help="replace an existing run in --run-dir"
    )
    t.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    t.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to RUN/tensorboard",
    )
    g = t.add_argument_group("data")
    g.add_argument("--val-fraction", type=float, help="share of the text held out (from its end)")
    g.add_argument("--seq-length", type=int, help="characters of context")
    g.add_argument("--encoding", help="text encoding of the file")
    g.add_argument("--errors", choices=("strict", "replace", "ignore"), help="on undecodable bytes")
    g.add_argument("--keep-gutenberg-header", action="store_true", help="do not strip it")
    g.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--remove-punctuation", action="store_true")
    g = t.add_argument_group("model")
    g.add_argument("--layers", type=int, help="LSTM layers")
    g.add_argument("--hidden", type=int, help="units per LSTM layer")
    g.add_argument("--dropout", type=float, help="dropout after each LSTM layer")
    g.add_argument(
        "--input-encoding",
        choices=("scaled", "onehot", "embed"),
        help="scaled: id / vocab (the tutorial); onehot; embed (learned)",
    )
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", type=int, help="stop after this many steps in all")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--learning-rate", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="drop an update whose loss is NaN/inf instead of stopping",
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="matrix products in this type (params and loss stay float32)",
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
    _add_common(t)
    t.set_defaults(func=cmd_train)

    gen = sub.add_parser(
        "generate",
        help="generate text from a trained run",
        description="Generate text from a run's best checkpoint; the text alone goes to stdout.",
    )
    gen.add_argument("run_dir", help="the --run-dir of a training run")
    given = gen.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="text to start from (default: a random window of the text)")
    given.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--length", type=int, help="characters to generate (default 1000)")
    gen.add_argument("--temperature", type=float, help="0 = argmax, as the tutorial (default 0)")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely characters")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass, in (0, 1]")
    gen.add_argument("--num-samples", type=int, help="independent samples, generated as a batch")
    gen.add_argument("--mode", choices=("auto", "stateful", "window"))
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="matrix products in this type (default: the run's model.dtype); bfloat16 is "
        "faster on accelerators and on CPUs with bfloat16 instructions, and may change the text",
    )
    gen.add_argument("--step", type=int, help="use this checkpoint instead of the best")
    gen.add_argument(
        "--unknown",
        choices=("error", "skip"),
        default="error",
        help="prompt characters outside the vocabulary",
    )
    gen.add_argument("--output", help="write the text to this file instead of stdout")
    gen.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts from stdin, one per line; :temp T, :len N, :quit",
    )
    _add_common(gen)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("evaluate", help="loss and bits/char of a checkpoint on any text")
    ev.add_argument("run_dir")
    ev.add_argument("file", help="a text file (normalized as the run's training text)")
    ev.add_argument("--step", type=int, help="use this checkpoint instead of the best")
    ev.add_argument("--encoding", help="text encoding of the file")
    ev.add_argument("--unknown", choices=("error", "skip"), default="error")
    _add_common(ev)
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("export", help="params as .npz plus config and vocabulary as JSON")
    ex.add_argument("run_dir")
    ex.add_argument("out", help="a new folder")
    ex.add_argument("--step", type=int, help="use this checkpoint instead of the best")
    _add_common(ex)
    ex.set_defaults(func=cmd_export)

    pl = sub.add_parser("plot", help="PNG of train/validation loss for one or more runs")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--output", default="loss.png")
    _add_common(pl)
    pl.set_defaults(func=cmd_plot)

    info = sub.add_parser("info", help="show a run's config and kept checkpoints")
    info.add_argument("run_dir")
    _add_common(info)
    info.set_defaults(func=cmd_info)

    env = sub.add_parser(
        "env",
        help="show this machine (devices, CPU instruction sets, C++ kernels) and the backend "
        "each config runs",
    )
    env.add_argument(
        "--config", action="append", help="a config name or TOML file (default: every shipped one)"
    )
    _add_common(env)
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jaxchar.checkpoint import CheckpointError
    from jaxchar.corpus import CorpusError
    from jaxchar.distributed import DistributedError
    from jaxchar.lstm import BackendError
    from jaxchar.train import TrainingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # stdout closed early (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (
        ConfigError,
        CorpusError,
        CheckpointError,
        TrainingError,
        DistributedError,
        BackendError,
    ) as err:
        if args.debug:
            raise
        _err(str(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:  # anything unforeseen: still one line, unless --debug
        if args.debug:
            raise
        _err(f"unexpected {err.__class__.__name__}: {err} (run again with --debug for details)")
        return 1
