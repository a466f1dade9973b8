"""CharLSTM: input encoding -> LSTM layers (cells wrapped with nn.scan) -> dropout -> dense.

Shapes: ids [batch, time] -> logits [batch, time, vocab] (or [batch, vocab] with
last_only, the tutorial's many-to-one head). The carry is one (c, h) pair per layer, each
[batch, hidden]. Gate order and initialisation follow Keras' LSTM (i, f, g, o; Glorot input
kernel, orthogonal recurrent kernel, forget-gate bias 1) so the tutorial's models match.

`model.cell = "gru"` swaps in Keras' GRU (gates z, r, n; reset applied after the recurrent
product, a separate recurrent bias). Its carry keeps the same (c, h) shape so that stateful
training, sampling and checkpoints need no second code path: c simply mirrors h.

No file, flag, log or clock here: everything is a pure function of params and inputs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxchar import cudnn
from jaxchar.config import ModelConfig
from jaxchar.fused import gate, lstm_layer, matmul

Carry = tuple[tuple[jax.Array, jax.Array], ...]


def _forget_bias_init(key, shape, dtype=jnp.float32):
    """Zeros, with ones on the forget gate's quarter (Keras' unit_forget_bias)."""
    hidden = shape[-1] // 4
    return jnp.zeros(shape, dtype).at[hidden : 2 * hidden].set(1.0)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 in which every input bit flips
    each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(
    key: jax.Array,
    shape: tuple[int, ...],
    rate: float,
    time_axis: int | None,
    batch_axis: int,
    feature_axis: int | None,
) -> jax.Array:
    """Dropout's keep mask (True with probability 1 - rate) for an array of `shape`, as a
    hash of the key and each element's (time, batch, feature) position.

    The same positions get the same draws whatever the layout: [time, batch, H], [batch,
    time, H] and [H, time, batch] give one mask, transposed. So the fused layers can drop
    the same units in the layout each product wants without moving the mask between layouts
    (XLA's transposes of threefry's bits cost a stacked step ~10 ms on a CPU)."""
    seed = jax.random.bits(key, (2,), jnp.uint32)

    def position(axis):
        if axis is None:
            return jnp.uint32(0)
        return jax.lax.broadcasted_iota(jnp.uint32, shape, axis)

    row = position(time_axis) * jnp.uint32(shape[batch_axis]) + position(batch_axis)
    h = _fmix32(row ^ seed[0])
    h = _fmix32(h ^ seed[1] ^ position(feature_axis) * jnp.uint32(0x9E3779B9))
    h = _fmix32(h + seed[0])
    threshold = min(round(rate * 2.0**32), 2**32 - 1)
    return h >= jnp.uint32(threshold)


def dropout(
    x: jax.Array,
    key: jax.Array,
    rate: float,
    time_axis: int | None,
    batch_axis: int,
    feature_axis: int | None,
) -> jax.Array:
    """Inverted dropout with `keep_mask`: zeroes each element with probability `rate` and
    scales the rest by 1 / (1 - rate)."""
    if rate == 0.0:
        return x
    keep = keep_mask(key, x.shape, rate, time_axis, batch_axis, feature_axis)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def _gates(z: jax.Array, c: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """LSTM update from pre-activations z [batch, 4*hidden] and cell state c [batch, hidden]."""
    i, f, g, o = jnp.split(z.astype(jnp.float32), 4, axis=-1)
    i, f, o = (gate(v, kind) for v in (i, f, o))
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
        c_new, h_new = _gates(z, c, self.gate_activation)
        if mask is not None:  # padding positions leave the state as it was
            keep = mask[:, None]
            c_new, h_new = jnp.where(keep, c_new, c), jnp.where(keep, h_new, h)
        return (c_new, h_new), h_new


class GRUCell(nn.Module):
    """One GRU timestep, Keras' formulation (reset_after): x as in LSTMCell, 3*hidden wide."""

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


class _RecurrentKernel(nn.Module):
    """Holds the recurrent kernel under the same name as the scanned LSTMCell does, so
    that both implementations share one parameter tree (and checkpoints)."""

    hidden: int

    @nn.compact
    def __call__(self):
        shape = (self.hidden, 4 * self.hidden)
        return self.param("recurrent_kernel", nn.initializers.orthogonal(), shape)


class LSTMLayer(nn.Module):
    hidden: int
    scalar_input: bool  # inputs are scalars per (batch, time), else feature vectors
    unroll: int = 1
    dtype: Any = jnp.float32
    impl: str = "fused"
    cell_type: str = "lstm"  # or "gru" (always the nn.scan path)
    gate_activation: str = "sigmoid"  # or "hard_sigmoid" (Keras 1)
    # fused path: also return hs transposed, [H, time, batch], for the next layer's xs_t
    with_hs_t: bool = False

    @nn.compact
    def __call__(self, carry, inputs, mask=None, inputs_t=None):
        """(c, h), [.., H] outputs, and with `with_hs_t` on the fused path the outputs as
        [H, time, batch]; `inputs_t` is the fused path's inputs as [F, time, batch] (see
        jaxchar.fused.lstm_layer), ignored elsewhere."""
        lstm = self.cell_type == "lstm"
        width = (4 if lstm else 3) * self.hidden
        in_dim = 1 if self.scalar_input else inputs.shape[-1]
        w_in = self.param("input_kernel", nn.initializers.glorot_uniform(), (in_dim, width))
        bias = self.param("bias", _forget_bias_init if lstm else nn.initializers.zeros, (width,))
        path = layer_path(self.impl, self.cell_type, mask, self.gate_activation)
        if path == "fused":
            return self._fused(carry, inputs, inputs_t, w_in, bias)
        if path == "cudnn":
            return self._cudnn(carry, inputs, w_in, bias)
        scan = nn.scan(
            LSTMCell if lstm else GRUCell,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=(1, 1, nn.broadcast, nn.broadcast),
            out_axes=1,
            unroll=self.unroll,
        )
        cell = scan(self.hidden, self.dtype, self.gate_activation, name="cell")
        if self.scalar_input:
            return cell(carry, inputs, mask, w_in[0], bias)
        # one [batch*time, in] x [in, 4*hidden] product for all timesteps, outside the loop
        gx = matmul(inputs, w_in, self.dtype)
        return cell(carry, gx + bias, mask, None, None)

    def _fused(self, carry, inputs, inputs_t, w_in, bias):
        """Time-major: inputs [time, batch] or [time, batch, features] -> [time, batch, H]."""
        w_h = _RecurrentKernel(self.hidden, name="cell")()
        c0, h0 = carry
        # the layer projects vector inputs itself (one product before its loop), so that
        # it can also write their weight gradient as one product
        w_x = w_in[0] if self.scalar_input else w_in
        kind = self.gate_activation
        hs, c, h, *hs_t = lstm_layer(
            w_h, inputs, c0, h0, w_x, bias, inputs_t, self.dtype, kind, self.with_hs_t
        )
        return ((c, h), hs, *hs_t)

    def _cudnn(self, carry, inputs, w_in, bias):
        """Batch-major, like the scan: inputs [batch, time] or [batch, time, features]."""
        w_h = _RecurrentKernel(self.hidden, name="cell")()
        x = inputs[..., None] if self.scalar_input else inputs
        hs, c, h = cudnn.lstm_layer(x, carry[0], carry[1], w_in, w_h, bias)
        return (c, h), hs


def layer_path(impl: str, cell: str, mask, gate_activation: str = "sigmoid") -> str:
    """Which implementation runs a layer: GRUs and masked inputs (left-padded sampling
    windows) take the nn.scan reference; `cudnn` is cuDNN where a GPU offers it (and the
    gates are cuDNN's sigmoid) and the fused layer elsewhere; `fused` is the time-major
    layer with a hand-written backward."""
    if cell != "lstm" or mask is not None or impl == "scan":
        return "scan"
    if impl == "cudnn" and gate_activation == "sigmoid" and cudnn.available():
        return "cudnn"
    return "fused"


def init_carry(cfg: ModelConfig, batch: int) -> Carry:
    """Zero state for every layer: ((c, h), ...), each [batch, hidden] float32."""
    shape = (batch, cfg.hidden)
    # distinct arrays, so that a donated carry never hands XLA the same buffer twice
    return tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.layers))


class CharLSTM(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        ids: jax.Array,
        carry: Carry | None = None,
        *,
        train: bool = False,
        mask: jax.Array | None = None,
        last_only: bool = False,
    ) -> tuple[jax.Array, Carry]:
        cfg = self.cfg
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size is not set: build it from the corpus' Vocab")
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        if carry is None:
            carry = init_carry(cfg, ids.shape[0])
        # the fused layers work time-major end to end: no [batch, time, hidden] transposes
        # between layers; the scan reference (and masked sampling) stays batch-major
        time_major = layer_path(cfg.impl, cfg.cell, mask, cfg.gate_activation) == "fused"
        if time_major:
            ids = ids.T  # [time, batch]
        scalar = cfg.encoding == "scaled"
        if scalar:  # the tutorial's feature: id / vocab_size, [batch, time]
            x = ids.astype(jnp.float32) / cfg.vocab_size
        elif cfg.encoding == "onehot":  # built on the device inside the step, [batch, time, vocab]
            x = jax.nn.one_hot(ids, cfg.vocab_size, dtype=dtype)
        else:
            x = nn.Embed(cfg.vocab_size, cfg.embed_dim, name="embed")(ids)
        # (time, batch, feature) axes of x, for dropout's positions
        axes = (0, 1) if time_major else (1, 0)
        x = self._dropper(cfg.input_dropout, train)(x, *axes, 2 if x.ndim == 3 else None)
        new_carry, x_t = [], None
        for layer in range(cfg.layers):
            # training, a fused layer below another hands it its outputs as [H, time,
            # batch] too: the layout of the upper layer's input-kernel gradient
            with_t = time_major and train and layer < cfg.layers - 1
            layer_carry, x, *h_t = LSTMLayer(
                cfg.hidden,
                scalar and layer == 0,
                cfg.unroll,
                dtype,
                cfg.impl,
                cfg.cell,
                cfg.gate_activation,
                with_t,
                name=f"lstm_{layer}",
            )(carry[layer], x, mask, x_t)
            new_carry.append(layer_carry)
            drop = self._dropper(cfg.dropout, train)
            if last_only and layer == cfg.layers - 1:
                x = x[-1] if time_major else x[:, -1]  # [batch, hidden]: many-to-one head
                x = drop(x, None, 0, 1)
                continue
            if h_t:  # x's mask, transposed (no gradient: x carries it)
                x_t = drop(jax.lax.stop_gradient(h_t[0]), 1, 2, 0)
            x = drop(x, *axes, 2)
        logits = nn.Dense(cfg.vocab_size, name="head")(x).astype(jnp.float32)
        if time_major and not last_only:
            logits = logits.swapaxes(0, 1)  # [batch, time, vocab]
        return logits, tuple(new_carry)

    def _dropper(self, rate: float, train: bool):
        """(x, time axis, batch axis, feature axis) -> x after dropout at `rate` under one
        fresh key (x itself unless training): a dropper's calls drop the same positions."""
        if not train or rate == 0.0:
            return lambda x, *axes: x
        key = self.make_rng("dropout")
        return lambda x, *axes: dropout(x, key, rate, *axes)


def init_params(cfg: ModelConfig, key: jax.Array, seq_length: int = 1) -> dict:
    """Fresh parameters for `cfg` (the shapes do not depend on seq_length)."""
    ids = jnp.zeros((1, seq_length), jnp.int32)
    return CharLSTM(cfg).init({"params": key}, ids)["params"]


def apply(
    params: dict,
    cfg: ModelConfig,
    ids: jax.Array,
    carry: Carry | None = None,
    *,
    train: bool = False,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    last_only: bool = False,
) -> tuple[jax.Array, Carry]:
    """Runs the model over ids [batch, time]; `key` drives dropout when `train`."""
    rngs = {"dropout": key} if train and key is not None else None
    return CharLSTM(cfg).apply(
        {"params": params}, ids, carry, train=train, mask=mask, last_only=last_only, rngs=rngs
    )


def step(params: dict, cfg: ModelConfig, carry: Carry, ids_t: jax.Array) -> tuple[jax.Array, Carry]:
    """One character for each row: ids_t [batch] -> logits [batch, vocab], new carry."""
    logits, carry = apply(params, cfg, ids_t[:, None], carry)
    return logits[:, 0], carry
