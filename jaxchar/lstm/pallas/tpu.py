"""The LSTM layer's two recurrences as Pallas kernels for TPUs (Mosaic): the `pallas`
backend's TPU variant, one kernel launch per layer per sequence, each way.

The same design as the GPU kernels (jaxchar/lstm/pallas/layer.py), carried over to a
TensorCore: the time loop runs inside the kernel, the recurrent kernel W_h (or W_h^T for the
backward pass) is copied into VMEM once and stays there for the whole sequence, the state
lives in VMEM scratch between steps, and what needs no recurrence stays outside as large XLA
products (the input projection before, the weight gradients after: jaxchar/lstm/fused.py).
A TensorCore is one program over all hidden units, so no barrier is needed: each step is
one [rows, H] x [H, 4H] product on the matrix unit plus the gates on the vector unit.

Grid: (row blocks, time chunks). Row blocks are independent ("parallel": a chip with two
TensorCores splits them); the time chunks run in order ("arbitrary"), each bringing the
next `chunk` timesteps of the input projection into VMEM while the previous ones are
computed (Pallas's pipelining), and writing its outputs back. The chunk is sized so that
the blocks fit a VMEM budget (`plan`); the weights are single-buffered, since their block
never changes.

On a CPU these kernels run interpreted (`interpret`): True is Pallas's generic interpreter,
which the fused layer's CPU branch uses (it has no side effects, so it runs under `vmap` of
the platform switch); a `pltpu.InterpretParams` is the TPU interpreter, which also simulates
VMEM, the block copies and the grid's order (and can check for races), which the kernel
tests use. That is how the CPU tests check them against the lax.scan loops on every shipped
config's shapes; they have not yet run on a TPU (no TPU measurement exists, so `auto` never
picks them).

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
from jaxchar.lstm.pallas.layer import gate_grads

LANES = 128  # a TPU vector register's lanes: each gate's columns start on a lane boundary
SUBLANES = 8  # and its sublanes: rows are padded to a multiple
MAX_ROWS = 128  # rows per block (the matrix unit's height on most TPUs)
BLOCK_BUDGET = 12 * 2**20  # bytes of VMEM for the time chunks' double-buffered blocks


def supports(hidden: int, dtype) -> tuple[bool, str]:
    """Whether the TPU kernels can run a layer of `hidden` units in `dtype` products."""
    if dtype not in (jnp.float32, jnp.bfloat16):
        return False, "the Pallas kernels multiply in float32 or bfloat16"
    if hidden % LANES:
        return False, f"the TPU kernels need hidden % {LANES} == 0"
    return True, ""


def plan(steps: int, batch: int, hidden: int) -> tuple[int, int, int]:
    """(rows per block, row blocks, timesteps per chunk): blocks of at most MAX_ROWS rows,
    and the longest chunk dividing `steps` whose blocks (the forward pass's gx, acts, hs and
    cs, or the backward pass's five inputs and dz: 10 or 12 floats of 4 bytes per row and
    hidden unit, double-buffered) fit BLOCK_BUDGET; at least one step."""
    padded = -(-batch // SUBLANES) * SUBLANES
    rows = min(padded, MAX_ROWS)
    blocks = -(-padded // rows)
    per_step = 2 * 12 * rows * hidden * 4
    chunk = max(
        [c for c in range(1, steps + 1) if steps % c == 0 and c * per_step <= BLOCK_BUDGET],
        default=1,
    )
    return rows, blocks, chunk


def _vmem_limit(rows: int, hidden: int, chunk: int, dtype) -> int:
    """The scoped VMEM the kernels ask for: the blocks, the weights once, the state and
    a margin for the compiler's own scratch."""
    weights = 4 * hidden * hidden * jnp.dtype(dtype).itemsize
    blocks = 2 * 12 * rows * hidden * 4 * chunk
    state = 6 * rows * hidden * 4
    return int(weights + blocks + state + 8 * 2**20)


def _pad(x: jax.Array, axis: int, size: int, block: str = "") -> jax.Array:
    """x with its rows (`axis`) padded with zeros to `size`; weights are left as they are."""
    extra = size - x.shape[axis]
    if block == "weights" or not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _launch(body, name, ins, outs, args, *, steps, batch, hidden, reverse, kind, dtype, interpret):
    """One pallas_call of `body` over the (row blocks, time chunks) grid. `ins` and `outs`
    name each array's blocks: "gates" or "units" (a chunk of timesteps of one row block, 4H
    or H wide, the chunks in reverse order of time when `reverse`), "state" (a row block's
    [rows, H]) or "weights" (a whole weight matrix, resident). Outputs are float32, padded
    to whole row blocks; the kernel also gets two [rows, H] float32 VMEM scratch buffers."""
    rows, blocks, chunk = plan(steps, batch, hidden)
    padded, last, f32 = rows * blocks, steps // chunk - 1, jnp.float32
    width = {"gates": 4 * hidden, "units": hidden}

    def spec(block, array=None):
        if block == "weights":
            return _resident(array.shape)
        if block == "state":
            return pl.BlockSpec((rows, hidden), lambda b, i: (b, 0))
        at = (lambda i: last - i) if reverse else (lambda i: i)
        return pl.BlockSpec((chunk, rows, width[block]), lambda b, i: (at(i), b, 0))

    def shape(block):
        return (padded, hidden) if block == "state" else (steps, padded, width[block])

    # imported here, not with the module: it adds ~0.15 s to every command's start-up
    from jax.experimental.pallas import tpu as pltpu

    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary"),
        vmem_limit_bytes=_vmem_limit(rows, hidden, chunk, dtype),
    )
    kernel = functools.partial(body, hidden=hidden, chunk=chunk, kind=kind, dtype=dtype)
    return pl.pallas_call(
        kernel,
        grid=(blocks, steps // chunk),
        in_specs=[spec(block, a) for block, a in zip(ins, args, strict=True)],
        out_specs=[spec(block) for block in outs],
        out_shape=[jax.ShapeDtypeStruct(shape(block), f32) for block in outs],
        scratch_shapes=[pltpu.VMEM((rows, hidden), f32), pltpu.VMEM((rows, hidden), f32)],
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(*[_pad(a, 0 if b == "state" else 1, padded, b) for b, a in zip(ins, args, strict=True)])


def _resident(shape) -> pl.BlockSpec:
    """A block that is the whole array and never changes: copied in once, single-buffered."""
    return pl.BlockSpec(shape, lambda b, i: (0,) * len(shape), pipeline_mode=pl.Buffered(1))


def _forward_kernel(
    gx_ref, w_ref, c0_ref, h0_ref, hs_ref, acts_ref, cs_ref, c_scr, h_scr, **static
):
    hidden, chunk, kind, dtype = (static[k] for k in ("hidden", "chunk", "kind", "dtype"))

    @pl.when(pl.program_id(1) == 0)
    def _():
        c_scr[...] = c0_ref[...]
        h_scr[...] = h0_ref[...]

    def step(t, _):
        h_prev = h_scr[...].astype(dtype)
        z = gx_ref[t] + jnp.dot(h_prev, w_ref[...], preferred_element_type=jnp.float32)
        part = [z[:, g * hidden : (g + 1) * hidden] for g in range(4)]
        a = [gate(part[0], kind), gate(part[1], kind), jnp.tanh(part[2]), gate(part[3], kind)]
        c = a[1] * c_scr[...] + a[0] * a[2]
        h = a[3] * jnp.tanh(c)
        for g in range(4):
            acts_ref[t, :, g * hidden : (g + 1) * hidden] = a[g]
        hs_ref[t] = h
        cs_ref[t] = c
        c_scr[...] = c
        h_scr[...] = h
        return 0

    jax.lax.fori_loop(0, chunk, step, 0)


def _backward_kernel(
    acts_ref,
    cs_ref,
    cprev_ref,
    dhs_ref,
    dc_ref,
    dh_ref,
    wt_ref,
    dz_ref,
    dc0_ref,
    dh0_ref,
    dc_scr,
    dh_scr,
    **static,
):
    hidden, chunk, kind, dtype = (static[k] for k in ("hidden", "chunk", "kind", "dtype"))
    i_chunk = pl.program_id(1)

    @pl.when(i_chunk == 0)
    def _():
        dc_scr[...] = dc_ref[...]
        dh_scr[...] = dh_ref[...]

    def step(s, _):
        t = chunk - 1 - s
        acts = [acts_ref[t, :, k * hidden : (k + 1) * hidden] for k in range(4)]
        dh = dhs_ref[t] + dh_scr[...]
        dz, dc = gate_grads(dh, dc_scr[...], acts, cs_ref[t], cprev_ref[t], kind)
        for k in range(4):
            dz_ref[t, :, k * hidden : (k + 1) * hidden] = dz[k]
        # dh_{t-1} = dz[t] W_h^T: one [rows, 4H] x [4H, H] product
        dz_t = dz_ref[t].astype(dtype)
        dh_scr[...] = jnp.dot(dz_t, wt_ref[...], preferred_element_type=jnp.float32)
        dc_scr[...] = dc * acts[1]
        return 0

    jax.lax.fori_loop(0, chunk, step, 0)

    @pl.when(i_chunk == pl.num_programs(1) - 1)
    def _():
        dc0_ref[...] = dc_scr[...]
        dh0_ref[...] = dh_scr[...]


def forward(gx, w_h, c0, h0, *, gate_activation: str, dtype, interpret=False):
    """gx [T, B, 4H] (inputs projected, bias added), w_h [H, 4H], c0 and h0 [B, H] ->
    ((hs [T, B, H], c_T, h_T), (acts [T, B, 4H], cs [T, B, H])), what fused._scan_forward
    returns (and what the GPU kernels' `forward` returns)."""
    steps, batch, width = gx.shape
    f32 = jnp.float32
    hs, acts, cs = _launch(
        _forward_kernel,
        "jaxchar_lstm_forward_pallas_tpu",
        ["gates", "weights", "state", "state"],
        ["units", "gates", "units"],
        [gx.astype(f32), w_h.astype(dtype), c0.astype(f32), h0.astype(f32)],
        steps=steps,
        batch=batch,
        hidden=width // 4,
        reverse=False,
        kind=gate_activation,
        dtype=dtype,
        interpret=interpret,
    )
    hs, acts, cs = hs[:, :batch], acts[:, :batch], cs[:, :batch]
    return (hs, cs[-1], hs[-1]), (acts, cs)


def backward(w_h, acts, cs, c0, d_hs, d_c, d_h, *, gate_activation: str, dtype, interpret=False):
    """The reverse recurrence: (dz [T, B, 4H], dc0, dh0), what fused._scan_backward returns."""
    steps, batch, width = acts.shape
    f32 = jnp.float32
    c_prev = jnp.concatenate([c0[None].astype(f32), cs[:-1]], axis=0)  # [T, B, H]
    dz, dc0, dh0 = _launch(
        _backward_kernel,
        "jaxchar_lstm_backward_pallas_tpu",
        ["gates", "units", "units", "units", "state", "state", "weights"],
        ["gates", "state", "state"],
        [acts, cs, c_prev, d_hs.astype(f32), d_c.astype(f32), d_h.astype(f32), w_h.T.astype(dtype)],
        steps=steps,
        batch=batch,
        hidden=width // 4,
        reverse=True,  # the grid's first time chunk is the sequence's last
        kind=gate_activation,
        dtype=dtype,
        interpret=interpret,
    )
    return dz[:, :batch], dc0[:batch], dh0[:batch]
