"""jaxchar's C++ kernels for CPUs (jaxchar/_native.cc): stateful generation of up to 64
rows at once, and the recurrences of the LSTM layer's training step.

At batch 1 each character is a few matrix-vector products; XLA runs them on one core and
streams the kernels from the L3 cache every step (the recurrent kernel alone is 1 MB at
hidden 256), which held jaxchar's loop at ~17 us per character on a 2-core CPU. The kernel
runs the whole loop as one XLA FFI call, splits the hidden units between the cores and keeps
each core's share of the weights in its own L2. With several rows, each weight it loads
serves up to 6 rows from registers, and the cell update and the head run on the sums while
they are in cache (benchmarks/bench_generate.py measures it against the scan). From 12 rows
on, the float32 recurrent products run by one level of Strassen's algorithm (12.5% fewer
multiply-adds; the error against float64 ~1.4x the plain product's). A bfloat16
model (`model.dtype = "bfloat16"`) multiplies in bfloat16 pairs where the build targets
AVX512-BF16 (`bf16()`), at twice the float32 rate, with float32 sums as the model's products.

`generate` takes and returns exactly what the stateful `lax.scan` in `sampling._steps`
does, and draws the same characters: argmax at temperature 0, otherwise
argmax(logits / temperature + Gumbel noise) with the noise drawn by JAX from the same
per-character keys, which is how `jax.random.categorical` samples. `sampling` uses it only
on the CPU (`lax.platform_dependent`), only where it applies (`supports`), and only when the
extension was built (`pip install` compiles it where a C++ compiler is found); everywhere
else, and with `model.impl = "scan"`, the lax.scan path runs and stays the reference that
tests/test_native.py compares this with.

`layer_forward` and `layer_backward` are the two recurrences of an LSTM layer's training
step (jaxchar/_lstm_train.h), which `jaxchar.fused.lstm_layer` runs on CPUs. They split the
hidden units between threads in the same way, and XLA may split them over the batch across
a device mesh (`_batch_parallel`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxchar.config import ModelConfig

try:
    from jaxchar import _native
except ImportError:  # not built here: the lax.scan path serves
    _native = None

_registered = False
MAX_ROWS = 64  # beyond it the rows' state outgrows the L2 cache; at 128 and 256 rows the
# kernel and the scan ran within 7% of each other (it is faster at every batch up to 64)


def available() -> bool:
    """Whether the kernel was built for a CPU like this one; registers it with XLA the first
    time."""
    global _registered
    if _native is None:
        return False
    if not _registered:
        targets = _native.targets()  # empty where this CPU lacks the build's instructions
        if not targets:
            return False
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        _registered = True
    return True


def supports(cfg: ModelConfig, rows: int, top_k: int | None, top_p) -> bool:
    """Whether `generate` can run this sampling: LSTM cells in float32 (hidden a multiple of
    16) or in bfloat16 on a CPU with AVX512-BF16 (hidden a multiple of 32), at most MAX_ROWS
    rows, no top-k or top-p filter, not the scan reference, kernel built."""
    if not available() or cfg.cell != "lstm" or cfg.impl == "scan" or rows > MAX_ROWS:
        return False
    if top_k is not None or top_p is not None:
        return False
    if cfg.dtype == "bfloat16":
        return cfg.hidden % 32 == 0 and bf16()
    return cfg.dtype == "float32" and cfg.hidden % 16 == 0


def bf16() -> bool:
    """Whether the kernel was built with bfloat16 products (a CPU with AVX512-BF16)."""
    return available() and bool(_native.bf16())


def threads_for(hidden: int) -> int:
    """How many threads split the units: a power of two up to the cores this process may
    use (at most 8), each with a multiple of 16 units."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = 1
    while 2 * threads <= min(cores or 1, 8) and hidden % (32 * threads) == 0:
        threads *= 2
    return threads


def _input_table(params: dict, cfg: ModelConfig) -> jax.Array:
    """Layer 0's input contribution for each character, bias included: [vocab, 4*hidden]."""
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
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
):
    """One character per key (keys [n, 2]) for each of the B rows of `carry` and the last
    logits [B, vocab]: returns ((carry, logits), ids [B, n]), as the stateful scan does. With
    `prompt` [B, P] the characters are read first (from `carry`) and the first draw uses
    their last logits instead of `logits`. `threads` defaults to `threads_for(cfg.hidden)`."""
    layers, hidden, vocab, n = cfg.layers, cfg.hidden, cfg.vocab_size, keys.shape[0]
    rows = logits.shape[0]
    temperature = jnp.asarray(temperature, jnp.float32)

    def gumbel():  # categorical's noise for logits [B, vocab], one draw per key
        return jax.vmap(lambda k: jax.random.gumbel(k, (rows, vocab)))(keys)

    def no_noise():
        return jnp.zeros((n, rows, vocab), jnp.float32)

    noise = jax.lax.cond(temperature > 0, gumbel, no_noise)
    lstm = [params[f"lstm_{layer}"] for layer in range(layers)]
    recurrent = jnp.stack([p["cell"]["recurrent_kernel"] for p in lstm])  # [L, H, 4H]
    if layers > 1:
        upper = jnp.stack([p["input_kernel"] for p in lstm[1:]])  # [L-1, H, 4H]
        upper_bias = jnp.stack([p["bias"] for p in lstm[1:]])  # [L-1, 4H]
    else:  # not read
        upper = upper_bias = jnp.zeros((1, 1, 1), jnp.float32)
    c0 = jnp.stack([c for c, _ in carry])  # [L, B, H]
    h0 = jnp.stack([h for _, h in carry])
    if prompt is None:
        prompt = jnp.zeros((rows, 0), jnp.int32)
    state = jax.ShapeDtypeStruct((layers, rows, hidden), jnp.float32)
    call = jax.ffi.ffi_call(
        "jaxchar_generate",
        (
            jax.ShapeDtypeStruct((rows, n), jnp.int32),
            state,
            state,
            jax.ShapeDtypeStruct((rows, vocab), jnp.float32),
        ),
        vmap_method="sequential",
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
        gate=np.int64(cfg.gate_activation == "hard_sigmoid"),
        threads=np.int64(threads or threads_for(hidden)),
        bf16=np.int64(cfg.dtype == "bfloat16"),
    )
    carry = tuple((c[layer], h[layer]) for layer in range(layers))
    return (carry, last), ids


def layer_supports(hidden: int, steps: int, dtype) -> bool:
    """Whether `layer_forward` and `layer_backward` can run an LSTM layer's training
    recurrences: float32 products, hidden a multiple of 64, at least one timestep, kernel
    built."""
    return dtype == jnp.float32 and hidden % 64 == 0 and steps > 0 and available()


def _require() -> None:
    if not available():
        raise RuntimeError("jaxchar's C++ kernels are not built for this CPU (see setup.py)")


def _batch_parallel(call, ins: tuple, outs: tuple):
    """`call(*arrays, gate, threads)` as an operation that XLA may split over the batch: ins
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

    def partition(gate, threads, mesh, arg_shapes, result_shape):
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
        return mesh, lambda *a: call(*a, gate, threads), results, args

    wrapped.def_partition(
        partition=partition,
        sharding_rule=", ".join(lhs) + " -> " + ", ".join(rhs),
        need_replication_factors=whole,
    )
    return wrapped


def _forward(w_h, xs, w_in, bias, c0, h0, gate, threads, hs_t):
    steps, batch, hidden = xs.shape[0], xs.shape[1], w_h.shape[0]
    state = jax.ShapeDtypeStruct((steps, batch, hidden), jnp.float32)
    gates = jax.ShapeDtypeStruct((steps, batch, 4 * hidden), jnp.float32)
    extra = 1 + (xs.shape[2] == 1)  # the scalar features' row, then a row of ones
    prev = jax.ShapeDtypeStruct((hidden + extra, steps, batch), jnp.float32)
    # hs transposed, or nothing for the kernel to write
    out_t = jax.ShapeDtypeStruct((hidden, steps if hs_t else 0, batch), jnp.float32)
    results = state, gates, state, prev, out_t
    call = jax.ffi.ffi_call("jaxchar_lstm_forward", results, vmap_method="sequential")
    return call(w_h, xs, w_in, bias, c0, h0, gate=np.int64(gate), threads=np.int64(threads))


# (custom_partitioning traces every parameter, defaults included: hs_t is fixed per function)
def _forward_call(w_h, xs, w_in, bias, c0, h0, gate, threads):
    return _forward(w_h, xs, w_in, bias, c0, h0, gate, threads, False)


def _forward_call_t(w_h, xs, w_in, bias, c0, h0, gate, threads):  # hs_t too
    return _forward(w_h, xs, w_in, bias, c0, h0, gate, threads, True)


def _backward_call(w_h, acts, cs, c0, d_hs, d_c, d_h, gate, threads):
    shapes = (acts.shape, c0.shape, c0.shape)
    results = tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes)
    call = jax.ffi.ffi_call("jaxchar_lstm_backward", results, vmap_method="sequential")
    return call(w_h, acts, cs, c0, d_hs, d_c, d_h, gate=np.int64(gate), threads=np.int64(threads))


@functools.cache
def _layer_calls():
    """The forward and backward calls, split over the batch. The arrays' (rank, batch
    dimension): [T, B, ...] sequences, [B, H] states, [H, T, B] h_prev, whole weights."""
    ins = (2, None), (3, 1), (1, None), (1, None), (2, 0), (2, 0)
    outs = (3, 1), (3, 1), (3, 1), (3, 2), (3, 2)
    forward = _batch_parallel(_forward_call, ins, outs)
    forward_t = _batch_parallel(_forward_call_t, ins, outs)
    backward = _batch_parallel(
        _backward_call,
        ((2, None), (3, 1), (3, 1), (2, 0), (3, 1), (2, 0), (2, 0)),
        ((3, 1), (2, 0), (2, 0)),
    )
    return forward, forward_t, backward


def layer_forward(
    w_h,
    xs,
    c0,
    h0,
    w_in,
    bias,
    kind: str = "sigmoid",
    threads: int | None = None,
    hs_t: bool = False,
):
    """The forward recurrence of jaxchar.fused.lstm_layer in C++: xs [T, B] scalar features
    (w_in, bias [4H]) or [T, B, 4H] projected inputs, to which the kernel adds bias [4H] (w_in
    then unused). Returns hs [T, B, H] and what the backward pass needs: the gates' outputs
    acts [T, B, 4H] (i, f, g, o), the cell states cs [T, B, H] and h_prev_t [H + 1 + scalar,
    T, B]: each step's previous h transposed (h0 first), then for scalar features xs itself,
    then ones (one product of h_prev_t with dz gives the gradients of w_h, of a scalar
    w_in and of the bias); with `hs_t`, also hs transposed, [H, T, B] (for the next layer's
    input-kernel gradient). `threads` defaults to `threads_for(hidden)`."""
    _require()
    hidden = w_h.shape[0]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    if xs.ndim == 2:  # the kernel tells scalar features by their width of 1
        xs = xs[..., None]
    else:
        w_in = jnp.zeros((4 * hidden,), jnp.float32)
    args = f32(w_h), f32(xs), f32(w_in).reshape(-1), f32(bias), f32(c0), f32(h0)
    forward, forward_t, _ = _layer_calls()
    outs = (forward_t if hs_t else forward)(
        *args, int(kind == "hard_sigmoid"), threads or threads_for(hidden)
    )
    return outs if hs_t else outs[:4]


def layer_backward(
    w_h, acts, cs, c0, d_hs, d_c, d_h, kind: str = "sigmoid", threads: int | None = None
):
    """The backward recurrence of jaxchar.fused.lstm_layer in C++: from the forward call's
    acts and cs, the first c0 and the gradients reaching hs [T, B, H] and the final c and h
    [B, H], returns dz [T, B, 4H] (the gradient of the pre-activations) and the gradients of
    c0 and h0."""
    _require()
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    args = f32(w_h), acts, cs, f32(c0), f32(d_hs), f32(d_c), f32(d_h)
    gate = int(kind == "hard_sigmoid")
    _, _, backward = _layer_calls()
    return backward(*args, gate, threads or threads_for(w_h.shape[0]))
