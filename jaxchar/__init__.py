"""jaxchar: character-level LSTM text generation in JAX/Flax.

import jaxchar
params, cfg, vocab = jaxchar.load_checkpoint("runs/alice")
ids = jaxchar.sample(params, key, vocab.encode("alice was "), cfg=cfg.model, length=500,
                     temperature=0.8)
print(vocab.decode(ids))
"""

from jaxchar.checkpoint import RunDir, load_checkpoint
from jaxchar.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig, load_config
from jaxchar.corpus import Corpus, Vocab, load_corpus
from jaxchar.model import CharLSTM, init_carry, init_params, step
from jaxchar.sampling import sample, sample_logits
from jaxchar.train import evaluate, fit, with_vocab
from jaxchar.version import __version__

__all__ = [
    "__version__",
    "CharLSTM",
    "Config",
    "Corpus",
    "DataConfig",
    "ModelConfig",
    "RunDir",
    "SampleConfig",
    "TrainConfig",
    "Vocab",
    "evaluate",
    "fit",
    "init_carry",
    "init_params",
    "load_checkpoint",
    "load_config",
    "load_corpus",
    "sample",
    "sample_logits",
    "step",
    "with_vocab",
]
