"""Reading a trained run: `Run` knows a run's config, vocabulary, checkpoints and the
sampling settings its config gives (mode, temperature, top-k, top-p, length), so Python and
`jaxchar generate` give the same text for the same run, prompt and seed; `evaluate`,
`export` and the serving engine read runs through it too."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxchar import data
from jaxchar.beam import beam_search
from jaxchar.checkpoint import CheckpointError, RunDir, write_export
from jaxchar.config import Config, ConfigError, SampleConfig, check_seed
from jaxchar.corpus import (
    CorpusError,
    encode_text,
    prepare,
    read_text,
)
from jaxchar.lstm.backends import runnable
from jaxchar.sampling import sample, sample_stream
from jaxchar.train import LN2, score


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
        checked; mode "auto" resolved to what the run was trained for. The result is what
        `generate`, `stream`, `stream_rows` and the serving engine take as `opts`."""
        given = {k: v for k, v in overrides.items() if v is not None}
        opts = dataclasses.replace(self.cfg.sample, **given)
        if opts.top_k and not 1 <= opts.top_k <= len(self.vocab):  # 0 is off, everywhere
            raise ConfigError(
                f"top_k must be between 0 (off) and the vocabulary size {len(self.vocab)}, "
                f"not {opts.top_k}"
            )
        if opts.mode == "auto":
            opts = dataclasses.replace(opts, mode=data.objective(self.cfg).sampling_mode)
        return opts

    def _resolve(self, opts: SampleConfig | None, overrides: dict[str, Any]) -> SampleConfig:
        """`opts` as given (from `options`), or `options(**overrides)`."""
        if opts is None:
            return self.options(**overrides)
        if any(v is not None for v in overrides.values()):
            raise TypeError("give opts or single options, not both")
        return opts if opts.mode != "auto" else self.options(**dataclasses.asdict(opts))

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

    def _sampling(self, prompt, seed, step, dtype, unknown, opts: SampleConfig):
        params, _ = self.params(step)
        model = dataclasses.replace(self.cfg.model, dtype=dtype) if dtype else self.cfg.model
        settings = {
            "cfg": model,
            "length": opts.length,
            "temperature": opts.temperature,
            "top_k": opts.top_k,
            "top_p": opts.top_p,
            "mode": opts.mode,
            "seq_length": self.cfg.data.seq_length,
        }
        ids = self.encode_prompt(self.default_prompt(seed) if prompt is None else prompt, unknown)
        return params, jax.random.PRNGKey(check_seed(seed)), ids, settings

    def generate(
        self,
        prompt: str | None = None,
        *,
        seed: int = 0,
        step: int | None = None,
        dtype: str | None = None,
        unknown: str = "error",
        opts: SampleConfig | None = None,
        **options: Any,
    ) -> list[str]:
        """num_samples texts (default the run's, usually 1) continuing `prompt` (default: a
        window of the training text drawn by `seed`), made as one batch. `options` are
        [sample] fields: length, temperature, top_k, top_p, mode, num_samples; or give
        `opts`, made by `options(...)`."""
        opts = self._resolve(opts, options)
        params, key, ids, settings = self._sampling(prompt, seed, step, dtype, unknown, opts)
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
        opts: SampleConfig | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """One text, in pieces as it is made (jitted chunks); the same text as
        `generate(...)[0]` with one sample (num_samples is not used)."""
        opts = self._resolve(opts, options)
        params, key, ids, settings = self._sampling(prompt, seed, step, dtype, unknown, opts)
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
        opts: SampleConfig | None = None,
        **options: Any,
    ) -> Iterator[list[str]]:
        """num_samples texts made together, in pieces: each item is one piece per sample.
        Joined, the pieces are `generate(...)`'s texts; memory stays that of a piece, not
        of the whole length, and the caller may stop between pieces."""
        opts = self._resolve(opts, options)
        params, key, ids, settings = self._sampling(prompt, seed, step, dtype, unknown, opts)
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
