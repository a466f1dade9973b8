"""Training a run: `train_run` and its hooks (samples at each save, TensorBoard files),
and what resuming a run checks. It writes run directories; reading.py reads them.

    import jaxchar
    jaxchar.train_run("alice.txt", "runs/alice", jaxchar.load_config("fast"))
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from jaxchar import data
from jaxchar.checkpoint import RunDir
from jaxchar.config import Config, ConfigError, override
from jaxchar.corpus import (
    NAMED_CORPORA,
    Corpus,
    CorpusError,
    Vocab,
    load_corpus,
    resolve_corpus,
)
from jaxchar.lstm.backends import Choice, runnable, select
from jaxchar.sampling import sample
from jaxchar.train import FitResult, Sizing, fit, sized, with_vocab

Log = Callable[[dict], None]

SAMPLE_TEMPERATURES = (0.2, 0.5, 1.0)  # the Keras example's "diversity" values


def backend(cfg: Config, purpose: str = "layer", platform: str | None = None) -> Choice:
    """The LSTM backend `cfg` runs with on this machine (lstm.backends.select); a forced
    backend this machine lacks raises BackendError."""
    return select(cfg.model, purpose, platform=platform or jax.default_backend())


class TrainingSamples:
    """At each save: a short sample per temperature from the opening of the training text,
    appended to RUN/samples.txt and logged as {"event": "samples", "text": ...}, so that
    progress can be read, not only measured."""

    def __init__(self, path: Path, cfg: Config, vocab: Vocab, seed_ids: np.ndarray, log: Log):
        self.path, self.cfg, self.vocab, self.log = path / "samples.txt", cfg, vocab, log
        self.seed_ids, self.mode = seed_ids, data.objective(cfg).sampling_mode

    def __call__(self, params, metrics: dict) -> None:
        lines = [f"--- step {metrics['step']} (epoch {metrics['epoch']}) ---"]
        for i, temperature in enumerate(SAMPLE_TEMPERATURES):
            ids = sample(
                params,
                jax.random.PRNGKey(metrics["step"] + i),
                self.seed_ids,
                cfg=self.cfg.model,
                length=self.cfg.train.sample_chars,
                temperature=temperature,
                mode=self.mode,
                seq_length=self.cfg.data.seq_length,
            )
            lines.append(f"[temperature {temperature}] {self.vocab.decode(ids)!r}")
        text = "\n".join(lines)
        self.log({"event": "samples", "text": text})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


class TensorBoard:
    """The saved metrics as TensorBoard scalars in RUN/tensorboard (needs tensorboardX)."""

    def __init__(self, folder: Path):
        self.check()
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    @staticmethod
    def check() -> None:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise ConfigError(
                "TensorBoard logs need tensorboardX: pip install 'jaxchar[tensorboard]'"
            ) from None

    def __call__(self, params, metrics: dict) -> None:
        for name, value in metrics.items():
            if isinstance(value, float) and name != "wall_s":
                self.writer.add_scalar(name, value, metrics["step"], walltime=None)
        self.writer.flush()


@dataclass
class Trained:
    path: Path  # the run directory
    result: FitResult
    best_step: int | None

    @property
    def interrupted(self) -> bool:
        return self.result.interrupted


RESUMABLE = ("train.epochs", "train.max_steps")  # what may change when a run resumes


def _open_for_resume(
    path: str | Path,
    corpus_path: str | Path,
    changes: list[str],
    log: Log,
    given: Config | None = None,
):
    """The run's own config (with more epochs or steps when `changes` says so), and the
    text prepared with it: it must give the run's vocabulary, or the stored model would
    read the wrong characters. `changes` and a `given` config (the command that started the
    run, repeated with --resume) may restate the run's values: only those that differ from
    the run's and are not RESUMABLE are refused, naming both values."""
    run = RunDir.open(path)
    stored = run.cfg.to_dict()
    try:
        wanted = override(given if given is not None else run.cfg, changes).to_dict()
    except ConfigError:
        run.close()
        raise
    minutes = stored["train"]["minutes"]  # a run sized by time keeps the length it chose
    if minutes and wanted["train"]["minutes"] == minutes and not wanted["train"]["max_steps"]:
        wanted["train"]["max_steps"] = stored["train"]["max_steps"]
    differ = [
        (f"{section}.{name}", value, wanted[section][name])
        for section, fields in stored.items()
        for name, value in fields.items()
        if (section, name) != ("model", "vocab_size") and wanted[section][name] != value
    ]
    fixed = [d for d in differ if d[0] not in RESUMABLE]
    if fixed:
        run.close()
        said = "; ".join(
            f"{key}: the run has {old!r}, this asks {new!r}" for key, old, new in fixed
        )
        allowed = ", ".join(RESUMABLE)
        raise ConfigError(
            f"a resumed run keeps its config, and this differs ({said}): only {allowed} may "
            "change (or start a new run)"
        )
    if differ:
        cfg = override(run.cfg, [f"{key}={new}" for key, _, new in differ])
        for key, old, new in differ:
            log({"event": "note", "text": f"resuming with {key} = {new} (the run had {old})"})
        from jaxchar import distributed

        run.update_config(cfg, write=distributed.is_primary())
    d = run.cfg.data
    corpus = load_corpus(corpus_path, d)
    if corpus.vocab != run.vocab:
        run.close()
        raise CorpusError(
            f"{corpus_path} does not give the run's vocabulary: resume with the same text"
        )
    model, note = runnable(run.cfg.model, jax.default_backend())
    if note:
        log({"event": "note", "text": note})
    return run, dataclasses.replace(run.cfg, model=model), corpus


def sized_on(
    cfg: Config, corpus: Corpus, *, mesh=None, began: float | None = None
) -> tuple[Config, Sizing | None]:
    """jaxchar.train.sized on a prepared corpus' splits: cfg with the train.max_steps that
    train.minutes allows on this machine, and what was measured (None without minutes)."""
    return sized(
        cfg,
        corpus.train_ids,
        corpus.val_ids,
        train_spans=corpus.train_spans,
        val_spans=corpus.val_spans,
        mesh=mesh,
        began=began,
    )


def _create(
    path: str | Path, corpus_path: str | Path, cfg: Config, overwrite: bool, mesh, began: float
):
    """A new run directory for cfg, after every check that can refuse it has passed and
    the length train.minutes asks for is chosen (stored in the run's config), and what the
    choice measured (None without train.minutes)."""
    from jaxchar import distributed

    corpus = load_corpus(corpus_path, cfg.data)
    cfg = with_vocab(cfg, len(corpus.vocab))
    backend(cfg)  # a forced backend this machine lacks is refused before anything is written
    sizing = None
    if cfg.train.minutes:  # refusals first: the timing takes seconds
        if distributed.is_primary():
            RunDir.check_new(path, overwrite)
        cfg, sizing = sized_on(cfg, corpus, mesh=mesh, began=began)
    if distributed.is_single_process():
        run = RunDir.create(path, cfg, corpus.vocab, overwrite=overwrite)
    else:  # files by process 0, then orbax's collective manager on every process
        if distributed.is_primary():
            RunDir.prepare(path, cfg, corpus.vocab, overwrite=overwrite)
        distributed.barrier("jaxchar-run-dir")
        run = RunDir.open(path)
    if distributed.is_primary():
        run.record_corpus(corpus_path)
    return run, cfg, corpus, sizing


def train_run(
    corpus_path: str | Path,
    run_dir: str | Path,
    cfg: Config | None = None,
    *,
    resume: bool = False,
    changes: list[str] | None = None,
    overwrite: bool = False,
    mesh=None,
    log: Log | None = None,
    should_stop: Callable[[], bool] | None = None,
    tensorboard: bool = False,
) -> Trained:
    """Trains cfg (default: the `fast` config) on a text file (or `alice`, `shakespeare`: the
    package's own copies) into run_dir, or continues the run there (`resume`, with the run's
    stored config; `changes` such as ["train.epochs=30"] may raise its epochs or steps, and
    `cfg` or `changes` that restate the run's own values are accepted, as when a command is
    repeated with --resume; a value that differs from the run's is refused).
    `log` receives fit's events plus {"event": "corpus" | "backend" | "note" | "samples",
    "text": ...}; `should_stop` is polled between dispatches, and the run then saves and
    returns (interrupted)."""
    from jaxchar import distributed
    from jaxchar.config import load_config

    began = time.perf_counter()  # train.minutes counts from here
    log = log or (lambda event: None)
    if str(corpus_path) in NAMED_CORPORA:
        corpus_path = resolve_corpus(str(corpus_path), download=False)
    if tensorboard:  # refused before the run directory is touched
        TensorBoard.check()
    sizing = None
    if resume:  # a run sized by train.minutes keeps the length it chose
        run, cfg, corpus = _open_for_resume(run_dir, corpus_path, changes or [], log, cfg)
    else:
        cfg = cfg if cfg is not None else load_config("fast")
        run, cfg, corpus, sizing = _create(run_dir, corpus_path, cfg, overwrite, mesh, began)
    log({"event": "corpus", "text": corpus.summary(cfg.data.seq_length)})
    choice = backend(cfg)
    log({"event": "backend", "text": f"backend: {choice.backend} ({choice.reason})"})
    if sizing is not None:
        log(sizing.event())
    hooks = []
    if cfg.train.sample_chars and distributed.is_single_process():
        seed_ids = corpus.train_ids[: cfg.data.seq_length]
        hooks.append(TrainingSamples(run.path, cfg, run.vocab, seed_ids, log))
    if tensorboard and distributed.is_primary():
        hooks.append(TensorBoard(run.path / "tensorboard"))

    def on_save(params, metrics: dict) -> None:
        for hook in hooks:
            hook(params, metrics)

    def log_with_notes(event: dict) -> None:  # a resume's notes come before it starts
        if event["event"] == "start":
            for note in run.notes:
                log({"event": "note", "text": note})
        log(event)

    try:
        result = fit(
            cfg,
            corpus.train_ids,
            corpus.val_ids,
            checkpointer=run,
            log=log_with_notes,
            should_stop=should_stop,
            mesh=mesh,
            on_save=on_save,
            train_spans=corpus.train_spans,
            val_spans=corpus.val_spans,
            time_limit=sizing,
        )
    finally:
        run.close()
    return Trained(run.path, result, run.best_step())
