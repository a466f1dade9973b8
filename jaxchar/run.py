"""A run as one object: everything the command line does, one call away.

    import jaxchar
    jaxchar.train_run("alice.txt", "runs/alice", jaxchar.load_config("fast"))
    run = jaxchar.Run.open("runs/alice")
    print(run.generate("alice was ", seed=0))       # the text `jaxchar generate` prints
    print(run.evaluate("other.txt").loss)            # nats/char

`Run` knows a run's config, vocabulary, checkpoints and the sampling settings its config
gives (mode, temperature, top-k, top-p, length), so Python and `jaxchar generate` give the
same text for the same run, prompt and seed. This is the layer above the pure modules: it
reads and writes run directories and corpora, and nothing below imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxchar import data
from jaxchar.beam import beam_search
from jaxchar.checkpoint import CheckpointError, RunDir, write_export
from jaxchar.config import Config, ConfigError, SampleConfig, check_seed, override
from jaxchar.corpus import (
    NAMED_CORPORA,
    CorpusError,
    Vocab,
    encode_text,
    load_corpus,
    prepare,
    read_text,
    resolve_corpus,
)
from jaxchar.lstm.backends import Choice, runnable, select
from jaxchar.sampling import sample, sample_stream
from jaxchar.train import LN2, FitResult, fit, score, with_vocab

Log = Callable[[dict], None]

SAMPLE_TEMPERATURES = (0.2, 0.5, 1.0)  # the Keras example's "diversity" values


def backend(cfg: Config, purpose: str = "layer", platform: str | None = None) -> Choice:
    """The LSTM backend `cfg` runs with on this machine (lstm.backends.select); a forced
    backend this machine lacks raises BackendError."""
    return select(cfg.model, purpose, platform=platform or jax.default_backend())


@dataclass(frozen=True)
class Evaluation:
    loss: float  # nats/char
    chars: int  # characters scored
    step: int  # the checkpoint's step

    @property
    def bpc(self) -> float:  # bits/char
        return self.loss / LN2


class Run:
    """A trained (or training) run directory, read back: `Run.open(path)`."""

    def __init__(self, run_dir: RunDir, platform: str | None = None):
        self.dir = run_dir
        self.path, self.vocab = run_dir.path, run_dir.vocab
        self.stored_cfg = run_dir.cfg
        # a run stored with a backend this machine lacks (cuDNN, on a laptop) runs with the
        # one `auto` picks; `note` says so (None when nothing changed)
        model, self.note = runnable(run_dir.cfg.model, platform or jax.default_backend())
        self.cfg: Config = dataclasses.replace(run_dir.cfg, model=model)
        self._params: dict[int | None, tuple[Any, int]] = {}

    @classmethod
    def open(cls, path: str | Path, platform: str | None = None) -> Run:
        return cls(RunDir.open(path), platform)

    def close(self) -> None:
        self.dir.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- what the run holds ---------------------------------------------------------------

    def params(self, step: int | None = None) -> tuple[Any, int]:
        """(params, step) of checkpoint `step`, default the best one (read once, then kept)."""
        if step not in self._params:
            self._params[step] = self.dir.load_params(step)
        return self._params[step]

    def best_step(self) -> int | None:
        """The step `generate` uses by default: the best readable checkpoint (None if the
        run has none)."""
        try:
            return self.params()[1]
        except CheckpointError:
            return None

    @property
    def notes(self) -> list[str]:
        """One line per damaged checkpoint passed over so far."""
        return self.dir.notes

    def damage(self, step: int) -> str | None:
        """What makes checkpoint `step` unusable ("its metrics", "its params", parameters
        that do not fit this run's model), or None."""
        try:
            self.metrics(step)
        except Exception:
            return "its metrics cannot be read"
        if why := self.dir.misfit(step):
            return why
        try:
            self.dir.read_params(step)
        except CheckpointError:
            return "its params cannot be read"
        return None

    def export(self, out_dir: str | Path, step: int | None = None) -> Path:
        """`jaxchar export`: params.npz, config.json and vocab.json of a checkpoint."""
        params, _ = self.params(step)
        return write_export(params, self.stored_cfg, self.vocab, out_dir)

    def steps(self) -> list[int]:
        return self.dir.steps()

    def metrics(self, step: int) -> dict:
        """The metrics saved with checkpoint `step` (CheckpointError if it cannot be read)."""
        return self.dir.meta(step)["metrics"]

    # --- generation ---------------------------------------------------------------------------

    def options(self, **overrides: Any) -> SampleConfig:
        """The run's [sample] settings with the given fields replaced (None keeps the run's),
        checked; mode "auto" resolved to what the run was trained for."""
        given = {k: v for k, v in overrides.items() if v is not None}
        opts = dataclasses.replace(self.cfg.sample, **given)
        if opts.top_k and not 1 <= opts.top_k <= len(self.vocab):  # 0 is off, everywhere
            raise ConfigError(
                f"top_k must be between 1 and the vocabulary size {len(self.vocab)} (0: off)"
            )
        if opts.mode == "auto":
            opts = dataclasses.replace(opts, mode=data.objective(self.cfg).sampling_mode)
        return opts

    def encode_prompt(self, prompt: str, unknown: str = "error") -> np.ndarray:
        """The prompt's ids, lowercased first when the run was trained lowercased."""
        if self.cfg.data.lowercase:
            prompt = prompt.lower()
        if not prompt:
            raise ConfigError("the prompt is empty: give at least one character")
        ids = self.vocab.encode(prompt, unknown=unknown)
        if len(ids) == 0:
            raise ConfigError("no character of the prompt is in the vocabulary")
        return ids

    def default_prompt(self, seed: int = 0) -> str:
        """The tutorial's seed: a random seq_length window of the training text (drawn by
        `seed`), or one random character of the vocabulary when the text is not at hand."""
        rng = np.random.default_rng(check_seed(seed))
        path, d = self.dir.corpus_path(), self.cfg.data
        try:
            ids = prepare(read_text(path, d.encoding, d.errors), d).train_ids if path else None
        except (OSError, ValueError, CorpusError):
            ids = None
        if ids is None:
            return self.vocab.chars[int(rng.integers(len(self.vocab)))]
        start = int(rng.integers(0, max(len(ids) - d.seq_length, 1)))
        return self.vocab.decode(ids[start : start + d.seq_length])

    def _sampling(self, prompt, seed, step, dtype, unknown, overrides):
        opts = self.options(**overrides)
        params, _ = self.params(step)
        model = dataclasses.replace(self.cfg.model, dtype=dtype) if dtype else self.cfg.model
        settings = {
            "cfg": model,
            "length": opts.length,
            "temperature": opts.temperature,
            "top_k": opts.top_k or None,
            "top_p": opts.top_p if opts.top_p < 1 else None,
            "mode": opts.mode,
            "seq_length": self.cfg.data.seq_length,
        }
        ids = self.encode_prompt(self.default_prompt(seed) if prompt is None else prompt, unknown)
        return params, jax.random.PRNGKey(check_seed(seed)), ids, settings, opts

    def generate(
        self,
        prompt: str | None = None,
        *,
        seed: int = 0,
        step: int | None = None,
        dtype: str | None = None,
        unknown: str = "error",
        **options: Any,
    ) -> list[str]:
        """num_samples texts (default the run's, usually 1) continuing `prompt` (default: a
        window of the training text drawn by `seed`), made as one batch. `options` are
        [sample] fields: length, temperature, top_k, top_p, mode, num_samples."""
        params, key, ids, settings, opts = self._sampling(
            prompt, seed, step, dtype, unknown, options
        )
        rows = sample(params, key, ids, num_samples=opts.num_samples, **settings)
        rows = np.asarray(rows).reshape(opts.num_samples, -1)
        return [self.vocab.decode(row) for row in rows]

    def beam(
        self,
        prompt: str | None = None,
        *,
        beam: int,
        length: int | None = None,
        results: int = 1,
        stop: str | None = None,
        length_penalty: float = 0.0,
        seed: int = 0,
        step: int | None = None,
        dtype: str | None = None,
        unknown: str = "error",
    ) -> list[tuple[str, float]]:
        """The `results` most likely continuations (of `beam` kept, `results` <= beam) of
        `length` characters (default the run's), best first, each with its total
        log-probability (nats): `jaxchar.beam_search` with the run's decoder (window mode
        for window-trained runs, as `generate`). `stop`, one character of
        the vocabulary, ends a hypothesis there (see jaxchar.beam)."""
        if not 1 <= results <= beam:
            raise ConfigError(f"results must be between 1 and the beam width {beam}")
        opts = self.options(length=length)
        params, _ = self.params(step)
        model = dataclasses.replace(self.cfg.model, dtype=dtype) if dtype else self.cfg.model
        ids = self.encode_prompt(self.default_prompt(seed) if prompt is None else prompt, unknown)
        stop_id = None
        if stop is not None:
            if len(stop) != 1 or stop not in self.vocab.chars:
                raise ConfigError(f"stop must be one character of the vocabulary, not {stop!r}")
            stop_id = self.vocab.chars.index(stop)
        found = beam_search(
            params,
            ids,
            cfg=model,
            length=opts.length,
            beam=beam,
            stop_id=stop_id,
            length_penalty=length_penalty,
            mode=opts.mode,  # the run's decoder: window for window-trained runs
            seq_length=self.cfg.data.seq_length,
        )
        ids, totals, lengths = (np.asarray(x) for x in found[:3])
        return [
            (self.vocab.decode(ids[i, : int(lengths[i])]), float(totals[i])) for i in range(results)
        ]

    def stream(
        self,
        prompt: str | None = None,
        *,
        seed: int = 0,
        step: int | None = None,
        dtype: str | None = None,
        unknown: str = "error",
        **options: Any,
    ) -> Iterator[str]:
        """One text, in pieces as it is made (jitted chunks); the same text as
        `generate(...)[0]` with one sample."""
        options = {**options, "num_samples": None}
        params, key, ids, settings, _ = self._sampling(prompt, seed, step, dtype, unknown, options)
        for chunk in sample_stream(params, key, ids, **settings):
            yield self.vocab.decode(np.asarray(chunk))

    def stream_rows(
        self,
        prompt: str | None = None,
        *,
        seed: int = 0,
        step: int | None = None,
        dtype: str | None = None,
        unknown: str = "error",
        **options: Any,
    ) -> Iterator[list[str]]:
        """num_samples texts made together, in pieces: each item is one piece per sample.
        Joined, the pieces are `generate(...)`'s texts; memory stays that of a piece, not
        of the whole length, and the caller may stop between pieces."""
        params, key, ids, settings, opts = self._sampling(
            prompt, seed, step, dtype, unknown, options
        )
        rows = opts.num_samples
        for chunk in sample_stream(params, key, ids, num_samples=rows, **settings):
            chunk = np.asarray(chunk).reshape(rows, -1)
            yield [self.vocab.decode(row) for row in chunk]

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(
        self,
        text: str | None = None,
        *,
        file: str | Path | None = None,
        step: int | None = None,
        encoding: str | None = None,
        unknown: str = "error",
        context: int | None = None,
    ) -> Evaluation:
        """Loss of a checkpoint on a text (or a file's text), prepared as the training text:
        as training scores its held-out text (the same number for the same text), or with
        `context`, in-order chunks each read from a fresh state, so that every character
        but the first is scored once, with 1 to `context` characters before it."""
        d = self.cfg.data
        if file is not None:
            text = read_text(file, encoding or d.encoding, d.errors)
        if text is None:
            raise ConfigError("give a text or a file to evaluate")
        ids, spans = encode_text(text, d, self.vocab, unknown)
        params, step = self.params(step)
        result = score(params, self.cfg, ids, None if context else spans, context)
        return Evaluation(result.loss, result.chars, step)


# --- training -------------------------------------------------------------------------------


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


def _create(path: str | Path, corpus_path: str | Path, cfg: Config, overwrite: bool):
    """A new run directory for cfg, after every check that can refuse it has passed."""
    from jaxchar import distributed

    corpus = load_corpus(corpus_path, cfg.data)
    cfg = with_vocab(cfg, len(corpus.vocab))
    backend(cfg)  # a forced backend this machine lacks is refused before anything is written
    if distributed.is_single_process():
        run = RunDir.create(path, cfg, corpus.vocab, overwrite=overwrite)
    else:  # files by process 0, then orbax's collective manager on every process
        if distributed.is_primary():
            RunDir.prepare(path, cfg, corpus.vocab, overwrite=overwrite)
        distributed.barrier("jaxchar-run-dir")
        run = RunDir.open(path)
    if distributed.is_primary():
        run.record_corpus(corpus_path)
    return run, cfg, corpus


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

    log = log or (lambda event: None)
    if str(corpus_path) in NAMED_CORPORA:
        corpus_path = resolve_corpus(str(corpus_path), download=False)
    if tensorboard:  # refused before the run directory is touched
        TensorBoard.check()
    if resume:
        run, cfg, corpus = _open_for_resume(run_dir, corpus_path, changes or [], log, cfg)
    else:
        cfg = cfg if cfg is not None else load_config("fast")
        run, cfg, corpus = _create(run_dir, corpus_path, cfg, overwrite)
    log({"event": "corpus", "text": corpus.summary(cfg.data.seq_length)})
    choice = backend(cfg)
    log({"event": "backend", "text": f"backend: {choice.backend} ({choice.reason})"})
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
        )
    finally:
        run.close()
    return Trained(run.path, result, run.best_step())
