"""Stateful generation of up to 64 rows at once as one C++ call (jaxchar/csrc/lstm_loop.h).

At batch 1 each character is a few matrix-vector products; XLA runs them on one core and
streams the kernels from the L3 cache every step (the recurrent kernel alone is 1 MB at
hidden 256). `generate` runs the whole loop as one call, splits the hidden units between the
cores and keeps each core's share of the weights in its own L2. It takes and returns what the
stateful `lax.scan` in `jaxchar.sampling` does and draws the same characters: argmax at
temperature 0, otherwise argmax(logits / temperature + Gumbel noise) with the noise drawn by
JAX from the same per-character keys, which is how `jax.random.categorical` samples. Under
`jax.vmap` the mapped rows fold into the one call (`_batched_generate`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from jaxchar.config import ModelConfig
from jaxchar.lstm.folding import fold, no_fallback, unfold
from jaxchar.lstm.native import loader

MAX_ROWS = 64  # beyond it the rows' state outgrows the L2 cache; at 128 and 256 rows the
# kernel and the scan ran within 7% of each other (it is faster at every batch up to 64)
NOISE_BYTES = 8 << 20  # Gumbel noise drawn per call: sampling memory stays O(rows x vocab)


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


def chunk_length(rows: int, vocab: int) -> int:
    """Characters per `generate` call, so that its noise stays under NOISE_BYTES."""
    return max(16, NOISE_BYTES // (4 * rows * max(vocab, 1)))


def _input_table(params: dict, cfg: ModelConfig) -> jax.Array:
    """Layer 0's input contribution for each character, bias included: [vocab, 4*hidden]."""
    dtype = cfg.product_dtype
    layer = params["lstm_0"]
    w_in, bias = layer["input_kernel"], layer["bias"]
    if cfg.encoding == "scaled":  # the model's id / vocab feature times the 1-row kernel
        feature = jnp.arange(cfg.vocab_size, dtype=jnp.float32) / cfg.vocab_size
        return feature[:, None] * w_in[0] + bias
    if cfg.encoding == "onehot":  # a one-hot row picks a row of the kernel (exact in bfloat16
        return w_in.astype(dtype).astype(jnp.float32) + bias  # too: the kernel's row, rounded)
    table = params["embed"]["embedding"]  # as the model's product (fused.matmul) does
    return (
        jnp.dot(table.astype(dtype), w_in.astype(dtype), preferred_element_type=jnp.float32) + bias
    )


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
    """One character per key (keys [n, 2]) for each of the B rows of `carry` and the last
    logits [B, vocab]: returns ((carry, logits), ids [B, n]), as the stateful scan does. With
    `prompt` [B, P] the characters are read first (from `carry`) and the first draw uses
    their last logits instead of `logits`. `threads` defaults to `threads_for(cfg.hidden)`.

    The characters are made in calls of `chunk_length` characters (a lax.scan over calls),
    each drawing its own noise, so that memory stays O(rows x vocab) whatever n is.

    Under `jax.vmap`, M mapped calls of B rows become one call of M x B rows when the params
    and the temperature are not mapped and `fits(M * B)` (the selector's word); otherwise
    `fallback` (the same signature as one call here, the lax.scan path) runs, vmapped."""
    rows, n = logits.shape[0], keys.shape[0]
    if prompt is None:
        prompt = jnp.zeros((rows, 0), jnp.int32)
    chunk = chunk_length(rows, cfg.vocab_size)
    first = n - (max(n - 1, 0) // chunk) * chunk  # 1..chunk characters, or 0 when n is 0
    call = _batched_generate(cfg, threads, fallback or no_fallback, fits)
    state, ids = call(params, carry, logits, keys[:first], temperature, prompt)
    if first == n:
        return state, ids
    no_prompt = prompt[:, :0]

    def body(state, chunk_keys):
        return call(params, *state, chunk_keys, temperature, no_prompt)

    state, more = jax.lax.scan(body, state, keys[first:].reshape(-1, chunk, keys.shape[-1]))
    more = more.transpose(1, 0, 2).reshape(rows, n - first)  # [calls, B, chunk] -> [B, ...]
    return state, jnp.concatenate([ids, more], axis=1)


def _noise(keys, rows: int, vocab: int, temperature) -> jax.Array:
    """categorical's Gumbel noise for logits [rows, vocab], one draw per key: [n, rows,
    vocab] (zeros at temperature 0, where the kernel takes the argmax)."""

    def gumbel():
        return jax.vmap(lambda k: jax.random.gumbel(k, (rows, vocab)))(keys)

    def none():
        return jnp.zeros((keys.shape[0], rows, vocab), jnp.float32)

    return jax.lax.cond(jnp.asarray(temperature) > 0, gumbel, none)


def _batched_generate(cfg: ModelConfig, threads, fallback, fits):
    """(params, carry, logits, keys, temperature, prompt) -> one kernel call, with the
    batching rule described in `generate`."""

    @custom_vmap
    def call(params, carry, logits, keys, temperature, prompt):
        noise = _noise(keys, logits.shape[0], cfg.vocab_size, temperature)
        return _generate_call(params, cfg, carry, logits, noise, temperature, prompt, threads)

    @call.def_vmap
    def rule(size, batched, params, carry, logits, keys, temperature, prompt):
        b_params, b_carry, b_logits, b_keys, b_temperature, b_prompt = batched
        rows = logits.shape[-2]
        if any(jax.tree.leaves(b_params)) or b_temperature or not fits(size * rows):
            axes = [jax.tree.map(lambda b: 0 if b else None, x) for x in batched]
            out = jax.vmap(fallback, in_axes=axes)(params, carry, logits, keys, temperature, prompt)
            return out, jax.tree.map(lambda _: True, out)
        vocab = cfg.vocab_size
        if b_keys:  # [M, n, B, V]
            noise = jax.vmap(lambda k: _noise(k, rows, vocab, temperature))(keys)
        else:  # [n, B, V], the same for every M
            noise = _noise(keys, rows, vocab, temperature)
        noise = fold(noise, b_keys, 1, size)  # [n, M * B, V]
        carry = jax.tree.map(lambda x, b: fold(x, b, 0, size), carry, b_carry)
        (carry, last), ids = _generate_call(
            params,
            cfg,
            carry,
            fold(logits, b_logits, 0, size),
            noise,
            temperature,
            fold(prompt, b_prompt, 0, size),
            threads,
        )
        out = (jax.tree.map(lambda x: unfold(x, 0, size), carry), unfold(last, 0, size))
        out = (out, unfold(ids, 0, size))
        return out, jax.tree.map(lambda _: True, out)

    return call


def _generate_call(params, cfg, carry, logits, noise, temperature, prompt, threads):
    """One FFI call of the generation loop: noise [n, B, vocab] for n characters."""
    layers, hidden, vocab, n = cfg.layers, cfg.hidden, cfg.vocab_size, noise.shape[0]
    rows = logits.shape[0]
    temperature = jnp.asarray(temperature, jnp.float32)
    lstm = [params[f"lstm_{layer}"] for layer in range(layers)]
    recurrent = jnp.stack([p["cell"]["recurrent_kernel"] for p in lstm])  # [L, H, 4H]
    if layers > 1:
        upper = jnp.stack([p["input_kernel"] for p in lstm[1:]])  # [L-1, H, 4H]
        upper_bias = jnp.stack([p["bias"] for p in lstm[1:]])  # [L-1, 4H]
    else:  # not read
        upper = upper_bias = jnp.zeros((1, 1, 1), jnp.float32)
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
        recurrent,
        upper,
        upper_bias,
        _input_table(params, cfg),
        params["head"]["kernel"],
        params["head"]["bias"],
        c0,
        h0,
        logits.astype(jnp.float32),
        prompt.astype(jnp.int32),
        noise,
        temperature,
        gate_activation=np.int64(cfg.gate_activation == "hard_sigmoid"),
        threads=np.int64(threads or loader.threads_for(hidden)),
        bf16=np.int64(cfg.dtype == "bfloat16"),
    )
    carry = tuple((c[layer], h[layer]) for layer in range(layers))
    return (carry, last), ids
