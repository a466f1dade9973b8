"""The two recurrences of an LSTM layer's training step in C++ (jaxchar/csrc/lstm_train.h),
which `jaxchar.lstm.fused.lstm_layer` runs on CPUs.

They split the hidden units between threads as generation does, and XLA may split them over
the batch across a device mesh (`_batch_parallel`). The thread count is fixed per call and
the kernels never run on fewer threads than asked (jaxchar/csrc/native.cc), so the same
inputs give the same bits. Under `jax.vmap` the mapped rows fold into the batch
(jaxchar.lstm.folding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxchar.lstm.folding import foldable, no_fallback
from jaxchar.lstm.native import loader


def layer_supports(hidden: int, dtype) -> tuple[bool, str]:
    """Whether `layer_forward` and `layer_backward` can run an LSTM layer, and if not, why."""
    if not loader.available():
        return False, loader.variant()[1]
    if dtype != jnp.float32:
        return False, "the training kernels compute in float32 only"
    return hidden % 64 == 0, "the training kernels need hidden % 64 == 0"


def _batch_parallel(call, ins: tuple, outs: tuple):
    """`call(*arrays, hard_sigmoid, threads)` as an operation that XLA may split over the batch: ins
    and outs give each array's (rank, batch dimension or None). With the batch sharded over a
    device mesh (jaxchar.distributed), each device then runs the kernel on its own rows;
    without this, XLA gathers the whole batch onto every device and repeats the work there.
    Every other dimension stays whole on each device."""

    def dims(name, rank, batch):
        return " ".join("b" if d == batch else f"{name}{d}" for d in range(rank))

    lhs = [dims(f"i{k}_", *spec) for k, spec in enumerate(ins)]
    rhs = [dims(f"o{k}_", *spec) for k, spec in enumerate(outs)]
    whole = tuple(f for side in lhs + rhs for f in side.split() if f != "b")
    wrapped = custom_partitioning(call, static_argnums=(len(ins), len(ins) + 1))

    def partition(hard_sigmoid, threads, mesh, arg_shapes, result_shape):
        # the batch's mesh axis, from the first batched array's sharding (its mesh: the
        # partitioner's own may be empty)
        k = next(k for k, (_, batch) in enumerate(ins) if batch is not None)
        first, batch = arg_shapes[k].sharding, ins[k][1]
        mesh = first.mesh
        axis = first.spec[batch] if len(first.spec) > batch else None

        def sharding(rank, batch):
            return NamedSharding(mesh, P(*(axis if d == batch else None for d in range(rank))))

        args = tuple(sharding(*spec) for spec in ins)
        results = tuple(sharding(*spec) for spec in outs)
        return mesh, lambda *a: call(*a, hard_sigmoid, threads), results, args

    wrapped.def_partition(
        partition=partition,
        sharding_rule=", ".join(lhs) + " -> " + ", ".join(rhs),
        need_replication_factors=whole,
    )
    return wrapped


def _forward(w_h, xs, w_in, bias, c0, h0, hard_sigmoid, threads, hs_fm):
    steps, batch, hidden = xs.shape[0], xs.shape[1], w_h.shape[0]
    state = jax.ShapeDtypeStruct((steps, batch, hidden), jnp.float32)
    gates = jax.ShapeDtypeStruct((steps, batch, 4 * hidden), jnp.float32)
    extra = 1 + (xs.shape[2] == 1)  # the scalar features' row, then a row of ones
    prev = jax.ShapeDtypeStruct((hidden + extra, steps, batch), jnp.float32)
    # hs transposed, or nothing for the kernel to write
    out_fm = jax.ShapeDtypeStruct((hidden, steps if hs_fm else 0, batch), jnp.float32)
    results = state, gates, state, prev, out_fm
    call = jax.ffi.ffi_call("jaxchar_lstm_forward", results)
    return call(
        w_h,
        xs,
        w_in,
        bias,
        c0,
        h0,
        gate_activation=np.int64(hard_sigmoid),
        threads=np.int64(threads),
    )


# (custom_partitioning traces every parameter, defaults included: hs_fm is fixed per function)
def _forward_call(w_h, xs, w_in, bias, c0, h0, hard_sigmoid, threads):
    return _forward(w_h, xs, w_in, bias, c0, h0, hard_sigmoid, threads, False)


def _forward_call_fm(w_h, xs, w_in, bias, c0, h0, hard_sigmoid, threads):  # hs_fm too
    return _forward(w_h, xs, w_in, bias, c0, h0, hard_sigmoid, threads, True)


def _backward_call(w_h, acts, cs, c0, d_hs, d_c, d_h, hard_sigmoid, threads):
    shapes = (acts.shape, c0.shape, c0.shape)
    results = tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes)
    call = jax.ffi.ffi_call("jaxchar_lstm_backward", results)
    return call(
        w_h,
        acts,
        cs,
        c0,
        d_hs,
        d_c,
        d_h,
        gate_activation=np.int64(hard_sigmoid),
        threads=np.int64(threads),
    )


@functools.cache
def _layer_calls():
    """The forward and backward calls, split over the batch. The arrays' (rank, batch
    dimension): [T, B, ...] sequences, [B, H] states, [H, T, B] h_prev, whole weights."""
    ins = (2, None), (3, 1), (1, None), (1, None), (2, 0), (2, 0)
    outs = (3, 1), (3, 1), (3, 1), (3, 2), (3, 2)
    forward = _batch_parallel(_forward_call, ins, outs)
    forward_fm = _batch_parallel(_forward_call_fm, ins, outs)
    backward = _batch_parallel(
        _backward_call,
        ((2, None), (3, 1), (3, 1), (2, 0), (3, 1), (2, 0), (2, 0)),
        ((3, 1), (2, 0), (2, 0)),
    )
    return forward, forward_fm, backward


def layer_forward(
    w_h,
    xs,
    c0,
    h0,
    w_in,
    bias,
    gate_activation: str = "sigmoid",
    threads: int | None = None,
    hs_fm: bool = False,
    fallback=None,
):
    """The forward recurrence of jaxchar.lstm.fused.lstm_layer in C++: xs [T, B] scalar features
    (w_in, bias [4H]) or [T, B, 4H] projected inputs, to which the kernel adds bias [4H] (w_in
    then unused). Returns hs [T, B, H] and what the backward pass needs: the gates' outputs
    acts [T, B, 4H] (i, f, g, o), the cell states cs [T, B, H] and h_prev_fm [H + 1 + scalar,
    T, B]: each step's previous h transposed (h0 first), then for scalar features xs itself,
    then ones (one product of h_prev_fm with dz gives the gradients of w_h, of a scalar
    w_in and of the bias); with `hs_fm`, also hs transposed, [H, T, B] (for the next layer's
    input-kernel gradient). `threads` defaults to `loader.threads_for(hidden)`.

    `fallback(w_h, xs, w_in, bias, c0, h0)` is the same recurrence in plain JAX, on the
    kernel's own arguments (xs [T, B, 1 or 4H], w_in [4H]) and with its outputs (hs_fm
    [H, 0, B] when not asked for): it runs under a `jax.vmap` that maps the weights."""
    loader._require()
    hidden = w_h.shape[0]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    if xs.ndim == 2:  # the kernel tells scalar features by their width of 1
        xs = xs[..., None]
    else:
        w_in = jnp.zeros((4 * hidden,), jnp.float32)
    args = f32(w_h), f32(xs), f32(w_in).reshape(-1), f32(bias), f32(c0), f32(h0)
    forward, forward_fm, _ = _layer_calls()
    hard_sigmoid, threads = (
        int(gate_activation == "hard_sigmoid"),
        threads or loader.threads_for(hidden),
    )

    def kernel(*args):
        return (forward_fm if hs_fm else forward)(*args, hard_sigmoid, threads)

    rows = (None, 1, None, None, 0, 0), (1, 1, 1, 2, 2)
    outs = foldable(kernel, fallback or no_fallback, *rows)(*args)
    return outs if hs_fm else outs[:4]


def layer_backward(
    w_h,
    acts,
    cs,
    c0,
    d_hs,
    d_c,
    d_h,
    gate_activation: str = "sigmoid",
    threads: int | None = None,
    fallback=None,
):
    """The backward recurrence of jaxchar.lstm.fused.lstm_layer in C++: from the forward
    call's acts and cs, the first c0 and the gradients reaching hs [T, B, H] and the final c
    and h [B, H], returns dz [T, B, 4H] (the gradient of the pre-activations) and the
    gradients of c0 and h0. `fallback`, with the same arguments, as in `layer_forward`."""
    loader._require()
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    args = f32(w_h), acts, cs, f32(c0), f32(d_hs), f32(d_c), f32(d_h)
    hard_sigmoid, threads = (
        int(gate_activation == "hard_sigmoid"),
        threads or loader.threads_for(w_h.shape[0]),
    )
    _, _, backward = _layer_calls()

    def kernel(*args):
        return backward(*args, hard_sigmoid, threads)

    rows = (None, 1, 1, 0, 1, 0, 0), (1, 0, 0)
    return foldable(kernel, fallback or no_fallback, *rows)(*args)
