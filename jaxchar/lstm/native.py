"""jaxchar's C++ kernels for CPUs (jaxchar/csrc/): stateful generation of up to 64 rows at
once, and the recurrences of the LSTM layer's training step, as XLA FFI calls.

This module only loads the kernels and wraps their calls; `jaxchar.lstm.backends` decides
whether one runs. setup.py compiles the sources once per instruction set (VARIANTS, best
first); `variant()` imports the best one that this CPU's flags allow, or none: on other
architectures, on CPUs without AVX-512 (only variants that `auto` may choose are built: an
AVX2 build measured slower than the JAX paths, docs/benchmarks.md), where nothing was built,
and when the environment variable JAXCHAR_NATIVE is 0. Two deployment settings (like
XLA_FLAGS) are read once, on first use, and are the only switches outside the config:
JAXCHAR_NATIVE=0 keeps the shared library from being loaded at all, and JAXCHAR_CPU_AS=avx2
(or avx512) makes the loader see only that instruction set's flags, so that one machine
can show what a smaller CPU runs (CI reruns the backend tests that way).

At batch 1 each character is a few matrix-vector products; XLA runs them on one core and
streams the kernels from the L3 cache every step (the recurrent kernel alone is 1 MB at
hidden 256). `generate` runs the whole loop as one call, splits the hidden units between the
cores and keeps each core's share of the weights in its own L2. It takes and returns what the
stateful `lax.scan` in `jaxchar.sampling` does and draws the same characters: argmax at
temperature 0, otherwise argmax(logits / temperature + Gumbel noise) with the noise drawn by
JAX from the same per-character keys, which is how `jax.random.categorical` samples.

`layer_forward` and `layer_backward` are the two recurrences of an LSTM layer's training
step (jaxchar/csrc/lstm_train.h), which `jaxchar.lstm.fused.lstm_layer` runs on CPUs. They
split the hidden units between threads in the same way, and XLA may split them over the
batch across a device mesh (`_batch_parallel`). The thread count is fixed per call and the
kernels never run on fewer threads than asked (jaxchar/csrc/native.cc), so the same inputs
give the same bits.
"""

from __future__ import annotations

import functools
import importlib
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxchar.config import ModelConfig
from jaxchar.lstm.folding import fold, foldable, unfold

MAX_ROWS = 64  # beyond it the rows' state outgrows the L2 cache; at 128 and 256 rows the
# kernel and the scan ran within 7% of each other (it is faster at every batch up to 64)
NOISE_BYTES = 8 << 20  # Gumbel noise drawn per call: sampling memory stays O(rows x vocab)

# variant -> the CPU flags (as /proc/cpuinfo names them) its -march needs; best first
VARIANTS = {
    "avx512bf16": (
        "avx2",
        "fma",
        "bmi2",
        "avx512f",
        "avx512bw",
        "avx512dq",
        "avx512vl",
        "avx512cd",
        "avx512_bf16",
    ),
    "avx512": ("avx2", "fma", "bmi2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"),
}
# what JAXCHAR_CPU_AS may name: the flags of a CPU kind that has no built variant
CPU_KINDS = {**VARIANTS, "avx2": ("avx2", "fma", "bmi2")}


def _real_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags, from /proc/cpuinfo (empty where there is none);
    with JAXCHAR_CPU_AS=KIND only those of that kind (CPU_KINDS) that this CPU also has, so
    an AVX-512 machine can behave as an AVX2-only one. x86 flags that no kind names (sse,
    ...) are kept; only the vector extensions are masked."""
    flags = _real_flags()
    kind = os.environ.get("JAXCHAR_CPU_AS", "").strip().lower()
    if not kind:
        return flags
    if kind not in CPU_KINDS:
        raise ValueError(f"JAXCHAR_CPU_AS={kind!r}: name one of {', '.join(CPU_KINDS)}")
    masked = {f for needs in CPU_KINDS.values() for f in needs} - set(CPU_KINDS[kind])
    return flags - masked - {"avx512_vnni", "avx512vbmi", "amx_bf16", "avx512ifma"}


@functools.cache
def cpu_model() -> str | None:
    """The CPU's model name, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def variant() -> tuple[str | None, str]:
    """(the loaded variant's name or None, why): imports the best built variant this CPU
    can run and registers its FFI targets with XLA. JAXCHAR_NATIVE=0 loads none; naming a
    variant (JAXCHAR_NATIVE=avx512) loads that one if this CPU can run it (benchmarks)."""
    wish = os.environ.get("JAXCHAR_NATIVE", "").strip().lower()
    if wish in ("0", "false", "no", "off"):
        return None, "turned off by JAXCHAR_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"no kernels for {platform.machine()} (x86-64 only)"
    flags, built = cpu_flags(), []
    for name, needs in VARIANTS.items():
        if wish in VARIANTS and name != wish:
            continue
        try:
            module = importlib.import_module(f"jaxchar.lstm._native_{name}")
        except ImportError:
            continue
        built.append(name)
        if not set(needs) <= flags:
            continue
        targets = module.targets()  # empty where the CPU lacks what the build used
        if not targets:
            continue
        for target, capsule in targets.items():
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
        chosen = "named by JAXCHAR_NATIVE" if wish == name else "the best this CPU runs"
        return name, chosen
    if not built:
        return None, "the C++ extension is not built (no C++ compiler at install time?)"
    return None, f"this CPU lacks the instructions of the built variants ({', '.join(built)})"


def available() -> bool:
    """Whether a kernel variant is loaded for this CPU."""
    return variant()[0] is not None


def bf16() -> bool:
    """Whether the loaded variant multiplies in bfloat16 (a CPU with AVX512-BF16)."""
    return variant()[0] == "avx512bf16"


def generate_supports(cfg: ModelConfig, rows: int) -> tuple[bool, str]:
    """Whether `generate` can run this model at `rows` rows, and if not, why."""
    if not available():
        return False, variant()[1]
    if cfg.cell != "lstm":
        return False, "the kernel runs LSTM cells only"
    if rows > MAX_ROWS:
        return False, f"{rows} rows: the kernel takes at most {MAX_ROWS}"
    if cfg.dtype == "bfloat16":
        if not bf16():
            return False, "bfloat16 products need the avx512bf16 variant"
        return cfg.hidden % 32 == 0, "bfloat16 needs hidden % 32 == 0"
    return cfg.hidden % 16 == 0, "float32 needs hidden % 16 == 0"


def layer_supports(hidden: int, dtype) -> tuple[bool, str]:
    """Whether `layer_forward` and `layer_backward` can run an LSTM layer, and if not, why."""
    if not available():
        return False, variant()[1]
    if dtype != jnp.float32:
        return False, "the training kernels compute in float32 only"
    return hidden % 64 == 0, "the training kernels need hidden % 64 == 0"


def chunk_length(rows: int, vocab: int) -> int:
    """Characters per `generate` call, so that its noise stays under NOISE_BYTES."""
    return max(16, NOISE_BYTES // (4 * rows * max(vocab, 1)))


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
    call = _batched_generate(cfg, threads, fallback or _no_fallback, fits)
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
        threads=np.int64(threads or threads_for(hidden)),
        bf16=np.int64(cfg.dtype == "bfloat16"),
    )
    carry = tuple((c[layer], h[layer]) for layer in range(layers))
    return (carry, last), ids


def _require() -> None:
    if not available():
        raise RuntimeError(f"jaxchar's C++ kernels cannot run: {variant()[1]}")


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
    input-kernel gradient). `threads` defaults to `threads_for(hidden)`.

    `fallback(w_h, xs, w_in, bias, c0, h0)` is the same recurrence in plain JAX, on the
    kernel's own arguments (xs [T, B, 1 or 4H], w_in [4H]) and with its outputs (hs_fm
    [H, 0, B] when not asked for): it runs under a `jax.vmap` that maps the weights."""
    _require()
    hidden = w_h.shape[0]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    if xs.ndim == 2:  # the kernel tells scalar features by their width of 1
        xs = xs[..., None]
    else:
        w_in = jnp.zeros((4 * hidden,), jnp.float32)
    args = f32(w_h), f32(xs), f32(w_in).reshape(-1), f32(bias), f32(c0), f32(h0)
    forward, forward_fm, _ = _layer_calls()
    hard_sigmoid, threads = int(gate_activation == "hard_sigmoid"), threads or threads_for(hidden)

    def kernel(*args):
        return (forward_fm if hs_fm else forward)(*args, hard_sigmoid, threads)

    rows = (None, 1, None, None, 0, 0), (1, 1, 1, 2, 2)
    outs = foldable(kernel, fallback or _no_fallback, *rows)(*args)
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
    _require()
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    args = f32(w_h), acts, cs, f32(c0), f32(d_hs), f32(d_c), f32(d_h)
    hard_sigmoid, threads = (
        int(gate_activation == "hard_sigmoid"),
        threads or threads_for(w_h.shape[0]),
    )
    _, _, backward = _layer_calls()

    def kernel(*args):
        return backward(*args, hard_sigmoid, threads)

    rows = (None, 1, 1, 0, 1, 0, 0), (1, 0, 0)
    return foldable(kernel, fallback or _no_fallback, *rows)(*args)


def _no_fallback(*args):
    raise NotImplementedError("a kernel call mapped over its weights needs a fallback")
