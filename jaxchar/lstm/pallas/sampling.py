"""The whole stateful sampling loop as one Pallas kernel for NVIDIA GPUs (the `pallas`
sampling backend): every layer's weights and the dense head stay with the programs for the
whole loop, and each character is the embedding, every LSTM layer, the logits and the draw
without leaving the kernel.

Why: on a GPU the lax.scan loop runs several small XLA kernels per layer per character, plus
the head and the draw, each a launch with the GPU idle in between, so that one row costs
nearly as much as 64 (docs/benchmarks.md, "On an NVIDIA H200 GPU"). Here a chunk of
characters (jaxchar/lstm/generation.py: the noise and the chunks, shared with the C++ loop)
is one launch.

Work split, over the (unit group, row block) grid of jaxchar/lstm/pallas/grid.py, for
hidden H, L layers, vocabulary V padded to VP (a power of two, Triton's shapes):
- step i reads character i of the prompt, or (after the prompt) draws it: argmax over VP of
  logits / temperature + noise[i - P] (argmax of the logits at temperature 0), the rule
  `jax.random.categorical` follows, so that the same noise gives the same ids;
- layer 0's input is the drawn character's row of the input table ([VP, 4H], the encoding,
  layer 0's input kernel and bias folded into one row a character): a one-hot [ROWS, VP] x
  [VP, 4*units] product, exact in float32;
- layer l: z = x W_in[l] + b + h_{l,t-1} W_h[l] for the program's own columns, c and h of its
  own units; h goes to hbuf[l, slot], and after the barrier every program of the row block
  reads all of it (the next layer's input, the next step's h_{l,t-1}). Two slots a layer,
  written on alternate steps: a program that is one barrier ahead writes the slot that the
  others have finished reading;
- the head ([ROWS, H] x [H, VP]) and the draw run in every program of the row block on the
  same numbers, so each knows the next character without another barrier; the ids, the last
  logits and the final h are written by all of them (the same values).

Float32 products are IEEE float32 (not TF32: the draw must see the logits the float32
reference loop sees); bfloat16 products take the model's rounding (operands in bfloat16,
float32 sums). On a CPU the kernel runs in Pallas's interpreter, one program per row block;
that is how CI checks it against the lax.scan loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxchar.config import ModelConfig
from jaxchar.lstm import generation
from jaxchar.lstm.cells import gate
from jaxchar.lstm.pallas.grid import ROWS, UNITS, barrier, launch, pad_rows, piece_width, tiles

MAX_ROWS = 128  # 8 row blocks of H/UNITS programs (128 at hidden 256), all resident at once
# on a Hopper GPU, as the barrier needs; more rows take the lax.scan loop
NEG = -1e30  # the padded vocabulary's logits: never drawn, no NaN in the division
HIGHEST = jax.lax.Precision.HIGHEST


def supports(cfg: ModelConfig, rows: int) -> tuple[bool, str]:
    """Whether the kernel can run this model at `rows` rows, and if not, why."""
    if cfg.cell != "lstm":
        return False, "the kernel runs LSTM cells only"
    if rows > MAX_ROWS:
        return False, f"{rows} rows: the kernel takes at most {MAX_ROWS}"
    if cfg.hidden % UNITS:
        return False, f"the Pallas kernels need hidden % {UNITS} == 0"
    if cfg.dtype not in ("float32", "bfloat16"):
        return False, "the Pallas kernels multiply in float32 or bfloat16"
    return True, ""


def vocab_width(vocab: int) -> int:
    """The vocabulary padded to a power of two, at least 16 (Triton's smallest dot tile)."""
    width = 16
    while width < vocab:
        width *= 2
    return width


def _kernel(
    table_ref,  # [VP, 4H] float32
    rec_ref,  # [L, H, 4H] dtype
    up_ref,  # [max(L-1, 1), H, 4H] dtype
    upb_ref,  # [max(L-1, 1), 4H] float32
    head_ref,  # [H, VP] float32
    headb_ref,  # [VP] float32, NEG beyond the vocabulary
    c0_ref,  # [L, BP, H]
    h0_ref,  # [L, BP, H]
    logits_ref,  # [BP, VP]
    prompt_ref,  # [max(P, 1), BP] int32
    noise_ref,  # [max(n, 1), BP, VP]
    temp_ref,  # [BP]
    _sync_in,
    ids_ref,  # [max(n, 1), BP] int32
    c_ref,  # [L, BP, H]
    h_ref,  # [L, BP, H]
    last_ref,  # [BP, VP]
    hbuf_ref,  # [L, 2, BP, H]: each layer's h, two slots (see the module's docstring)
    sync_ref,
    *,
    hidden,
    layers,
    prompt_len,
    steps,
    gate_activation,
    dtype,
    units,
    groups,
):
    b, rows, mine, cols = tiles(hidden, units)
    width, vp = piece_width(hidden), logits_ref.shape[1]
    pieces = [pl.ds(k * width, width) for k in range(hidden // width)]
    temperature = temp_ref[rows][:, None]  # [ROWS, 1]

    def dot(x, w):
        return jnp.dot(x, w, precision=HIGHEST, preferred_element_type=jnp.float32)

    def draw(logits, i):
        noise = noise_ref[jnp.clip(i - prompt_len, 0, noise_ref.shape[0] - 1), rows, :]
        scaled = logits / jnp.maximum(temperature, 1e-6) + noise
        return jnp.argmax(jnp.where(temperature > 0, scaled, logits), axis=1).astype(jnp.int32)

    def read_h(layer, slot):  # [ROWS, width] pieces of a layer's h, every unit of the block
        return [hbuf_ref[layer, slot, rows, p].astype(dtype) for p in pieces]

    def step(i, carry):
        cs, logits = carry
        j = i - prompt_len
        prompted = prompt_ref[jnp.minimum(i, prompt_ref.shape[0] - 1), rows]
        ids = jnp.where(j < 0, prompted, draw(logits, i))  # [ROWS]

        @pl.when(j >= 0)
        def _():
            ids_ref[jnp.maximum(j, 0), rows] = ids

        onehot = (jax.lax.broadcasted_iota(jnp.int32, (ROWS, vp), 1) == ids[:, None]).astype(
            jnp.float32
        )
        read = jax.lax.rem(i, 2)  # i >= 0: no sign fix-up (jnp's % lowers badly to Triton)
        write = 1 - read
        new_cs = []
        for layer in range(layers):
            h_prev = read_h(layer, read)
            below = read_h(layer - 1, write) if layer else None  # h_{l-1} of this step
            z = []
            for g in range(4):
                if layer == 0:
                    acc = dot(onehot, table_ref[:, cols(g)])  # [ROWS, units]
                else:
                    acc = upb_ref[layer - 1, cols(g)][None, :]
                    for p, x in zip(pieces, below, strict=True):
                        acc = acc + dot(x, up_ref[layer - 1, p, cols(g)])
                for p, h in zip(pieces, h_prev, strict=True):
                    acc = acc + dot(h, rec_ref[layer, p, cols(g)])
                z.append(acc)
            kind = gate_activation
            a = [gate(z[0], kind), gate(z[1], kind), jnp.tanh(z[2]), gate(z[3], kind)]
            c = a[1] * cs[layer] + a[0] * a[2]
            hbuf_ref[layer, write, rows, mine] = a[3] * jnp.tanh(c)
            new_cs.append(c)
            barrier(sync_ref, b, 2 + i * layers + layer, groups)
        top = [hbuf_ref[layers - 1, write, rows, p] for p in pieces]  # float32, as the head's
        logits = headb_ref[:][None, :] + sum(
            dot(h, head_ref[p, :]) for p, h in zip(pieces, top, strict=True)
        )
        return tuple(new_cs), logits

    for layer in range(layers):
        hbuf_ref[layer, 0, rows, mine] = h0_ref[layer, rows, mine]
    barrier(sync_ref, b, jnp.int32(1), groups)
    start = tuple(c0_ref[layer, rows, mine] for layer in range(layers)), logits_ref[rows, :]
    cs, logits = jax.lax.fori_loop(0, prompt_len + steps, step, start)
    final = (prompt_len + steps) % 2
    for layer in range(layers):
        c_ref[layer, rows, mine] = cs[layer]
        h_ref[layer, rows, mine] = hbuf_ref[layer, final, rows, mine]
    last_ref[rows, :] = logits


def generate_call(
    params, cfg: ModelConfig, carry, logits, noise, temperature, prompt, *, interpret
):
    """One launch of the sampling loop (jaxchar.lstm.generation's `core`): noise [n, B, V]
    for n characters after prompt [B, P], from (carry, logits [B, V])."""
    layers, hidden, vocab = cfg.layers, cfg.hidden, cfg.vocab_size
    (n, batch, _), prompt_len = noise.shape, prompt.shape[1]
    vp, dtype, f32 = vocab_width(vocab), cfg.product_dtype, jnp.float32
    w = generation.weights(params, cfg)
    wide = (0, vp - vocab)

    def pad_vocab(x, value=0.0):  # [..., V] -> [..., VP]
        return jnp.pad(x.astype(f32), [(0, 0)] * (x.ndim - 1) + [wide], constant_values=value)

    def at_least_one(x):  # Pallas takes no empty arrays: a prompt or noise of 0 steps
        return x if x.shape[0] else jnp.zeros((1, *x.shape[1:]), x.dtype)

    temperature = jnp.broadcast_to(jnp.asarray(temperature, f32), (batch,))
    c0 = pad_rows(jnp.stack([c for c, _ in carry]).astype(f32), 1)  # [L, BP, H]
    h0 = pad_rows(jnp.stack([h for _, h in carry]).astype(f32), 1)
    rows = c0.shape[1]
    args = [
        jnp.pad(w["table"].astype(f32), [wide, (0, 0)]),
        w["recurrent"].astype(dtype),
        w["upper"].astype(dtype),
        w["upper_bias"].astype(f32).reshape(w["upper"].shape[0], -1),
        pad_vocab(w["head"]),
        pad_vocab(w["head_bias"], NEG),
        c0,
        h0,
        pad_rows(pad_vocab(logits, NEG), 0),
        at_least_one(pad_rows(prompt.astype(jnp.int32).T, 1)),
        at_least_one(pad_rows(pad_vocab(noise), 1)),
        pad_rows(temperature, 0),
    ]
    state = ((layers, rows, hidden), f32)
    outs = [
        ((max(n, 1), rows), jnp.int32),
        state,
        state,
        ((rows, vp), f32),
        ((layers, 2, rows, hidden), f32),
    ]
    kernel = functools.partial(
        _kernel,
        hidden=hidden,
        layers=layers,
        prompt_len=prompt_len,
        steps=n,
        gate_activation=cfg.gate_activation,
        dtype=dtype,
    )
    name = "jaxchar_generate_pallas"
    ids, c, h, last, _ = launch(
        kernel, name, outs, args, hidden=hidden, batch=batch, interpret=interpret
    )
    carry = tuple((c[layer, :batch], h[layer, :batch]) for layer in range(layers))
    return (carry, last[:batch, :vocab]), ids[:n, :batch].T


def run(params, cfg: ModelConfig, carry, logits, noise, temperature, prompt=None):
    """`generate_call` on this platform: compiled on NVIDIA GPUs, interpreted on CPUs
    (where only a forced model.impl = "pallas" gets here). `temperature` is one value or
    one per row (the serving engine's rows each have their own)."""
    if prompt is None:
        prompt = jnp.zeros((logits.shape[0], 0), jnp.int32)

    def on(interpret: bool):
        def call(carry, logits, noise, temperature, prompt):
            return generate_call(
                params, cfg, carry, logits, noise, temperature, prompt, interpret=interpret
            )

        return call

    args = carry, logits, noise, temperature, prompt
    return jax.lax.platform_dependent(*args, cuda=on(False), cpu=on(True))
