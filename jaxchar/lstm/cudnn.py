"""One LSTM layer through cuDNN, by JAX's own RNN support (jax.experimental.rnn), for GPUs.

A lax.scan recurrence on a GPU is bound by kernel latency (~100 dependent steps a window);
cuDNN runs the whole layer (forward and backward) as its own persistent kernels. The layer
keeps jaxchar's parameters (input_kernel [in, 4H], recurrent_kernel [H, 4H], bias [4H],
gates i, f, g, o as in Keras and cuDNN) and packs them into cuDNN's flat weight vector on
each call, so checkpoints are the same whichever implementation trained them.

cuDNN has no CPU kernel: `available()` says whether this process can use it, and the
selector (jaxchar.lstm.backends) picks it only where this is true.
Batch-major: x [batch, time, in] -> hs [batch, time, H].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import rnn


def available() -> bool:
    """True on NVIDIA GPUs. (AMD's MIOpen, which jax.experimental.rnn also lowers to, orders
    the gates differently; ROCm takes the fused layer.)"""
    if jax.default_backend() != "gpu":
        return False
    version = getattr(jax.devices()[0].client, "platform_version", "") or ""
    return "rocm" not in version.lower()


def pack_weights(w_in: jax.Array, w_h: jax.Array, bias: jax.Array) -> jax.Array:
    """jaxchar's [in, 4H], [H, 4H] and [4H] as cuDNN's flat vector for one layer, one
    direction: W_ih [4H, in], W_hh [4H, H], then b_ih and b_hh [4H] each (cuDNN adds two
    biases; jaxchar's one goes in b_ih and b_hh is zero)."""
    parts = [w_in.T.ravel(), w_h.T.ravel(), bias, jnp.zeros_like(bias)]
    return jnp.concatenate([p.astype(jnp.float32) for p in parts])


def lstm_layer(
    x: jax.Array, c0: jax.Array, h0: jax.Array, w_in: jax.Array, w_h: jax.Array, bias: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs the layer over x [B, T, in] from (c0, h0) [B, H]; returns (hs [B, T, H], c, h).
    Differentiable (cuDNN's backward pass); float32 only, as jax.experimental.rnn is."""
    batch, steps, in_dim = x.shape
    hidden = w_h.shape[0]
    hs, h_n, c_n = rnn.lstm(
        x.astype(jnp.float32),
        h0[None],  # [layers * directions, B, H]
        c0[None],
        pack_weights(w_in, w_h, bias),
        jnp.full((batch,), steps, jnp.int32),  # every row runs the whole window
        input_size=in_dim,
        hidden_size=hidden,
        num_layers=1,
        dropout=0.0,  # jaxchar's dropout sits between layers, outside the cell
        bidirectional=False,
    )
    return hs, c_n[0], h_n[0]
