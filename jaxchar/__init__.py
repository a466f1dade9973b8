"""jaxchar: character-level LSTM text generation in JAX/Flax.

import jaxchar
params, cfg, vocab = jaxchar.load_checkpoint("runs/alice")
ids = jaxchar.sample(params, key, vocab.encode("alice was "), cfg=cfg.model, length=500,
                     temperature=0.8)
print(vocab.decode(ids))

The names below are imported on first use, so that `import jaxchar` (and `jaxchar --help`)
does not pay for JAX until something needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

from jaxchar.version import __version__

_WHERE = {  # public name -> the module that defines it
    "Config": "config",
    "DataConfig": "config",
    "ModelConfig": "config",
    "SampleConfig": "config",
    "TrainConfig": "config",
    "load_config": "config",
    "Corpus": "corpus",
    "Vocab": "corpus",
    "load_corpus": "corpus",
    "CharLSTM": "model",
    "init_carry": "model",
    "init_params": "model",
    "step": "model",
    "Beams": "beam",
    "beam_search": "beam",
    "sample": "sampling",
    "sample_logits": "sampling",
    "sample_stream": "sampling",
    "evaluate": "train",
    "fit": "train",
    "with_vocab": "train",
    "RunDir": "checkpoint",
    "load_checkpoint": "checkpoint",
    "Run": "run",
    "train_run": "run",
}

__all__ = ["__version__", *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"jaxchar.{_WHERE[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'jaxchar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
