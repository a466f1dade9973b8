"""Run directories: orbax checkpoints plus the JSON that makes them self-describing.

Layout of a run directory:
    run.json              format version, config, vocabulary, monitored metric
    metrics.jsonl         one line per save (step, epoch, losses in nats and bits per char)
    checkpoints/<step>/   orbax: `params`, `train` (optimizer state, step, loss sums, carry)
                          and `meta` (JSON: format version, config, vocab, metrics)

Kept: the best `train.keep_best` saves by the monitored loss (validation loss when there is
a held-out split, else training loss, as the tutorial's ModelCheckpoint) and the latest one,
for resuming, ranked by the metrics in each save's `meta`, so a resumed run ranks its earlier
saves too. Nothing here uses pickle; loading never runs code from the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxchar.config import Config, ConfigError, from_dict
from jaxchar.corpus import Vocab
from jaxchar.version import __version__

FORMAT_VERSION = 1
RUN_FILE = "run.json"
CORPUS_FILE = "corpus.json"  # where the training text came from


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be used, with what to do about it."""


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json_atomic(path: Path, value: Any) -> None:
    _write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _why(err: Exception) -> str:
    """A damaged checkpoint's error in a few words (orbax's messages run to pages)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    first = first if len(first) <= 80 else first[:77] + "..."
    return f"{err.__class__.__name__}: {first}" if first else err.__class__.__name__


def _read_run_file(path: Path) -> dict:
    run_file = path / RUN_FILE
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give the --run-dir of a training run")
    if not run_file.is_file():
        raise CheckpointError(f"{path} is not a jaxchar run (no {RUN_FILE} in it)")
    try:
        info = json.loads(run_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{run_file} is damaged (not JSON): the run cannot be read") from None
    _check_version(info.get("format_version"), run_file)
    return info


def _check_version(version: Any, where: Path) -> None:
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format version {version!r}; this jaxchar reads version "
            f"{FORMAT_VERSION}: use the jaxchar release that wrote it"
        )


def _config_from(info: dict, where: Path) -> Config:
    try:
        return from_dict(info["config"])
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{where}: the stored config is not usable ({err})") from None


def _rank_value(metrics: dict, monitor: str) -> float | None:
    """What a save is ranked by: its monitored loss; +inf (kept only while it is the
    latest, never the best) for a save made on interruption, whose training loss covers
    part of an epoch and which has no validation loss."""
    return math.inf if metrics.get("interrupted") else metrics.get(monitor)


class RunDir:
    """One training run on disk. `create` starts a new one (refusing to replace an existing
    run unless `overwrite`), `open` reads or resumes an existing one."""

    def __init__(self, path: Path, cfg: Config, vocab: Vocab, monitor: str):
        self.path, self.cfg, self.vocab, self.monitor = path, cfg, vocab, monitor
        self.written_by: str | None = __version__  # the jaxchar that created the run
        # orbax keeps every save; `_prune` applies keep-best itself, by the metrics in each
        # save's own `meta`. (orbax 0.12 writes a preservation policy's metrics nowhere, so
        # after --resume its BestN saw the earlier saves without them and deleted the best.)
        options = ocp.CheckpointManagerOptions(create=True)
        self._scores: dict[int, float | None] = {}
        self._misfits: dict[int, str | None] = {}  # see `misfit`
        self._want: dict[str, tuple] | None = None  # the model's parameter shapes
        self.notes: list[str] = []  # one line per damaged checkpoint passed over
        self.damaged: set[int] = set()  # steps found unreadable
        self.manager = ocp.CheckpointManager(path / "checkpoints", options=options)

    @classmethod
    def create(cls, path: str | Path, cfg: Config, vocab: Vocab, overwrite: bool = False):
        """A new run directory (one process; with several, see `prepare`)."""
        path, monitor = cls.prepare(path, cfg, vocab, overwrite)
        return cls(path, cfg, vocab, monitor)

    @staticmethod
    def check_new(path: str | Path, overwrite: bool = False) -> Path:
        """The absolute path, once sure a new run may be laid out there (nothing is
        touched): a new or empty folder, or with `overwrite` an earlier run."""
        path = Path(path).absolute()
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"{path} is a file: give a new folder as the run directory")
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise CheckpointError(
                    f"{path} already exists: pass --resume to continue it, --overwrite to "
                    "replace it, or choose another --run-dir"
                )
            if not (path / RUN_FILE).is_file():
                raise CheckpointError(
                    f"{path} is not empty and not a jaxchar run: --overwrite only replaces runs"
                )
        return path

    @staticmethod
    def prepare(
        path: str | Path, cfg: Config, vocab: Vocab, overwrite: bool = False
    ) -> tuple[Path, str]:
        """Checks and lays out a new run directory with its run.json, without orbax: with
        several processes, process 0 calls this, then every process calls `open` (orbax's
        manager is collective)."""
        path = RunDir.check_new(path, overwrite)
        if path.exists() and any(path.iterdir()):
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_bytes(b"0" * 4096)
            probe.unlink()
        except OSError as err:
            raise CheckpointError(f"cannot write to {path}: {err.strerror or err}") from None
        monitor = "val_loss" if cfg.data.val_fraction > 0 else "train_loss"
        info = {
            "format_version": FORMAT_VERSION,
            "jaxchar_version": __version__,
            "config": cfg.to_dict(),
            "vocab": list(vocab.chars),
            "monitor": monitor,
        }
        _write_json_atomic(path / RUN_FILE, info)
        return path, monitor

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path).absolute()
        info = _read_run_file(path)
        cfg = _config_from(info, path / RUN_FILE)
        run = cls(path, cfg, Vocab(tuple(info["vocab"])), info["monitor"])
        run.written_by = info.get("jaxchar_version")  # None: before versions were stored
        return run

    def update_config(self, cfg: Config, write: bool = True) -> None:
        """Replaces the stored config (a resumed run given more epochs or steps); `write`
        False (every process but the first) changes it in memory only."""
        if write:
            info = _read_run_file(self.path)
            info["config"] = cfg.to_dict()
            _write_json_atomic(self.path / RUN_FILE, info)
        self.cfg = cfg

    def record_corpus(self, corpus_path: str | Path) -> None:
        """Notes where the training text came from (corpus.json), so that generation can
        draw its default prompt from the text."""
        note = {"path": str(Path(corpus_path).absolute())}
        _write_json_atomic(self.path / CORPUS_FILE, note)

    def corpus_path(self) -> Path | None:
        """The training text's path as recorded at creation (None if unknown)."""
        try:
            return Path(json.loads((self.path / CORPUS_FILE).read_text())["path"])
        except (OSError, KeyError, TypeError, ValueError):
            return None

    # --- saving -------------------------------------------------------------------------

    def save(self, step: int, tree: dict, metrics: dict) -> None:
        """Saves {"state": TrainState, "totals": ..., "weights": the params readers load
        (train.ema: the moving average; default: the state's)} with its metrics, then
        waits for it."""
        state = tree["state"]
        train_part = {
            **self._raw_params(state),
            "opt_state": state.opt_state,
            "step": state.step,
            "carry": state.carry,
            "totals": tree["totals"],
            # the root key: with the step it fixes every later batch and dropout mask
            "rng": np.asarray(jax.random.key_data(jax.random.PRNGKey(self.cfg.train.seed))),
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "jaxchar_version": __version__,
            "config": self.cfg.to_dict(),
            "vocab": list(self.vocab.chars),
            "metrics": metrics,
        }
        if step in self.steps():  # a damaged save that resuming passed over: replace it
            self.manager.delete(step)
            self._scores.pop(step, None)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(tree.get("weights", state.params)),
                train=ocp.args.StandardSave(train_part),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        self._scores[step] = _rank_value(metrics, self.monitor)
        self._misfits[step] = None  # this run's own model wrote it
        self._prune()
        if jax.process_index() == 0:  # orbax saves collectively; the log has one writer
            with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")

    # --- reading ------------------------------------------------------------------------

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        _check_version(meta.get("format_version"), self.path / "checkpoints" / str(step))
        return meta

    def misfit(self, step: int) -> str | None:
        """Why checkpoint `step`'s parameters (names, shapes, dtypes, read from orbax's
        metadata without loading them) do not fit this run's model, or None: a checkpoint
        of another run copied into this one is unusable like a damaged one."""
        if step not in self._misfits:
            try:
                got = _param_shapes(self.path / "checkpoints" / str(step) / "params")
            except Exception:  # unreadable: the damaged checkpoint's paths report it
                got = None
            want = self._want or _model_shapes(self.cfg)
            self._want = want
            why = None if got is None else _difference(want, got)
            if why and not self._readable(step):  # damaged metadata can look like another
                why = None  # model's: an unreadable save is the damaged one's case instead
            self._misfits[step] = why
        return self._misfits[step]

    def _readable(self, step: int) -> bool:
        """Whether the saved params of `step` can be read at all, whatever their shapes."""
        try:
            self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
        except Exception:
            return False
        return True

    def _score(self, step: int) -> float | None:
        """The step's monitored loss from its `meta` (+inf if not finite); None when the
        save cannot be read or does not fit the model."""
        if step not in self._scores:
            try:
                if self.misfit(step):  # never the best, never deleted by `_prune`
                    raise CheckpointError(self.misfit(step))
                self._scores[step] = _rank_value(self.meta(step)["metrics"], self.monitor)
            except Exception:  # damaged: never the best, never deleted by `_prune`
                self._scores[step] = None
        value = self._scores[step]
        return None if value is None else (value if math.isfinite(value) else math.inf)

    def _ranked(self, steps: list[int]) -> list[int]:
        """The readable steps, best (lowest monitored loss) first; ties go to the older."""
        scored = [(v, s) for s in steps if (v := self._score(s)) is not None]
        return [s for _, s in sorted(scored)]

    def _prune(self) -> None:
        """Deletes every readable save that is neither among the `keep_best` lowest losses
        nor the latest (which resuming needs). Every process calls it: deletion is collective."""
        steps = self.steps()
        ranked = self._ranked(steps)
        keep = set(ranked[: self.cfg.train.keep_best]) | set(steps[-1:])
        for step in ranked:
            if step not in keep:
                self.manager.delete(step)
                del self._scores[step]

    def best_step(self) -> int | None:
        """The kept step with the lowest finite monitored loss (the one generation uses)."""
        finite = [s for s in self._ranked(self.steps()) if self._score(s) != math.inf]
        return finite[0] if finite else None

    def restore_latest(self, target: dict) -> dict | None:
        """The newest readable save, restored into the structure of `target`; None if the
        run has no readable save (training then starts again). A damaged save is passed
        over for the one before it, with a note in `notes`; the save that later reaches its
        step replaces it, and metrics.jsonl forgets the lines after the restored step."""
        state = target["state"]
        abstract = {
            **self._raw_params(state),
            "opt_state": state.opt_state,
            "step": state.step,
            "carry": state.carry,
            "totals": target["totals"],
            "rng": np.asarray(jax.random.key_data(jax.random.PRNGKey(self.cfg.train.seed))),
        }
        steps = self.steps()
        for step in reversed(steps):
            if why := self.misfit(step):
                self.damaged.add(step)
                self.notes.append(f"skipped checkpoint {step}: {why}; resuming from an earlier one")
                continue
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(state.params),
                        train=ocp.args.StandardRestore(abstract),
                    ),
                )
            except Exception as err:  # damaged or half-deleted: fall back to the previous save
                self._skip(step, err, "resuming from an earlier one")
                continue
            self._forget_metrics_after(step)
            self._write_missing_metrics(step)
            part = restored["train"]
            new_state = state.replace(
                step=part["step"],
                params=part.get("params", restored["params"]),
                opt_state=part["opt_state"],
                carry=part["carry"],
            )
            return {"state": new_state, "totals": part["totals"]}
        if steps:
            self.notes.append(
                f"every checkpoint in {self.path} is damaged: training starts again from step 0"
            )
            self._forget_metrics_after(0)
        return None

    def _raw_params(self, state) -> dict:
        """With train.ema a checkpoint's "params" (what readers load) are the moving
        average, and the params that training goes on from are kept in its train part."""
        return {"params": state.params} if self.cfg.train.ema else {}

    def _skip(self, step: int, err: Exception, then: str) -> None:
        self.damaged.add(step)
        self.notes.append(f"skipped checkpoint {step}: it cannot be read ({_why(err)}); {then}")

    def _forget_metrics_after(self, step: int) -> None:
        """metrics.jsonl keeps the lines of saves up to `step` (later ones will be written
        again by the resumed run)."""
        path = self.path / "metrics.jsonl"
        if jax.process_index() != 0 or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()

        def kept(line: str) -> bool:
            try:
                return json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):  # a torn last line
                return False

        _write_text_atomic(path, "".join(line + "\n" for line in lines if kept(line)))

    def _write_missing_metrics(self, step: int) -> None:
        """Appends the metrics line of save `step` (from the save's own `meta`) when
        metrics.jsonl lacks it: a process killed after orbax committed the save but before
        `save` appended its line leaves exactly that, and a resumed run must show the lines
        an uninterrupted one does."""
        path = self.path / "metrics.jsonl"
        if jax.process_index() != 0:
            return
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        for line in lines:
            try:
                if json.loads(line)["step"] == step:
                    return
            except (ValueError, KeyError, TypeError):
                continue
        try:
            metrics = self.meta(step)["metrics"]
        except Exception:  # a save without readable metrics: nothing to write back
            return
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    def read_params(self, step: int) -> dict:
        """Params of checkpoint `step`, as device arrays (CheckpointError if damaged)."""
        if step not in self.steps():
            raise CheckpointError(f"{self.path} has no checkpoint at step {step}")
        if why := self.misfit(step):
            raise CheckpointError(
                f"checkpoint {step} in {self.path}: {why}; choose another --step "
                "(`jaxchar info` lists them)"
            )
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(params=ocp.args.StandardRestore())
            )
        except Exception as err:
            self.damaged.add(step)
            raise CheckpointError(
                f"checkpoint {step} in {self.path} is damaged ({_why(err)}): choose another "
                "--step (`jaxchar info` lists them)"
            ) from None
        return jax.tree.map(jax.numpy.asarray, restored["params"])

    def generation_order(self) -> list[int]:
        """The steps `load_params` tries, in order: by the monitored loss, best first; then
        saves with no finite loss (made on interruption), newest first."""
        steps = self.steps()
        ranked = [s for s in self._ranked(steps) if self._score(s) != math.inf]
        return ranked + [s for s in reversed(steps) if self._score(s) == math.inf]

    def load_params(self, step: int | None = None) -> tuple[dict, int]:
        """Params of `step`, or of the best readable checkpoint (a damaged best one is
        passed over, with a note in `notes`), as device arrays."""
        if step is not None:
            return self.read_params(step), step
        for other in self.steps():
            if (why := self.misfit(other)) and not any(f" {other}:" in n for n in self.notes):
                self.notes.append(f"skipped checkpoint {other}: {why}")
        for candidate in self.generation_order():
            try:
                return self.read_params(candidate), candidate
            except CheckpointError:
                self.notes.append(
                    f"skipped checkpoint {candidate}: it is damaged; using an earlier one"
                )
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"{self.path} has no checkpoint yet: train it first")
        listed = ", ".join(map(str, steps))
        if all(self.misfit(s) for s in steps):
            raise CheckpointError(
                f"no checkpoint in {self.path} fits this run's model (step {steps[0]}: "
                f"{self.misfit(steps[0])}): copy the run's own checkpoints back, or train it "
                "again (--overwrite)"
            )
        raise CheckpointError(
            f"every checkpoint in {self.path} is damaged (steps {listed} cannot be read): "
            "train it again (--overwrite)"
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _param_shapes(params_dir: Path) -> dict[str, tuple]:
    """{"lstm_0/cell/recurrent_kernel": (shape, dtype), ...} of a saved parameter tree,
    from orbax's metadata (no array is read)."""
    meta = ocp.StandardCheckpointer().metadata(params_dir)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_name(path): (tuple(x.shape), str(x.dtype)) for path, x in leaves}


def _model_shapes(cfg: Config) -> dict[str, tuple]:
    """The same for the parameters `cfg`'s model has (abstract: nothing is computed)."""
    from jaxchar.model import init_params  # the one definition of the parameter tree

    # the nn.scan reference: every backend keeps the same parameters, and a run trained
    # with a backend this machine lacks must still be checked here
    model = dataclasses.replace(cfg.model, impl="scan")
    tree = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_name(path): (tuple(x.shape), str(x.dtype)) for path, x in leaves}


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _difference(want: dict[str, tuple], got: dict[str, tuple]) -> str | None:
    """The first way `got` differs from `want`, in a few words, or None."""
    if missing := sorted(want.keys() - got.keys()):
        return f"its parameters do not fit this run's model (no {missing[0]})"
    if extra := sorted(got.keys() - want.keys()):
        return f"its parameters do not fit this run's model ({extra[0]} is not in it)"
    for name in sorted(want):
        if want[name] != got[name]:
            (ws, wd), (gs, gd) = want[name], got[name]
            shape = lambda s: "x".join(map(str, s)) or "scalar"  # noqa: E731
            return (
                f"its parameters do not fit this run's model ({name} is {shape(gs)} {gd}, "
                f"the run's config makes {shape(ws)} {wd})"
            )
    return None


def load_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[dict, Config, Vocab]:
    """(params, config, vocab) of a run's best readable checkpoint (or of `step`); no corpus
    needed. A damaged checkpoint passed over is reported with `warnings.warn`."""
    with RunDir.open(run_dir) as run:
        params, _ = run.load_params(step)
    for note in run.notes:
        warnings.warn(note, stacklevel=2)
    return params, run.cfg, run.vocab


def write_export(params: dict, cfg: Config, vocab: Vocab, out_dir: str | Path) -> Path:
    """Writes params.npz (keys like "lstm_0/cell/recurrent_kernel"), config.json and
    vocab.json: everything needed to use the model without jaxchar or orbax."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    np.savez(out / "params.npz", **flat)
    _write_json_atomic(out / "config.json", cfg.to_dict())
    _write_json_atomic(out / "vocab.json", {"chars": list(vocab.chars)})
    return out


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """`write_export` of a run's best readable checkpoint (or of `step`)."""
    params, cfg, vocab = load_checkpoint(run_dir, step)
    return write_export(params, cfg, vocab, out_dir)


def load_export(out_dir: str | Path) -> tuple[dict, Config, Vocab]:
    """Reads what export_run wrote (no pickle: allow_pickle stays off)."""
    out = Path(out_dir)
    params: dict = {}
    with np.load(out / "params.npz", allow_pickle=False) as arrays:
        for name in arrays.files:
            node = params
            *parents, leaf = name.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = jax.numpy.asarray(arrays[name])
    cfg = from_dict(json.loads((out / "config.json").read_text(encoding="utf-8")))
    vocab = Vocab.from_json((out / "vocab.json").read_text(encoding="utf-8"))
    return params, cfg, vocab
