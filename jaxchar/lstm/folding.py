"""Running a kernel once for all rows under `jax.vmap`: the mapped axis folded into the rows
axis of every argument, shared by the C++ kernels (native/) and the Pallas kernels
(pallas/), whose calls take a batch of rows but know nothing of `vmap`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap


def fold(x: jax.Array, batched: bool, axis: int, size: int) -> jax.Array:
    """A mapped [M, ..., B (at axis + 1), ...] array as [..., M * B, ...] (broadcast first
    when not mapped)."""
    if not batched:
        x = jnp.broadcast_to(x, (size, *x.shape))
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])


def unfold(x: jax.Array, axis: int, size: int) -> jax.Array:
    """`fold`'s inverse: [..., M * B, ...] -> [M, ..., B, ...]."""
    x = x.reshape(*x.shape[:axis], size, x.shape[axis] // size, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def foldable(call, fallback, in_axes: tuple, out_axes: tuple):
    """call(*arrays) -> tuple of arrays, with a batching rule: under `jax.vmap`, when no
    weight (an input whose axis is None) is mapped, the mapped axis is folded into each
    array's rows axis (in_axes, out_axes) and the kernel runs once for all; when a weight is
    mapped, `fallback` (the same function in plain JAX) runs, vmapped."""

    @custom_vmap
    def f(*args):
        return tuple(call(*args))

    @f.def_vmap
    def rule(size, batched, *args):
        if any(b for b, axis in zip(batched, in_axes, strict=True) if axis is None):
            axes = [0 if b else None for b in batched]
            out = tuple(jax.vmap(fallback, in_axes=axes)(*args))
        else:
            folded = [
                x if axis is None else fold(x, b, axis, size)
                for x, b, axis in zip(args, batched, in_axes, strict=True)
            ]
            out = tuple(unfold(x, axis, size) for x, axis in zip(f(*folded), out_axes, strict=True))
        return out, tuple(True for _ in out)

    return f


def no_fallback(*args):
    """The fallback of a kernel whose callers never map it over its weights."""
    raise NotImplementedError("a kernel call mapped over its weights needs a fallback")
