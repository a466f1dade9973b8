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

Work split (both kernels), for hidden H, batch B (padded to a multiple of ROWS):
- program (u, b) owns hidden units [u*UNITS, (u+1)*UNITS) of rows [b*ROWS, (b+1)*ROWS): the
  four gates' columns of those units, so that the cell update is local to the program;
- forward step t: z = gx[t] + h_{t-1} W_h[:, own columns] ([ROWS, H] x [H, 4*UNITS]); gates,
  c and h of its units; h is written to hbuf[t+1], which every program of the row block
  reads after the barrier as the next step's h_{t-1};
- backward step t (reverse): dz of its units from dh, dc and the saved activations, written
  to dz[t]; after the barrier, dh_{t-1} of its units = dz[t] W_h^T[:, own units] ([ROWS, 4H]
  x [4H, UNITS]), which needs every program's dz[t] of the row block.
- The barrier is a counter per row block in global memory: a CTA barrier (every thread's
  stores issued), one acquire-release atomic add, then atomic reads until all UNITS-groups of
  the block have arrived. It needs the programs of a row block resident at once: H/UNITS
  programs (16 at hidden 256, 24 at 384), far below a Hopper GPU's 132 SMs, and the row
  block is the fast grid axis so that its programs are launched together. A bounded spin
  turns a scheduling failure into wrong numbers (which the device script's comparison with
  the reference catches) rather than a hang.

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

ROWS = 16  # rows per program: Triton's smallest dot tile
UNITS = 16  # hidden units per program on a GPU (4*UNITS columns of W_h, 64 KB in float32
# at hidden 256): small enough to stay resident, and H/UNITS programs per row block
SPIN_LIMIT = 1 << 24  # barrier polls before a program gives up waiting (see above)


def supports(hidden: int, dtype) -> tuple[bool, str]:
    """Whether the kernels can run a layer of `hidden` units in `dtype` products, and why not."""
    if dtype not in (jnp.float32, jnp.bfloat16):
        return False, "the Pallas kernels multiply in float32 or bfloat16"
    if hidden % UNITS:
        return False, f"the Pallas kernels need hidden % {UNITS} == 0"
    return True, ""


def _chunk(n: int) -> int:
    """The widest power of two up to 128 dividing n: Triton's tensors have power-of-two
    shapes, so a contraction over n (hidden 384, say) runs as n / chunk products."""
    c = 1
    while c < 128 and n % (2 * c) == 0:
        c *= 2
    return c


def _barrier(sync_ref, block, generation: jax.Array, groups: int) -> None:
    """Waits until all `groups` programs of row block `block` have arrived `generation`
    times. A no-op with one group (the interpreter's case: no other program to wait for)."""
    if groups == 1:
        return
    from jax.experimental.pallas import triton as plgpu

    plgpu.debug_barrier()  # every thread of this program has issued its stores
    plgpu.atomic_add(sync_ref, block, 1)  # acquire-release, GPU scope: publishes them
    target = generation * groups

    def waiting(carry):
        seen, spins = carry
        return (seen < target) & (spins < SPIN_LIMIT)

    def poll(carry):
        return plgpu.atomic_add(sync_ref, block, 0), carry[1] + 1

    jax.lax.while_loop(waiting, poll, (jnp.int32(0), jnp.int32(0)))
    plgpu.debug_barrier()  # no thread reads other programs' values before the wait ended


def _tiles(static: dict):
    """This program's row block b and its slices: its rows, its units, and gate g's
    columns of its units (`cols(g)`)."""
    hidden, units = static["hidden"], static["units"]
    u, b = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(pl.multiple_of(b * ROWS, ROWS), ROWS)
    mine = pl.ds(pl.multiple_of(u * units, units), units)

    def cols(g):
        return pl.ds(pl.multiple_of(g * hidden + u * units, units), units)

    return b, rows, mine, cols


def _forward_kernel(
    gx_ref, w_ref, c0_ref, h0_ref, _sync_in, hbuf_ref, acts_ref, cbuf_ref, sync_ref, **static
):
    hidden, steps, groups = static["hidden"], static["steps"], static["groups"]
    kind, dtype, chunk = static["gate_activation"], static["dtype"], _chunk(hidden)
    b, rows, mine, cols = _tiles(static)

    c = c0_ref[rows, mine]
    hbuf_ref[0, rows, mine] = h0_ref[rows, mine]
    cbuf_ref[0, rows, mine] = c
    _barrier(sync_ref, b, jnp.int32(1), groups)

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
        _barrier(sync_ref, b, t + 2, groups)
        return c

    jax.lax.fori_loop(0, steps, step, c)


def _slope(d, a, kind: str):
    """d times the gate's slope at its output a (fused._through_gate, inside a kernel)."""
    if kind == "hard_sigmoid":
        return d * jnp.where((a > 0.0) & (a < 1.0), 0.2, 0.0)
    return d * a * (1.0 - a)


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
    kind, dtype, chunk = static["gate_activation"], static["dtype"], _chunk(hidden)
    b, rows, mine, cols = _tiles(static)

    def step(s, carry):
        t = steps - 1 - s
        dh_next, dc = carry  # [ROWS, units]: dh_t from step t+1, dc_t from above
        i, f, g, o = (acts_ref[t, rows, cols(k)] for k in range(4))
        c, c_prev = cbuf_ref[t + 1, rows, mine], cbuf_ref[t, rows, mine]
        dh = dhs_ref[t, rows, mine] + dh_next
        tc = jnp.tanh(c)
        dc = dc + dh * o * (1.0 - tc * tc)
        dz = [
            _slope(dc * g, i, kind),
            _slope(dc * c_prev, f, kind),
            dc * i * (1.0 - g * g),
            _slope(dh * tc, o, kind),
        ]
        for k in range(4):
            dz_ref[t, rows, cols(k)] = dz[k]
        _barrier(sync_ref, b, s + 1, groups)
        # dh_{t-1} of this program's units: dz[t] of the whole row block times W_h^T
        acc = jnp.zeros((ROWS, static["units"]), jnp.float32)
        for k in range(4 * hidden // chunk):
            d = dz_ref[t, rows, pl.ds(k * chunk, chunk)].astype(dtype)  # [ROWS, chunk]
            w = wt_ref[pl.ds(k * chunk, chunk), mine]  # [chunk, units]
            acc += jnp.dot(d, w, preferred_element_type=jnp.float32)
        return acc, dc * f

    start = dh_ref[rows, mine], dc_ref[rows, mine]
    dh0, dc0 = jax.lax.fori_loop(0, steps, step, start)
    dh0_ref[rows, mine] = dh0
    dc0_ref[rows, mine] = dc0


def _pad_rows(x: jax.Array, axis: int) -> jax.Array:
    extra = -x.shape[axis] % ROWS
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _plan(hidden: int, batch: int, interpret: bool) -> tuple[int, int, int]:
    """(units per program, unit groups, row blocks)."""
    units = hidden if interpret else UNITS
    return units, hidden // units, -(-batch // ROWS)


def _params(interpret: bool, groups: int):
    if interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu

    # a 16-row tile of 4 gates x 16 units and its operands: 4 warps
    return {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=1)}


def _launch(body, name: str, outs: list, args: list, *, steps, batch, hidden, **static):
    """One pallas_call of `body` over the (unit group, row block) grid, with the barrier's
    counters (one per row block, zeroed) as its last input and output."""
    units, groups, blocks = _plan(hidden, batch, static["interpret"])
    f32 = jnp.float32
    kernel = functools.partial(
        body,
        hidden=hidden,
        units=units,
        steps=steps,
        groups=groups,
        gate_activation=static["gate_activation"],
        dtype=static["dtype"],
    )
    shapes = [jax.ShapeDtypeStruct(s, f32) for s in outs]
    *results, _ = pl.pallas_call(
        kernel,
        grid=(groups, blocks),
        out_shape=(*shapes, jax.ShapeDtypeStruct((blocks,), jnp.int32)),
        input_output_aliases={len(args): len(outs)},  # the barrier counters start at zero
        interpret=static["interpret"],
        name=name,
        **_params(static["interpret"], groups),
    )(*args, jnp.zeros((blocks,), jnp.int32))
    return results


def forward(gx, w_h, c0, h0, *, gate_activation: str, dtype, interpret: bool):
    """gx [T, B, 4H] (inputs projected, bias added), w_h [H, 4H], c0 and h0 [B, H] ->
    ((hs [T, B, H], c_T, h_T), (acts [T, B, 4H], cs [T, B, H])), what fused._scan_forward
    returns."""
    steps, batch, width = gx.shape
    hidden, rows, f32 = width // 4, _plan(width // 4, batch, interpret)[2] * ROWS, jnp.float32
    hbuf, acts, cbuf = _launch(
        _forward_kernel,
        "jaxchar_lstm_forward_pallas",
        [(steps + 1, rows, hidden), (steps, rows, width), (steps + 1, rows, hidden)],
        [
            _pad_rows(gx.astype(f32), 1),
            w_h.astype(dtype),
            _pad_rows(c0.astype(f32), 0),
            _pad_rows(h0.astype(f32), 0),
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
    hidden, rows, f32 = width // 4, _plan(width // 4, batch, interpret)[2] * ROWS, jnp.float32
    cbuf = jnp.concatenate([c0[None].astype(f32), cs], axis=0)  # [T + 1, B, H]
    dz, dc0, dh0 = _launch(
        _backward_kernel,
        "jaxchar_lstm_backward_pallas",
        [(steps, rows, width), (rows, hidden), (rows, hidden)],
        [
            _pad_rows(acts, 1),
            _pad_rows(cbuf, 1),
            _pad_rows(d_hs.astype(f32), 1),
            _pad_rows(d_c.astype(f32), 0),
            _pad_rows(d_h.astype(f32), 0),
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


def layer_forward(gx, w_h, c0, h0, *, gate_activation: str, dtype, interpret: bool, fallback):
    """`forward` with a batching rule: under `jax.vmap` the mapped axis joins the rows (one
    kernel launch, whose programs must meet at the barrier, rather than a grid axis more);
    `fallback(gx, w_h, c0, h0)`, the lax.scan loop, runs where the weights are mapped."""

    def call(gx, w_h, c0, h0):
        (hs, c, h), (acts, cs) = forward(
            gx, w_h, c0, h0, gate_activation=gate_activation, dtype=dtype, interpret=interpret
        )
        return hs, c, h, acts, cs

    hs, c, h, acts, cs = foldable(call, fallback, (1, None, 0, 0), (1, 0, 0, 1, 1))(gx, w_h, c0, h0)
    return (hs, c, h), (acts, cs)


def layer_backward(
    w_h, acts, cs, c0, d_hs, d_c, d_h, *, gate_activation: str, dtype, interpret: bool, fallback
):
    """`backward` with the same batching rule; `fallback` takes the same arguments."""

    def call(*args):
        return backward(*args, gate_activation=gate_activation, dtype=dtype, interpret=interpret)

    rows = (None, 1, 1, 0, 1, 0, 0), (1, 0, 0)
    return foldable(call, fallback, *rows)(w_h, acts, cs, c0, d_hs, d_c, d_h)
