"""The LSTM and GRU cells: the definition of the layer, as flax modules run by `nn.scan`.

This is the `scan` backend and the reference: every other backend (jaxchar.lstm.fused with
or without the C++ kernels, cuDNN) is tested against it, values and gradients. Gate order and
initialisation follow Keras (i, f, g, o; orthogonal recurrent kernel), so that the tutorial's
models match.

Shapes: carry (c, h), each [batch, hidden]; x [batch, 4*hidden] (already projected) or
[batch] (a scalar feature, projected here).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def matmul(a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
    """a @ b with both operands in `dtype` (the products' type) and the result in float32.

    The float32 result is asked of the product itself (`preferred_element_type`), not cast
    from a bfloat16 one: that keeps the accumulated sums' precision, and XLA's CPU backend
    runs a bfloat16 product with a bfloat16 result slower than a float32 one."""
    return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def gate(v: jax.Array, gate_activation: str = "sigmoid") -> jax.Array:
    """The gates' squashing function. `sigmoid` is written as 0.5 * tanh(v / 2) + 0.5 (one
    transcendental instead of exp plus divide); `hard_sigmoid` is Keras 1's piecewise-linear
    clip(0.2 v + 0.5, 0, 1), the default of the Keras the tutorial ran."""
    if gate_activation == "hard_sigmoid":
        return jnp.clip(0.2 * v + 0.5, 0.0, 1.0)
    return 0.5 * jnp.tanh(0.5 * v) + 0.5


def forget_bias_init(key, shape, dtype=jnp.float32):
    """Zeros, with ones on the forget gate's quarter (Keras' unit_forget_bias)."""
    hidden = shape[-1] // 4
    return jnp.zeros(shape, dtype).at[hidden : 2 * hidden].set(1.0)


def lstm_update(z: jax.Array, c: jax.Array, gate_activation: str) -> tuple[jax.Array, jax.Array]:
    """LSTM update from pre-activations z [batch, 4*hidden] and cell state c [batch, hidden]."""
    i, f, g, o = jnp.split(z.astype(jnp.float32), 4, axis=-1)
    i, f, o = (gate(v, gate_activation) for v in (i, f, o))
    c = f * c + i * jnp.tanh(g)
    return c, o * jnp.tanh(c)


class LSTMCell(nn.Module):
    """One timestep. `x` is either the precomputed input contribution [batch, 4*hidden]
    (wide inputs, projected for all timesteps at once outside the loop) or a scalar
    feature [batch] (the tutorial's 1-wide input, cheaper to project inside the loop)."""

    hidden: int
    dtype: Any = jnp.float32
    gate_activation: str = "sigmoid"

    @nn.compact
    def __call__(self, carry, x, mask, w_in, bias):
        c, h = carry
        w_h = self.param(
            "recurrent_kernel", nn.initializers.orthogonal(), (self.hidden, 4 * self.hidden)
        )
        if w_in is not None:  # scalar input: [batch] * [4*hidden]
            x = x[:, None] * w_in + bias
        z = x + matmul(h, w_h, self.dtype)
        c_new, h_new = lstm_update(z, c, self.gate_activation)
        if mask is not None:  # padding positions leave the state as it was
            keep = mask[:, None]
            c_new, h_new = jnp.where(keep, c_new, c), jnp.where(keep, h_new, h)
        return (c_new, h_new), h_new


class GRUCell(nn.Module):
    """One GRU timestep, Keras' formulation (reset_after): x as in LSTMCell, 3*hidden wide.
    Its carry keeps the LSTM's (c, h) shape, c mirroring h, so that stateful training,
    sampling and checkpoints need no second code path."""

    hidden: int
    dtype: Any = jnp.float32
    gate_activation: str = "sigmoid"

    @nn.compact
    def __call__(self, carry, x, mask, w_in, bias):
        _, h = carry
        shape = (self.hidden, 3 * self.hidden)
        w_h = self.param("recurrent_kernel", nn.initializers.orthogonal(), shape)
        b_h = self.param("recurrent_bias", nn.initializers.zeros, (3 * self.hidden,))
        if w_in is not None:
            x = x[:, None] * w_in + bias
        hz = matmul(h, w_h, self.dtype) + b_h
        xz, xr, xn = jnp.split(x.astype(jnp.float32), 3, axis=-1)
        rz, rr, rn = jnp.split(hz, 3, axis=-1)
        z = gate(xz + rz, self.gate_activation)
        r = gate(xr + rr, self.gate_activation)
        h_new = z * h + (1.0 - z) * jnp.tanh(xn + r * rn)
        if mask is not None:
            h_new = jnp.where(mask[:, None], h_new, h)
        return (h_new, h_new), h_new
