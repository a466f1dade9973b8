"""The LSTM layer's two recurrences as Pallas kernels for NVIDIA GPUs (the `pallas` backend):
one kernel launch per layer per sequence, each way.

Why: on a GPU the fused layer's `lax.scan` runs about ten small XLA kernels per timestep,
each of 1-3 us, with the GPU idle between them (docs/benchmarks.md, "On an NVIDIA H200
GPU"). Here the time loop runs inside one kernel: the recurrent kernel's columns stay with
the program that owns them for the whole sequence (in registers and L1, not re-launched),
the state never leaves the chip between steps, and the programs that share a block of rows
meet at a grid barrier once per step. What stays outside, as large XLA products, is what
needs no recurrence: the input projection before the forward loop and the weight gradients
after the backward loop (jaxchar/lstm/fused.py).

Work split (both kernels; jaxchar/lstm/pallas/grid.py has the grid and the barrier), for
hidden H, batch B (padded to a multiple of ROWS):
- forward step t: z = gx[t] + h_{t-1} W_h[:, own columns] ([ROWS, H] x [H, 4*UNITS]); gates,
  c and h of its units; h is written to hbuf[t+1], which every program of the row block
  reads after the barrier as the next step's h_{t-1};
- backward step t (reverse): dz of its units from dh, dc and the saved activations, written
  to dz[t]; after the barrier, dh_{t-1} of its units = dz[t] W_h^T[:, own units] ([ROWS, 4H]
  x [4H, UNITS]), which needs every program's dz[t] of the row block.

On a CPU the same kernels run in Pallas's interpreter (`interpret=True`), one program per
row block owning all units (programs run one after another there, so a barrier could never
be met, and with one unit group none is needed). That is how the CPU tests check these
kernels' arithmetic against the nn.scan reference on every shipped config's shapes; the
split over unit groups and the barrier run only on a GPU, where benchmarks/gpu_check.sh
tests them against the reference before timing them.

Layouts are time-major, as in fused.py: gx [T, B, 4H], hs [T, B, H]. Products take their
operands in `dtype` (float32 or bfloat16) and accumulate in float32; the state, gates and
outputs are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxchar.lstm.cells import gate
from jaxchar.lstm.folding import foldable
from jaxchar.lstm.pallas.grid import (
    ROWS,
    UNITS,
    barrier,
    launch,
    pad_rows,
    piece_width,
    plan,
    tiles,
)


def supports(hidden: int, dtype) -> tuple[bool, str]:
    """Whether the kernels can run a layer of `hidden` units in `dtype` products, and why not."""
    if dtype not in (jnp.float32, jnp.bfloat16):
        return False, "the Pallas kernels multiply in float32 or bfloat16"
    if hidden % UNITS:
        return False, f"the Pallas kernels need hidden % {UNITS} == 0"
    return True, ""


def _forward_kernel(
    gx_ref, w_ref, c0_ref, h0_ref, _sync_in, hbuf_ref, acts_ref, cbuf_ref, sync_ref, **static
):
    hidden, steps, groups = static["hidden"], static["steps"], static["groups"]
    kind, dtype, chunk = static["gate_activation"], static["dtype"], piece_width(hidden)
    b, rows, mine, cols = tiles(hidden, static["units"])

    c = c0_ref[rows, mine]
    hbuf_ref[0, rows, mine] = h0_ref[rows, mine]
    cbuf_ref[0, rows, mine] = c
    barrier(sync_ref, b, jnp.int32(1), groups)

    def step(t, c):
        h_prev = [  # [ROWS, chunk] pieces of h_{t-1}, every unit of the row block
            hbuf_ref[t, rows, pl.ds(k * chunk, chunk)].astype(dtype) for k in range(hidden // chunk)
        ]
        z = []
        for g in range(4):
            acc = gx_ref[t, rows, cols(g)]  # [ROWS, units], input projection and bias
            for k, h_k in enumerate(h_prev):
                w = w_ref[pl.ds(k * chunk, chunk), cols(g)]  # [chunk, units]
                acc += jnp.dot(h_k, w, preferred_element_type=jnp.float32)
            z.append(acc)
        a = [gate(z[0], kind), gate(z[1], kind), jnp.tanh(z[2]), gate(z[3], kind)]
        c = a[1] * c + a[0] * a[2]
        h = a[3] * jnp.tanh(c)
        for g in range(4):
            acts_ref[t, rows, cols(g)] = a[g]
        hbuf_ref[t + 1, rows, mine] = h
        cbuf_ref[t + 1, rows, mine] = c
        barrier(sync_ref, b, t + 2, groups)
        return c

    jax.lax.fori_loop(0, steps, step, c)


def _slope(d, a, kind: str):
    """d times the gate's slope at its output a (fused._through_gate, inside a kernel)."""
    if kind == "hard_sigmoid":
        return d * jnp.where((a > 0.0) & (a < 1.0), 0.2, 0.0)
    return d * a * (1.0 - a)


def gate_grads(dh, dc, acts, c, c_prev, kind: str):
    """One backward step of the cell, inside a kernel (the GPU's and the TPU's): from dh_t
    (the output's gradient plus the next step's), dc_t from the step above, the gates
    acts = (i, f, g, o) and c_t, c_{t-1}, returns (dz: the four gates' pre-activation
    gradients, dc_t with the path through h_t added; the caller carries dc_t * f on)."""
    i, f, g, o = acts
    tc = jnp.tanh(c)
    dc = dc + dh * o * (1.0 - tc * tc)
    dz = [
        _slope(dc * g, i, kind),
        _slope(dc * c_prev, f, kind),
        dc * i * (1.0 - g * g),
        _slope(dh * tc, o, kind),
    ]
    return dz, dc


def _backward_kernel(
    acts_ref,
    cbuf_ref,
    dhs_ref,
    dc_ref,
    dh_ref,
    wt_ref,
    _sync_in,
    dz_ref,
    dc0_ref,
    dh0_ref,
    sync_ref,
    **static,
):
    hidden, steps, groups = static["hidden"], static["steps"], static["groups"]
    kind, dtype, chunk = static["gate_activation"], static["dtype"], piece_width(hidden)
    b, rows, mine, cols = tiles(hidden, static["units"])

    def step(s, carry):
        t = steps - 1 - s
        dh_next, dc = carry  # [ROWS, units]: dh_t from step t+1, dc_t from above
        acts = [acts_ref[t, rows, cols(k)] for k in range(4)]
        c, c_prev = cbuf_ref[t + 1, rows, mine], cbuf_ref[t, rows, mine]
        dh = dhs_ref[t, rows, mine] + dh_next
        dz, dc = gate_grads(dh, dc, acts, c, c_prev, kind)
        for k in range(4):
            dz_ref[t, rows, cols(k)] = dz[k]
        barrier(sync_ref, b, s + 1, groups)
        # dh_{t-1} of this program's units: dz[t] of the whole row block times W_h^T
        acc = jnp.zeros((ROWS, static["units"]), jnp.float32)
        for k in range(4 * hidden // chunk):
            d = dz_ref[t, rows, pl.ds(k * chunk, chunk)].astype(dtype)  # [ROWS, chunk]
            w = wt_ref[pl.ds(k * chunk, chunk), mine]  # [chunk, units]
            acc += jnp.dot(d, w, preferred_element_type=jnp.float32)
        return acc, dc * acts[1]

    start = dh_ref[rows, mine], dc_ref[rows, mine]
    dh0, dc0 = jax.lax.fori_loop(0, steps, step, start)
    dh0_ref[rows, mine] = dh0
    dc0_ref[rows, mine] = dc0


def _launch(body, name: str, outs: list, args: list, *, steps, batch, hidden, **static):
    """One launch of `body` (grid.launch) with float32 outputs of the shapes `outs`."""
    kernel = functools.partial(
        body,
        hidden=hidden,
        steps=steps,
        gate_activation=static["gate_activation"],
        dtype=static["dtype"],
    )
    f32 = [(shape, jnp.float32) for shape in outs]
    interpret = static["interpret"]
    return launch(kernel, name, f32, args, hidden=hidden, batch=batch, interpret=interpret)


def forward(gx, w_h, c0, h0, *, gate_activation: str, dtype, interpret: bool):
    """gx [T, B, 4H] (inputs projected, bias added), w_h [H, 4H], c0 and h0 [B, H] ->
    ((hs [T, B, H], c_T, h_T), (acts [T, B, 4H], cs [T, B, H])), what fused._scan_forward
    returns."""
    steps, batch, width = gx.shape
    hidden, rows, f32 = width // 4, plan(width // 4, batch, interpret)[2] * ROWS, jnp.float32
    hbuf, acts, cbuf = _launch(
        _forward_kernel,
        "jaxchar_lstm_forward_pallas",
        [(steps + 1, rows, hidden), (steps, rows, width), (steps + 1, rows, hidden)],
        [
            pad_rows(gx.astype(f32), 1),
            w_h.astype(dtype),
            pad_rows(c0.astype(f32), 0),
            pad_rows(h0.astype(f32), 0),
        ],
        steps=steps,
        batch=batch,
        hidden=hidden,
        gate_activation=gate_activation,
        dtype=dtype,
        interpret=interpret,
    )
    hs, cs = hbuf[1:, :batch], cbuf[1:, :batch]
    return (hs, cs[-1], hs[-1]), (acts[:, :batch], cs)


def backward(w_h, acts, cs, c0, d_hs, d_c, d_h, *, gate_activation: str, dtype, interpret: bool):
    """The reverse recurrence: (dz [T, B, 4H], dc0, dh0), what fused._scan_backward returns."""
    steps, batch, width = acts.shape
    hidden, rows, f32 = width // 4, plan(width // 4, batch, interpret)[2] * ROWS, jnp.float32
    cbuf = jnp.concatenate([c0[None].astype(f32), cs], axis=0)  # [T + 1, B, H]
    dz, dc0, dh0 = _launch(
        _backward_kernel,
        "jaxchar_lstm_backward_pallas",
        [(steps, rows, width), (rows, hidden), (rows, hidden)],
        [
            pad_rows(acts, 1),
            pad_rows(cbuf, 1),
            pad_rows(d_hs.astype(f32), 1),
            pad_rows(d_c.astype(f32), 0),
            pad_rows(d_h.astype(f32), 0),
            w_h.T.astype(dtype),  # [4H, H]: the rows of W_h^T that each step's product needs
        ],
        steps=steps,
        batch=batch,
        hidden=hidden,
        gate_activation=gate_activation,
        dtype=dtype,
        interpret=interpret,
    )
    return dz[:, :batch], dc0[:batch], dh0[:batch]


def _kernels(target: str):
    """(forward, backward) of the GPU kernels here ("gpu") or the TPU ones ("tpu":
    jaxchar/lstm/pallas/tpu.py); both take and give the same arrays."""
    if target == "tpu":
        from jaxchar.lstm.pallas import tpu

        return tpu.forward, tpu.backward
    return forward, backward


def layer_forward(
    gx, w_h, c0, h0, *, gate_activation: str, dtype, interpret: bool, fallback, target="gpu"
):
    """`forward` (of the `target` kernels: "gpu" or "tpu") with a batching rule: under
    `jax.vmap` the mapped axis joins the rows (one kernel launch, whose programs must meet
    at the barrier, rather than a grid axis more); `fallback(gx, w_h, c0, h0)`, the lax.scan
    loop, runs where the weights are mapped."""
    run = _kernels(target)[0]

    def call(gx, w_h, c0, h0):
        (hs, c, h), (acts, cs) = run(
            gx, w_h, c0, h0, gate_activation=gate_activation, dtype=dtype, interpret=interpret
        )
        return hs, c, h, acts, cs

    hs, c, h, acts, cs = foldable(call, fallback, (1, None, 0, 0), (1, 0, 0, 1, 1))(gx, w_h, c0, h0)
    return (hs, c, h), (acts, cs)


def layer_backward(*args, gate_activation: str, dtype, interpret: bool, fallback, target="gpu"):
    """`backward` of (w_h, acts, cs, c0, d_hs, d_c, d_h) with the same batching rule;
    `fallback` takes the same arguments."""
    run = _kernels(target)[1]

    def call(*arrays):
        return run(*arrays, gate_activation=gate_activation, dtype=dtype, interpret=interpret)

    rows = (None, 1, 1, 0, 1, 0, 0), (1, 0, 0)
    return foldable(call, fallback, *rows)(*args)
