"""The whole stateful sampling loop as one kernel call per chunk of characters, whichever
kernel runs it: the C++ loop on CPUs (jaxchar/lstm/native/generation.py) or the Pallas loop
on NVIDIA GPUs (jaxchar/lstm/pallas/sampling.py).

A kernel's `core(params, cfg, carry, logits, noise, temperature, prompt)` reads prompt
[B, P] from (carry, logits [B, vocab]) and then draws one character per row for each of
noise's n steps ([n, B, vocab]): argmax at temperature 0, else argmax(logits / temperature
+ noise). It returns ((carry, logits), ids [B, n]), what the stateful `lax.scan` in
jaxchar.sampling returns. What the kernels share lives here:

- the noise: `jax.random.categorical` draws argmax(logits + Gumbel noise), so JAX draws the
  same Gumbel noise from the same per-character keys and the kernel draws the same ids;
- the chunks: at most NOISE_BYTES of noise a call (a lax.scan over calls), so memory stays
  O(rows x vocab) whatever the length;
- the batching rule: under `jax.vmap` the mapped rows fold into one call;
- the weights as the kernels take them (`weights`): layer 0's input contribution as a table
  per character, the other layers' matrices stacked.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from jaxchar.config import ModelConfig
from jaxchar.lstm.folding import fold, no_fallback, unfold

NOISE_BYTES = 8 << 20  # Gumbel noise drawn per call: sampling memory stays O(rows x vocab)

# (params, cfg, carry, logits, noise, temperature, prompt) -> ((carry, logits), ids)
Core = Callable


def chunk_length(rows: int, vocab: int) -> int:
    """Characters per kernel call, so that its noise stays under NOISE_BYTES."""
    return max(16, NOISE_BYTES // (4 * rows * max(vocab, 1)))


def input_table(params: dict, cfg: ModelConfig) -> jax.Array:
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


def weights(params: dict, cfg: ModelConfig) -> dict[str, jax.Array]:
    """The model's weights as the kernels take them: `table` [vocab, 4H] (input_table),
    `recurrent` [L, H, 4H], `upper` [L-1, H, 4H] and `upper_bias` [L-1, 4H] (layers above
    the first; one unread zero entry for a one-layer model), `head` [H, vocab] and
    `head_bias` [vocab]."""
    lstm = [params[f"lstm_{layer}"] for layer in range(cfg.layers)]
    if cfg.layers > 1:
        upper = jnp.stack([p["input_kernel"] for p in lstm[1:]])
        upper_bias = jnp.stack([p["bias"] for p in lstm[1:]])
    else:
        upper = upper_bias = jnp.zeros((1, 1, 1), jnp.float32)
    return {
        "table": input_table(params, cfg),
        "recurrent": jnp.stack([p["cell"]["recurrent_kernel"] for p in lstm]),
        "upper": upper,
        "upper_bias": upper_bias,
        "head": params["head"]["kernel"],
        "head_bias": params["head"]["bias"],
    }


def generate(
    core: Core,
    params: dict,
    cfg: ModelConfig,
    carry,
    logits: jax.Array,
    keys: jax.Array,
    temperature,
    prompt: jax.Array | None = None,
    *,
    fallback=None,
    fits=lambda rows: True,
):
    """One character per key (keys [n, 2]) for each of the B rows of `carry` and the last
    logits [B, vocab]: returns ((carry, logits), ids [B, n]), as the stateful scan does. With
    `prompt` [B, P] the characters are read first (from `carry`) and the first draw uses
    their last logits instead of `logits`.

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
    call = _batched(core, cfg, fallback or no_fallback, fits)
    state, ids = call(params, carry, logits, keys[:first], temperature, prompt)
    if first == n:
        return state, ids
    no_prompt = prompt[:, :0]

    def body(state, chunk_keys):
        return call(params, *state, chunk_keys, temperature, no_prompt)

    state, more = jax.lax.scan(body, state, keys[first:].reshape(-1, chunk, keys.shape[-1]))
    more = more.transpose(1, 0, 2).reshape(rows, n - first)  # [calls, B, chunk] -> [B, ...]
    return state, jnp.concatenate([ids, more], axis=1)


def noise(keys, rows: int, vocab: int, temperature) -> jax.Array:
    """categorical's Gumbel noise for logits [rows, vocab], one draw per key: [n, rows,
    vocab] (zeros at temperature 0, where the kernel takes the argmax)."""

    def gumbel():
        return jax.vmap(lambda k: jax.random.gumbel(k, (rows, vocab)))(keys)

    def none():
        return jnp.zeros((keys.shape[0], rows, vocab), jnp.float32)

    return jax.lax.cond(jnp.asarray(temperature) > 0, gumbel, none)


def _batched(core: Core, cfg: ModelConfig, fallback, fits):
    """(params, carry, logits, keys, temperature, prompt) -> one kernel call, with the
    batching rule described in `generate`."""

    @custom_vmap
    def call(params, carry, logits, keys, temperature, prompt):
        drawn = noise(keys, logits.shape[0], cfg.vocab_size, temperature)
        return core(params, cfg, carry, logits, drawn, temperature, prompt)

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
            drawn = jax.vmap(lambda k: noise(k, rows, vocab, temperature))(keys)
        else:  # [n, B, V], the same for every M
            drawn = noise(keys, rows, vocab, temperature)
        drawn = fold(drawn, b_keys, 1, size)  # [n, M * B, V]
        carry = jax.tree.map(lambda x, b: fold(x, b, 0, size), carry, b_carry)
        (carry, last), ids = core(
            params,
            cfg,
            carry,
            fold(logits, b_logits, 0, size),
            drawn,
            temperature,
            fold(prompt, b_prompt, 0, size),
        )
        out = (jax.tree.map(lambda x: unfold(x, 0, size), carry), unfold(last, 0, size))
        out = (out, unfold(ids, 0, size))
        return out, jax.tree.map(lambda _: True, out)

    return call
