"""CharLSTM: input encoding -> LSTM layers (jaxchar.lstm) -> dropout -> dense.

Shapes: ids [batch, time] -> logits [batch, time, vocab] (or [batch, vocab] with
last_only, the tutorial's many-to-one head). The carry is one (c, h) pair per layer, each
[batch, hidden]. Gate order and initialisation follow Keras' LSTM (i, f, g, o; Glorot input
kernel, orthogonal recurrent kernel, forget-gate bias 1) so the tutorial's models match.
`model.cell = "gru"` swaps in Keras' GRU (see jaxchar/lstm/cells.py). Which backend runs
the layers is jaxchar.lstm.backends's choice, made once per call.

No file, flag, log or clock here: everything is a pure function of params and inputs.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxchar.config import ModelConfig
from jaxchar.lstm import LayerSpec, LSTMLayer, select

Carry = tuple[tuple[jax.Array, jax.Array], ...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def embed_lookup(rows: int, table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids], whose gradient is one matrix product, one_hot(ids)^T @ g, rather than
    the scatter-add of a gather's transpose: on GPUs XLA adds a scatter's updates with
    atomics in no fixed order, and the same seed trained twice gave different bits."""
    return jnp.take(table, ids, axis=0)


def _embed_fwd(rows, table, ids):
    return jnp.take(table, ids, axis=0), ids


def _embed_bwd(rows, ids, g):
    hot = jax.nn.one_hot(ids.reshape(-1), rows, dtype=g.dtype)
    g = g.reshape(-1, g.shape[-1])
    # exact float32 sums (no TF32 on GPUs): the product only adds rows of g
    grad = jnp.matmul(hot.T, g, precision=jax.lax.Precision.HIGHEST)
    return grad, None


embed_lookup.defvjp(_embed_fwd, _embed_bwd)


class Embed(nn.Module):
    """nn.Embed's parameter (the same name, shape and initializer, so checkpoints and seeds
    are unchanged) with a deterministic gradient (`embed_lookup`)."""

    rows: int
    features: int

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        table = self.param("embedding", init, (self.rows, self.features))
        return embed_lookup(self.rows, table, ids)


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
        dtype = cfg.product_dtype
        if carry is None:
            carry = init_carry(cfg, ids.shape[0])
        # the fused layers work time-major end to end: no [batch, time, hidden] transposes
        # between layers; the scan reference (and masked sampling) stays batch-major
        backend = select(cfg, "layer", platform=jax.default_backend(), masked=mask is not None)
        time_major = backend.time_major
        if time_major:
            ids = ids.T  # [time, batch]
        scalar = cfg.encoding == "scaled"
        if scalar:  # the tutorial's feature: id / vocab_size, [batch, time]
            x = ids.astype(jnp.float32) / cfg.vocab_size
        elif cfg.encoding == "onehot":  # built on the device inside the step, [batch, time, vocab]
            x = jax.nn.one_hot(ids, cfg.vocab_size, dtype=dtype)
        else:
            x = Embed(cfg.vocab_size, cfg.embed_dim, name="embed")(ids)
        # (time, batch, feature) axes of x, for dropout's positions
        axes = (0, 1) if time_major else (1, 0)
        x = self._dropper(cfg.input_dropout, train)(x, *axes, 2 if x.ndim == 3 else None)
        new_carry, x_fm = [], None
        for layer in range(cfg.layers):
            # training, a fused layer below another hands it its outputs as [H, time,
            # batch] too: the layout of the upper layer's input-kernel gradient
            with_fm = time_major and train and layer < cfg.layers - 1
            spec = LayerSpec(
                hidden=cfg.hidden,
                scalar_input=scalar and layer == 0,
                cell_type=cfg.cell,
                gate_activation=cfg.gate_activation,
                dtype=dtype,
                unroll=cfg.unroll,
                choice=backend,
                with_hs_fm=with_fm,
            )
            layer_carry, x, *h_fm = LSTMLayer(spec, name=f"lstm_{layer}")(
                carry[layer], x, mask, x_fm
            )
            new_carry.append(layer_carry)
            drop = self._dropper(cfg.dropout, train)
            if last_only and layer == cfg.layers - 1:
                x = x[-1] if time_major else x[:, -1]  # [batch, hidden]: many-to-one head
                x = drop(x, None, 0, 1)
                continue
            if h_fm:  # x's mask, transposed (no gradient: x carries it)
                x_fm = drop(jax.lax.stop_gradient(h_fm[0]), 1, 2, 0)
            x = drop(x, *axes, 2)
        logits = nn.Dense(cfg.vocab_size, name="head")(x).astype(jnp.float32)
        if time_major and not last_only:
            logits = logits.swapaxes(0, 1)  # [batch, time, vocab]
        return logits, tuple(new_carry)

    def _dropper(self, rate: float, train: bool):
        """(x, time axis, batch axis, feature axis) -> x after dropout at `rate` under one
        fresh key (x itself unless training): a dropper's calls drop the same positions.
        Locked (`model.dropout_locked`), the mask ignores the time axis: a row drops the same
        features at every timestep."""
        if not train or rate == 0.0:
            return lambda x, *axes: x
        key = self.make_rng("dropout")
        locked = self.cfg.dropout_locked

        def drop(x, time_axis, batch_axis, feature_axis):
            time_axis = None if locked else time_axis
            return dropout(x, key, rate, time_axis, batch_axis, feature_axis)

        return drop


# init_params and apply are jitted (the config and flags static): called outside jit, as in
# a notebook or a test, they reuse one compiled program per config and shape instead of
# running op by op and compiling each layer's loop afresh; inside jit they are inlined.
def init_params(cfg: ModelConfig, key: jax.Array, seq_length: int = 1) -> dict:
    """Fresh parameters for `cfg` (the shapes do not depend on seq_length).

    The fields that leave the parameters' shapes and draws alone (dropout, gates, unroll,
    product dtype, backend) are set to the reference's values first, so that configs that
    differ only there share one compiled initializer."""
    del seq_length  # the parameters are the same for any input length
    plain = dataclasses.replace(
        for_inference(cfg),
        gate_activation="sigmoid",
        unroll=1,
        dtype="float32",
        impl="scan",
    )
    return _init_params(plain, key)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    ids = jnp.zeros((1, 1), jnp.int32)
    return CharLSTM(cfg).init({"params": key}, ids)["params"]


def for_inference(cfg: ModelConfig) -> ModelConfig:
    """cfg with dropout off: the fields that only training reads. Evaluation and sampling
    compile their programs for it, so that configs that differ only in dropout share them."""
    return dataclasses.replace(cfg, dropout=0.0, input_dropout=0.0, dropout_locked=False)


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
    cfg = cfg if train else for_inference(cfg)
    return _apply(params, cfg, ids, carry, train=train, key=key, mask=mask, last_only=last_only)


@functools.partial(jax.jit, static_argnames=("cfg", "train", "last_only"))
def _apply(
    params: dict,
    cfg: ModelConfig,
    ids: jax.Array,
    carry: Carry | None,
    *,
    train: bool,
    key: jax.Array | None,
    mask: jax.Array | None,
    last_only: bool,
) -> tuple[jax.Array, Carry]:
    rngs = {"dropout": key} if train and key is not None else None
    return CharLSTM(cfg).apply(
        {"params": params}, ids, carry, train=train, mask=mask, last_only=last_only, rngs=rngs
    )


def step(params: dict, cfg: ModelConfig, carry: Carry, ids_t: jax.Array) -> tuple[jax.Array, Carry]:
    """One character for each row: ids_t [batch] -> logits [batch, vocab], new carry."""
    logits, carry = apply(params, cfg, ids_t[:, None], carry)
    return logits[:, 0], carry
