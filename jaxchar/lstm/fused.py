"""A whole LSTM layer as one function with a hand-written backward pass (the `fused` and
`native` backends).

Autodiff through the scanned cell does two products per step in its backward loop
(dh = dz W^T and the dW accumulation) and keeps more than it needs. Here the forward loop
stores only the gate activations and the cell states; the backward loop does one product per
step and writes dz, and the weight gradient is one [hidden, batch*time] x [batch*time,
4*hidden] product after the loop. The nn.scan cells (jaxchar/lstm/cells.py) are the
reference that tests compare this with (values and gradients).

The input projection is done here too, as one product over all timesteps before the loop
(vector inputs) or inside it (the tutorial's scalar input, where it is a broadcast multiply),
so that its weight gradient is also one product over [batch*time] written by hand: left to
autodiff, XLA transposed the whole [time, batch, 4*hidden] gradient in memory first.

With `kernel="native"` (chosen by jaxchar.lstm.backends), both loops run in C++ on CPUs
(jaxchar/lstm/native/layer.py) and as the lax.scan loops below on any other platform of the same
program; with `kernel="pallas"`, each loop is one Pallas kernel on NVIDIA GPUs
(jaxchar/lstm/pallas/layer.py) and on TPUs (pallas/tpu.py), interpreted on CPUs (the GPU
kernels, or the TPU ones with `Loop.interprets = "tpu"`), and the lax.scan loops elsewhere.
Under `jax.vmap` the kernels' batching rule folds the mapped axis into the
batch (one call for all), unless the weights themselves are mapped: then the lax.scan loops
run, batched by XLA.

Everything is time-major here: xs [time, batch, ...], hs [time, batch, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxchar.lstm import native, pallas
from jaxchar.lstm.cells import gate, matmul


def _through_gate(d: jax.Array, a: jax.Array, gate_activation: str) -> jax.Array:
    """d times the gate's slope at its output a: the gradient through the gate."""
    if gate_activation == "hard_sigmoid":  # slope 0.2 on the linear part, 0 where clipped
        return d * jnp.where((a > 0.0) & (a < 1.0), 0.2, 0.0)
    return d * a * (1 - a)


def _activate(z: jax.Array, gate_activation: str) -> jax.Array:
    """[..., 4H] pre-activations -> (gate i, gate f, tanh g, gate o), concatenated."""
    i, f, g, o = jnp.split(z, 4, axis=-1)
    return jnp.concatenate(
        [gate(i, gate_activation), gate(f, gate_activation), jnp.tanh(g), gate(o, gate_activation)],
        axis=-1,
    )


def _input(x_t, w_in, bias):
    """The input contribution of one step: a scalar feature [B] times w_in [4H] plus bias,
    or an already projected [B, 4H] (w_in is None)."""
    return x_t if w_in is None else x_t[:, None] * w_in + bias


@dataclass(frozen=True)
class Loop:
    """How the layer's two recurrences run, passed down as one static value: the products'
    dtype, the gates' function (see `cells.gate`), whether to append hs as [H, T, B] for the
    layer above (see `lstm_layer`), the kernel that runs them ("native", "pallas" or None:
    the lax.scan loops; jaxchar.lstm.backends's Choice.kernel), the scans' unroll, and which
    Pallas kernels a CPU interprets ("gpu" or "tpu": for tests; a GPU and a TPU each run
    their own)."""

    dtype: Any = jnp.float32
    gate_activation: str = "sigmoid"
    with_hs_fm: bool = False
    kernel: str | None = None
    unroll: int = 1
    interprets: str = "gpu"


def _scalar(xs) -> bool:
    return xs.ndim == 2  # [T, B] scalar features, else [T, B, F] vectors


def _forward(w_h, xs, c0, h0, w_in, bias, loop: Loop):
    dtype, gate_activation, with_hs_fm = loop.dtype, loop.gate_activation, loop.with_hs_fm
    kernel, unroll = loop.kernel, loop.unroll
    # vector inputs: one [T*B, F] x [F, 4H] product for all timesteps, outside the loop
    gx = xs if _scalar(xs) else matmul(xs, w_in, dtype)

    def scan(w_h, gx, c0, h0, w_in, bias):
        if _scalar(xs):
            return _scan_forward(w_h, gx, c0, h0, w_in, bias, dtype, gate_activation, unroll)
        args = w_h, gx + bias, c0, h0, None, None, dtype, gate_activation, unroll
        return _scan_forward(*args)

    def with_fm(out):  # (hs, c, h) -> (hs, c, h, hs [H, T, B]) where it is asked for
        return (*out, out[0].transpose(2, 0, 1)) if with_hs_fm else out

    if kernel == "pallas" and xs.shape[0]:
        out, (acts, cs) = _pallas_forward(w_h, gx, c0, h0, w_in, bias, loop)
        return with_fm(out), (acts, cs, None)
    if kernel != "native" or xs.shape[0] == 0:
        out, (acts, cs) = scan(w_h, gx, c0, h0, w_in, bias)
        return with_fm(out), (acts, cs, None)

    def on_cpu(w_h, gx, c0, h0, w_in, bias):  # adds the bias to projected inputs itself
        hs, acts, cs, h_prev_fm, *hs_fm = native.layer_forward(
            w_h,
            gx,
            c0,
            h0,
            w_in,
            bias,
            gate_activation,
            hs_fm=with_hs_fm,
            fallback=_kernel_forward_xla(gate_activation),
        )
        return (hs, cs[-1], hs[-1], *hs_fm), (acts, cs, h_prev_fm)

    def elsewhere(*args):  # what the kernel returns, on other platforms
        out, (acts, cs) = scan(*args)
        return with_fm(out), (acts, cs, _h_prev_fm(h0, out[0], xs))

    args = w_h, gx, c0, h0, w_in, bias
    return jax.lax.platform_dependent(*args, cpu=on_cpu, default=elsewhere)


def _pallas_branches(loop: Loop, hidden: int, call, elsewhere) -> dict:
    """platform_dependent's branches for a Pallas loop: `call(target, interpret)` compiled
    for NVIDIA GPUs ("gpu") and TPUs ("tpu"), interpreted on CPUs (`loop.interprets`), and
    `elsewhere` (the lax.scan loop) on other platforms and on a TPU the TPU kernels do not
    fit (a module lowered for several platforms holds each one's branch)."""
    branches = {"cuda": call("gpu", False), "cpu": call(loop.interprets, True)}
    branches["tpu"] = (
        call("tpu", False) if pallas.tpu.supports(hidden, loop.dtype)[0] else elsewhere
    )
    return branches


def _pallas_forward(w_h, gx, c0, h0, w_in, bias, loop: Loop):
    """The forward loop as one Pallas kernel: compiled on NVIDIA GPUs and TPUs, interpreted
    on CPUs (where only a forced `model.impl = "pallas"` gets here), the lax.scan loop
    elsewhere."""
    dtype, gate_activation = loop.dtype, loop.gate_activation
    # scalar inputs too become [T, B, 4H] before the loop: the kernel reads one projection
    gx = gx[..., None] * w_in + bias if gx.ndim == 2 else gx + bias

    def scan(gx, w_h, c0, h0):
        (hs, c, h), (acts, cs) = _scan_forward(w_h, gx, c0, h0, None, None, dtype, gate_activation)
        return hs, c, h, acts, cs

    def kernel(target, interpret):
        def run(gx, w_h, c0, h0):
            kw = dict(gate_activation=gate_activation, dtype=dtype, interpret=interpret)
            return pallas.layer_forward(gx, w_h, c0, h0, fallback=scan, target=target, **kw)

        return run

    def elsewhere(*args):
        hs, c, h, acts, cs = scan(*args)
        return (hs, c, h), (acts, cs)

    branches = _pallas_branches(loop, w_h.shape[0], kernel, elsewhere)
    return jax.lax.platform_dependent(gx, w_h, c0, h0, **branches, default=elsewhere)


def _h_prev_fm(h0, hs, xs):
    """[H + 1 + scalar, T, B]: each step's h_{t-1} transposed (h0 first), then for scalar
    inputs xs, then ones: the kernel's third residual (see native.layer_forward)."""
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0).transpose(2, 0, 1)
    extra = [xs[None]] if _scalar(xs) else []
    extra.append(jnp.ones((1, *xs.shape[:2]), h_prev.dtype))
    return jnp.concatenate([h_prev, *extra], axis=0)


def _kernel_forward_xla(gate_activation):
    """native.layer_forward's raw call in plain JAX (its batching rule's fallback)."""

    def forward(w_h, xs, w_in, bias, c0, h0):  # xs [T, B, 1] scalars or [T, B, 4H]
        scalar = xs.shape[2] == 1
        inputs = xs[..., 0] if scalar else xs + bias
        (hs, _, _), (acts, cs) = _scan_forward(
            w_h,
            inputs,
            c0,
            h0,
            w_in if scalar else None,
            bias if scalar else None,
            jnp.float32,
            gate_activation,
        )
        hs_fm = jnp.zeros((w_h.shape[0], 0, xs.shape[1]), jnp.float32)
        return hs, acts, cs, _h_prev_fm(h0, hs, inputs if scalar else xs), hs_fm

    return forward


# The two loops are jitted on their own (static: dtype, gates, unroll) so that a layer run
# outside jit, as model.init and eager model.apply do, reuses one compiled loop per shape
# instead of compiling a fresh lax.scan each call; inside a jitted caller they are inlined.
_LOOP_STATICS = ("dtype", "gate_activation", "unroll")


@partial(jax.jit, static_argnames=_LOOP_STATICS)
def _scan_forward(w_h, xs, c0, h0, w_in, bias, dtype, gate_activation, unroll=1):

    def body(carry, x_t):
        c, h = carry
        z = _input(x_t, w_in, bias) + matmul(h, w_h, dtype)
        a = _activate(z, gate_activation)
        i, f, g, o = jnp.split(a, 4, axis=-1)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (c, h), (h, a, c)

    (c, h), (hs, acts, cs) = jax.lax.scan(body, (c0, h0), xs, unroll=unroll)
    return (hs, c, h), (acts, cs)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def lstm_layer(w_h, xs, c0, h0, w_in, bias, xs_fm=None, loop: Loop = Loop()):
    """Runs the layer over xs; returns (hs [T, B, H], final c, final h).

    xs is [T, B] scalars (then w_in is [4H], applied inside the loop) or [T, B, F] vectors
    (then w_in is [F, 4H], applied to all timesteps before it); bias is [4H].
    `loop` says how the recurrences run (see `Loop`).

    Between stacked layers: `loop.with_hs_fm` appends hs transposed, [H, T, B], to the
    outputs, and a layer given `xs_fm` (its vector input transposed, [F, T, B]: the same
    values as xs) takes its input-kernel gradient from it, the layout that product wants. On
    a CPU the kernel writes hs_fm as it goes, where XLA would transpose hs in memory (4-10 ms
    of a stacked step).
    hs_fm carries no gradient: it stands for hs, whose gradient flows through xs.

    `loop.kernel` names the backend that runs both recurrences: "native" (C++ on CPUs:
    float32, hidden % 64 == 0), "pallas" (one Pallas kernel each on NVIDIA GPUs, see
    pallas/layer.py) or None (the lax.scan loops); the caller, jaxchar.lstm.backends, has
    checked that it applies."""
    return _forward(w_h, xs, c0, h0, w_in, bias, loop)[0]


def _fwd(w_h, xs, c0, h0, w_in, bias, xs_fm, loop: Loop):
    out, (acts, cs, h_prev_fm) = _forward(w_h, xs, c0, h0, w_in, bias, loop)
    return out, (w_h, xs, c0, h0, w_in, out[0], acts, cs, h_prev_fm, xs_fm)


def _bwd(loop: Loop, res, grads):
    dtype, gate_activation = loop.dtype, loop.gate_activation
    kernel, unroll = loop.kernel, loop.unroll
    w_h, xs, c0, h0, w_in, hs, acts, cs, h_prev_fm, xs_fm = res
    d_hs, d_c_last, d_h_last = grads[:3]  # (hs_fm's, if any, is dropped: see lstm_layer)
    if kernel == "pallas" and acts.shape[0]:

        def scan(w_h, acts, cs, c0, *args):
            return _scan_backward(w_h, acts, cs, c0, *args, dtype, gate_activation)

        def pallas_kernel(target, interpret):
            def run(*args):
                kw = dict(gate_activation=gate_activation, dtype=dtype, interpret=interpret)
                return pallas.layer_backward(
                    w_h, acts, cs, c0, *args, fallback=scan, target=target, **kw
                )

            return run

        def other(*args):
            return scan(w_h, acts, cs, c0, *args)

        branches = _pallas_branches(loop, w_h.shape[0], pallas_kernel, other)
        dz, dc0, dh0 = jax.lax.platform_dependent(
            d_hs, d_c_last, d_h_last, **branches, default=other
        )
    elif kernel == "native" and acts.shape[0]:  # the forward pass ran the C++ kernel

        def xla(w_h, acts, cs, c0, *args):
            return _scan_backward(w_h, acts, cs, c0, *args, jnp.float32, gate_activation)

        def on_cpu(*args):
            return native.layer_backward(w_h, acts, cs, c0, *args, gate_activation, fallback=xla)

        def elsewhere(*args):
            return _scan_backward(w_h, acts, cs, c0, *args, dtype, gate_activation)

        grads = d_hs, d_c_last, d_h_last
        dz, dc0, dh0 = jax.lax.platform_dependent(*grads, cpu=on_cpu, default=elsewhere)
    else:
        dz, dc0, dh0 = _scan_backward(
            w_h, acts, cs, c0, d_hs, d_c_last, d_h_last, dtype, gate_activation, unroll
        )

    # each weight gradient is one product over all [time, batch] rows, contracting both
    # dimensions rather than a reshaped [T*B] one: with the batch split over devices, a reshape
    # would gather it onto each device, where this sums a product per device
    def weight_grad(inputs, time_batch=(0, 1)):  # [T, B, K] (or [K, T, B]) -> [K, 4H]
        a, b = inputs.astype(dtype), dz.astype(dtype)
        dims = (time_batch, (0, 1)), ((), ())
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

    hidden = w_h.shape[0]
    if h_prev_fm is None:  # (only the C++ forward writes h_{t-1} transposed)
        d_w_h = weight_grad(jnp.concatenate([h0[None], hs[:-1]], axis=0))
        d_bias = dz.sum(axis=(0, 1))
        d_w_in = weight_grad(xs[..., None])[0] if _scalar(xs) else None
    else:  # [H + 1 + scalar, T, B]: h_{t-1}, the layout the product wants, (xs,) ones
        d = weight_grad(h_prev_fm, (1, 2))
        d_w_h, d_bias = d[:hidden], d[-1]
        d_w_in = d[hidden] if _scalar(xs) else None
    if _scalar(xs):
        d_xs = jnp.dot(dz, w_in)  # [T, B]
    else:
        d_w_in = weight_grad(xs) if xs_fm is None else weight_grad(xs_fm, (1, 2))
        d_xs = matmul(dz, w_in.T, dtype).astype(xs.dtype)  # [T, B, F]
    d_xs_fm = None if xs_fm is None else jnp.zeros_like(xs_fm)
    return d_w_h, d_xs, dc0, dh0, d_w_in, d_bias, d_xs_fm


@partial(jax.jit, static_argnames=_LOOP_STATICS)
def _scan_backward(w_h, acts, cs, c0, d_hs, d_c_last, d_h_last, dtype, gate_activation, unroll=1):
    """dz [T, B, 4H] and the gradients of c0 and h0, by a reverse lax.scan."""
    c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)
    w_h_transposed = w_h.T.astype(dtype)

    def body(carry, inputs):
        dh_next, dc_next = carry
        dh_out, a, c, cp = inputs
        i, f, g, o = jnp.split(a, 4, axis=-1)
        tc = jnp.tanh(c)
        dh = dh_out + dh_next
        dc = dc_next + dh * o * (1 - tc * tc)
        dz = jnp.concatenate(
            [
                _through_gate(dc * g, i, gate_activation),
                _through_gate(dc * cp, f, gate_activation),
                dc * i * (1 - g * g),
                _through_gate(dh * tc, o, gate_activation),
            ],
            axis=-1,
        )  # [B, 4H]
        dh_prev = matmul(dz, w_h_transposed, dtype)
        return (dh_prev, dc * f), dz

    (dh0, dc0), dz = jax.lax.scan(
        body, (d_h_last, d_c_last), (d_hs, acts, cs, c_prev), reverse=True, unroll=unroll
    )
    return dz, dc0, dh0


lstm_layer.defvjp(_fwd, _bwd)
