"""Frozen configuration: model, data, train and sample sections.

A config is data. It is read from a TOML file (`load_config`), changed only by building a
new one (`override` for `--set section.key=value`, `dataclasses.replace` in code), and
checked when built: unknown keys, wrong types and impossible values raise `ConfigError`
with a message that names the key and says what would work.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def shipped_dir() -> Path:
    """The folder of the shipped configs (small, stacked, fast, shakespeare, tiny): the copy
    installed inside the package (setup.py puts configs/ there in wheels), else the source
    tree's top-level configs/ (an editable install or a checkout)."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else installed.parent.parent / "configs"


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


DEFAULT_CONFIG = "fast"  # what `jaxchar train` uses without --config


def shipped_names() -> list[str]:
    """The names of the shipped configs, sorted."""
    return sorted(p.stem for p in shipped_dir().glob("*.toml"))


def find_config(spec: str | Path) -> Path:
    """A config file's path, or the file of a shipped config's name (small, fast, ...)."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        return path
    shipped = shipped_dir() / f"{spec}.toml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"no config file {str(spec)!r}: give a .toml path or one of {', '.join(shipped_names())}"
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(section: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{section}.{name} = {value!r} is not one of {', '.join(allowed)}")


SEED_LIMIT = 2**63  # seeds are integers in [0, 2**63): one rule for the CLI, the API and serve


def check_seed(seed: object, what: str = "seed") -> int:
    """`seed` if it is an integer in [0, 2**63), else ConfigError naming the rule."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{what} must be an integer from 0 to 2**63 - 1, not {seed!r}")
    return seed


@dataclass(frozen=True)
class DataConfig:
    lowercase: bool = True  # the tutorial lowercases the book
    remove_punctuation: bool = False  # tutorial extension idea
    strip_gutenberg: bool = True  # keep only the text between *** START OF / *** END OF
    encoding: str = "utf-8"
    errors: str = "strict"  # or "replace" / "ignore" for files with bad bytes
    val_fraction: float = 0.0  # share of the text, taken from its end, held out
    seq_length: int = 100  # characters of context per window
    # window: many-to-one (tutorial); sequence: many-to-many over chunks;
    # sentences: many-to-many over sentences, right-padded to seq_length and masked
    objective: str = "window"
    stateful: bool = False  # sequence objective: carry the LSTM state across batches

    def __post_init__(self) -> None:
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
        _check(self.seq_length >= 1, "data.seq_length must be at least 1")
        _one_of("data", "objective", self.objective, ("window", "sequence", "sentences"))
        _one_of("data", "errors", self.errors, ("strict", "replace", "ignore"))
        _check(
            not self.stateful or self.objective == "sequence",
            "data.stateful needs data.objective = 'sequence'",
        )


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # set from the corpus; 0 means "not known yet"
    layers: int = 1
    hidden: int = 256
    dropout: float = 0.2  # after each LSTM layer, as the tutorial's Dropout layers
    input_dropout: float = 0.0  # on the input features (tutorial extension idea)
    # locked (variational) dropout, as AWD-LSTM's: one mask per sequence, the same units
    # dropped at every timestep (inputs and each layer's outputs); off: a fresh mask a step
    dropout_locked: bool = False
    encoding: str = "scaled"  # scaled: id / vocab (tutorial); onehot; embed
    embed_dim: int = 64
    cell: str = "lstm"  # or "gru" (Keras' GRU, reset after the recurrent product)
    # the gates' squashing function (Keras' recurrent_activation): sigmoid (Keras 2 and 3);
    # hard_sigmoid = clip(0.2 x + 0.5, 0, 1), the default of Keras 1, which the tutorial ran
    gate_activation: str = "sigmoid"
    unroll: int = 1  # timesteps per loop iteration of the scan (speed only)
    dtype: str = "float32"  # matrix products in this type; params and loss stay float32
    # which backend runs the LSTM layers and the sampling loop (jaxchar/lstm/backends.py):
    # auto: the fastest correct one measured for this machine; scan: the nn.scan reference;
    # fused: hand-written backward, no C++; native: the C++ kernels (CPUs); pallas: Pallas
    # kernels (NVIDIA GPUs; interpreted on CPUs); cudnn: NVIDIA GPUs
    impl: str = "auto"

    @property
    def product_dtype(self):
        """`dtype` as the JAX dtype the matrix products take (the one place that maps it).
        JAX is imported here, when a model runs, not when a config is read."""
        import jax.numpy as jnp

        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 0, "model.vocab_size must not be negative")
        _check(self.layers >= 1, "model.layers must be at least 1")
        _check(self.hidden >= 1, "model.hidden must be at least 1")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        _check(0.0 <= self.input_dropout < 1.0, "model.input_dropout must be in [0, 1)")
        _one_of("model", "encoding", self.encoding, ("scaled", "onehot", "embed"))
        _one_of("model", "cell", self.cell, ("lstm", "gru"))
        _one_of("model", "gate_activation", self.gate_activation, ("sigmoid", "hard_sigmoid"))
        _check(self.embed_dim >= 1, "model.embed_dim must be at least 1")
        _check(self.unroll >= 1, "model.unroll must be at least 1")
        _one_of("model", "dtype", self.dtype, ("float32", "bfloat16"))
        _one_of("model", "impl", self.impl, ("auto", "scan", "fused", "native", "pallas", "cudnn"))
        _check(
            self.impl != "cudnn" or self.dtype == "float32",
            "model.impl = 'cudnn' computes in float32 (jax.experimental.rnn): set "
            "model.dtype = 'float32' or use model.impl = 'auto'",
        )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    max_steps: int = 0  # stop after this many steps in all; 0 = no limit
    # > 0: the run's length is set by time, not by epochs: before training, the train step
    # and an evaluation are timed on this machine and train.max_steps becomes the steps that
    # end within this many minutes (evaluations included); a run stores its choice, so a
    # resume keeps the same schedule, and --set train.max_steps=N repeats it elsewhere
    minutes: float = 0.0
    batch_size: int = 128
    learning_rate: float = 1e-3  # Keras' Adam default
    schedule: str = "constant"  # constant | cosine | exponential
    warmup_steps: int = 0
    decay_rate: float = 0.1  # exponential: factor reached at the last step
    weight_decay: float = 0.0  # > 0 switches Adam to AdamW
    # which parameters the decay shrinks: all, or matrices (every parameter of two or more
    # dimensions: the kernels and the embedding table; the biases are left alone)
    decay: str = "all"
    clip_norm: float = 0.0  # global-norm gradient clipping; 0 = off
    # decay of an exponential moving average of the weights, which validation, checkpoints
    # and sampling then use (training goes on from the raw weights); 0 = off
    ema: float = 0.0
    seed: int = 0
    keep_best: int = 3  # best checkpoints kept by the monitored loss (plus the latest)
    save_every_steps: int = 0  # 0 = save at the end of every epoch
    log_every: int = 100  # steps between host syncs for logging
    steps_per_call: int = 10  # train steps fused into one jitted call (lax.scan)
    eval_batches: int = 0  # cap on validation batches; 0 = the whole split
    # rows of each validation batch; 0 = batch_size. For the sequence objectives these are the
    # in-order streams the held-out text is cut into, each read from a fresh state, so the
    # number changes the score a little: fixing it keeps scores comparable across batch sizes
    eval_rows: int = 0
    skip_nonfinite: bool = False  # drop an update whose loss or gradient is NaN/inf
    sample_chars: int = 200  # sample this many characters at each save (0 = off)
    shard_params: bool = False  # with several devices: split params and optimizer state (FSDP)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs must be at least 1")
        _check(self.max_steps >= 0, "train.max_steps must not be negative")
        _check(
            math.isfinite(self.minutes) and self.minutes >= 0,
            "train.minutes must be a number of minutes, or 0 (off: train.epochs decides)",
        )
        _check(self.batch_size >= 1, "train.batch_size must be at least 1")
        _check(self.learning_rate > 0, "train.learning_rate must be positive")
        _one_of("train", "schedule", self.schedule, ("constant", "cosine", "exponential"))
        _check(self.warmup_steps >= 0, "train.warmup_steps must not be negative")
        _check(0 < self.decay_rate <= 1, "train.decay_rate must be in (0, 1]")
        _check(self.weight_decay >= 0, "train.weight_decay must not be negative")
        _one_of("train", "decay", self.decay, ("all", "matrices"))
        _check(self.clip_norm >= 0, "train.clip_norm must not be negative")
        _check(0 <= self.ema < 1, "train.ema must be in [0, 1) (0: off)")
        _check(self.keep_best >= 1, "train.keep_best must be at least 1")
        _check(self.save_every_steps >= 0, "train.save_every_steps must not be negative")
        _check(self.log_every >= 1, "train.log_every must be at least 1")
        _check(self.steps_per_call >= 1, "train.steps_per_call must be at least 1")
        _check(self.eval_batches >= 0, "train.eval_batches must not be negative")
        _check(self.eval_rows >= 0, "train.eval_rows must not be negative (0: batch_size)")
        _check(self.sample_chars >= 0, "train.sample_chars must not be negative")
        check_seed(self.seed, "train.seed")


@dataclass(frozen=True)
class SampleConfig:
    """The sampling options: the [sample] section of a config, and the one checked, frozen
    object that `jaxchar generate`, `Run`, `jaxchar serve` and its engine pass down
    (`Run.options` makes it from a run's settings and the given ones, checked once). Off is
    one value everywhere: top_k 0, top_p 1. The messages name the option alone, so that they
    read the same in a config file, on the command line and in a request."""

    length: int = 1000
    temperature: float = 0.0  # 0 = argmax, as the tutorial
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    mode: str = "auto"  # auto: window for window-trained models, else stateful
    num_samples: int = 1

    def __post_init__(self) -> None:
        _check(self.length >= 1, f"length must be at least 1, not {self.length}")
        _check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be a finite number >= 0 (0: argmax), not {self.temperature}",
        )
        _check(self.top_k >= 0, f"top_k must not be negative (0: off), not {self.top_k}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1] (1: off), not {self.top_p}")
        _check(
            self.mode in ("auto", "stateful", "window"),
            f"mode must be one of auto, stateful, window, not {self.mode!r}",
        )
        _check(self.num_samples >= 1, f"num_samples must be at least 1, not {self.num_samples}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(where: str, value: Any, kind: type) -> Any:
    """Checks (and for ints given to float fields, widens) one value against its type."""
    if kind is bool:
        _check(isinstance(value, bool), f"{where} must be true or false, not {value!r}")
    elif kind is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            f"{where} must be a whole number, not {value!r}",
        )
    elif kind is float:
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            f"{where} must be a number, not {value!r}",
        )
        value = float(value)
    elif kind is str:
        _check(isinstance(value, str), f"{where} must be a string, not {value!r}")
    return value


def _build_section(name: str, values: dict[str, Any], base: Any) -> Any:
    kinds = _field_types(SECTIONS[name])
    checked = {}
    for key, value in values.items():
        if key not in kinds:
            known = ", ".join(kinds)
            raise ConfigError(f"unknown key {name}.{key} (known keys in [{name}]: {known})")
        checked[key] = _coerce(f"{name}.{key}", value, kinds[key])
    return dataclasses.replace(base, **checked)


def from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    """Builds a Config from nested {section: {key: value}}, on top of `base`."""
    base = base or Config()
    sections = {}
    for name, section in values.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(SECTIONS)})")
        if not isinstance(section, dict):
            raise ConfigError(f"[{name}] must be a table of key = value lines")
        sections[name] = _build_section(name, section, getattr(base, name))
    return dataclasses.replace(base, **sections)


def load_config(path: str | Path) -> Config:
    """Reads a TOML config file, or a shipped config by name (`load_config("fast")`); keys
    not in the file keep their defaults."""
    path = find_config(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as err:
        raise ConfigError(f"cannot read config file {path}: {err.__class__.__name__}") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    try:
        return from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _parse_value(text: str, kind: type) -> Any:
    """Parses the text of a `--set` value for a field of the given type."""
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


def override(config: Config, assignments: list[str]) -> Config:
    """Applies `section.key=value` assignments, each type-checked, to a new Config."""
    values: dict[str, dict[str, Any]] = {}
    for item in assignments:
        target, sep, text = item.partition("=")
        section, dot, key = target.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: write it as section.key=value, e.g. train.epochs=5")
        if section not in SECTIONS:
            raise ConfigError(
                f"--set {item!r}: unknown section {section!r} ({', '.join(SECTIONS)})"
            )
        kinds = _field_types(SECTIONS[section])
        if key not in kinds:
            raise ConfigError(
                f"--set {item!r}: unknown key {section}.{key} (known: {', '.join(kinds)})"
            )
        try:
            value = _parse_value(text, kinds[key])
        except ValueError as err:
            raise ConfigError(f"--set {item!r}: bad value for {section}.{key} ({err})") from None
        values.setdefault(section, {})[key] = value
    return from_dict(values, config)
