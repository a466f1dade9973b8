"""Stateful generation of up to 64 rows at once as one C++ call (jaxchar/csrc/lstm_loop.h).

At batch 1 each character is a few matrix-vector products; XLA runs them on one core and
streams the kernels from the L3 cache every step (the recurrent kernel alone is 1 MB at
hidden 256). `generate` runs the whole loop as one call, splits the hidden units between the
cores and keeps each core's share of the weights in its own L2. It takes and returns what the
stateful `lax.scan` in `jaxchar.sampling` does and draws the same characters; the noise, the
chunks of characters and the `vmap` rule are every generation kernel's
(jaxchar/lstm/generation.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxchar.config import ModelConfig
from jaxchar.lstm import generation
from jaxchar.lstm.native import loader

MAX_ROWS = 64  # beyond it the rows' state outgrows the L2 cache; at 128 and 256 rows the
# kernel and the scan ran within 7% of each other (it is faster at every batch up to 64)


def generate_supports(cfg: ModelConfig, rows: int) -> tuple[bool, str]:
    """Whether `generate` can run this model at `rows` rows, and if not, why."""
    if not loader.available():
        return False, loader.variant()[1]
    if cfg.cell != "lstm":
        return False, "the kernel runs LSTM cells only"
    if rows > MAX_ROWS:
        return False, f"{rows} rows: the kernel takes at most {MAX_ROWS}"
    if cfg.dtype == "bfloat16":
        if not loader.bf16():
            return False, "bfloat16 products need the avx512bf16 variant"
        return cfg.hidden % 32 == 0, "bfloat16 needs hidden % 32 == 0"
    return cfg.hidden % 16 == 0, "float32 needs hidden % 16 == 0"


def generate(
    params: dict,
    cfg: ModelConfig,
    carry,
    logits: jax.Array,
    keys: jax.Array,
    temperature,
    prompt: jax.Array | None = None,
    threads: int | None = None,
    *,
    fallback=None,
    fits=lambda rows: rows <= MAX_ROWS,
):
    """jaxchar.lstm.generation.generate with the C++ loop as its kernel: `threads` defaults
    to `threads_for(cfg.hidden)`."""
    core = functools.partial(_generate_call, threads=threads)
    return generation.generate(
        core, params, cfg, carry, logits, keys, temperature, prompt, fallback=fallback, fits=fits
    )


def _generate_call(params, cfg, carry, logits, noise, temperature, prompt, threads):
    """One FFI call of the generation loop: noise [n, B, vocab] for n characters."""
    layers, hidden, vocab, n = cfg.layers, cfg.hidden, cfg.vocab_size, noise.shape[0]
    rows = logits.shape[0]
    w = generation.weights(params, cfg)
    c0 = jnp.stack([c for c, _ in carry])  # [L, B, H]
    h0 = jnp.stack([h for _, h in carry])
    state = jax.ShapeDtypeStruct((layers, rows, hidden), jnp.float32)
    call = jax.ffi.ffi_call(
        "jaxchar_generate",
        (
            jax.ShapeDtypeStruct((rows, n), jnp.int32),
            state,
            state,
            jax.ShapeDtypeStruct((rows, vocab), jnp.float32),
        ),
    )
    ids, c, h, last = call(
        w["recurrent"],
        w["upper"],
        w["upper_bias"],
        w["table"],
        w["head"],
        w["head_bias"],
        c0,
        h0,
        logits.astype(jnp.float32),
        prompt.astype(jnp.int32),
        noise,
        jnp.asarray(temperature, jnp.float32),
        gate_activation=np.int64(cfg.gate_activation == "hard_sigmoid"),
        threads=np.int64(threads or loader.threads_for(hidden)),
        bf16=np.int64(cfg.dtype == "bfloat16"),
    )
    carry = tuple((c[layer], h[layer]) for layer in range(layers))
    return (carry, last), ids
