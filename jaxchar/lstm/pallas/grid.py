"""What the Pallas kernels share: the work split over a grid of programs and the barrier at
which the programs of a row block meet once per step.

Program (u, b) owns hidden units [u*units, (u+1)*units) of rows [b*ROWS, (b+1)*ROWS): the
four gates' columns of those units, so that the cell update is local to the program. On a
GPU units = UNITS, and the H/UNITS programs of a row block exchange their h (or dz) through
global memory once per step, meeting at a barrier; in Pallas's interpreter on a CPU one
program per row block owns every unit (programs run one after another there, so a barrier
could never be met, and with one unit group none is needed).

The barrier is a counter per row block in global memory: a CTA barrier (every thread's
stores issued), one acquire-release atomic add, then atomic reads until all unit groups of
the block have arrived. It needs the programs of a row block resident at once: H/UNITS
programs (16 at hidden 256, 24 at 384), far below a Hopper GPU's 132 SMs, and the row
block is the fast grid axis so that its programs are launched together. A bounded spin
turns a scheduling failure into wrong numbers (which the device script's comparison with
the reference catches) rather than a hang.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

ROWS = 16  # rows per program: Triton's smallest dot tile
UNITS = 16  # hidden units per program on a GPU (4*UNITS columns of W_h, 64 KB in float32
# at hidden 256): small enough to stay resident, and H/UNITS programs per row block
SPIN_LIMIT = 1 << 24  # barrier polls before a program gives up waiting (see above)


def piece_width(n: int) -> int:
    """The widest power of two up to 128 dividing n: Triton's tensors have power-of-two
    shapes, so a contraction over n (hidden 384, say) runs as n / chunk products."""
    c = 1
    while c < 128 and n % (2 * c) == 0:
        c *= 2
    return c


def barrier(sync_ref, block, generation: jax.Array, groups: int) -> None:
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


def tiles(hidden: int, units: int):
    """This program's row block b and its slices: its rows, its units, and gate g's
    columns of its units (`cols(g)`)."""
    u, b = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(pl.multiple_of(b * ROWS, ROWS), ROWS)
    mine = pl.ds(pl.multiple_of(u * units, units), units)

    def cols(g):
        return pl.ds(pl.multiple_of(g * hidden + u * units, units), units)

    return b, rows, mine, cols


def pad_rows(x: jax.Array, axis: int) -> jax.Array:
    """x with its rows axis padded with zeros to a multiple of ROWS."""
    extra = -x.shape[axis] % ROWS
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def plan(hidden: int, batch: int, interpret: bool) -> tuple[int, int, int]:
    """(units per program, unit groups, row blocks)."""
    units = hidden if interpret else UNITS
    return units, hidden // units, -(-batch // ROWS)


def compiler_params(interpret: bool) -> dict:
    """pallas_call's compiler parameters: a 16-row tile of 4 gates x 16 units and its
    operands takes 4 warps."""
    if interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu

    return {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=1)}


def launch(kernel, name: str, outs: list, args: list, *, hidden: int, batch: int, interpret: bool):
    """One pallas_call of `kernel` (given units= and groups=) over the (unit group, row
    block) grid, with the barrier's counters (one per row block, zeroed) as its last input
    and output. `outs` are (shape, dtype) pairs."""
    import functools

    units, groups, blocks = plan(hidden, batch, interpret)
    shapes = [jax.ShapeDtypeStruct(s, d) for s, d in outs]
    *results, _ = pl.pallas_call(
        functools.partial(kernel, units=units, groups=groups),
        grid=(groups, blocks),
        out_shape=(*shapes, jax.ShapeDtypeStruct((blocks,), jnp.int32)),
        input_output_aliases={len(args): len(outs)},  # the barrier counters start at zero
        interpret=interpret,
        name=name,
        **compiler_params(interpret),
    )(*args, jnp.zeros((blocks,), jnp.int32))
    return results
