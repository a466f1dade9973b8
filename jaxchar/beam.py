"""Beam search: the most likely continuations of a prompt, not a random draw.

`beam_search` is pure and jitted like `jaxchar.sample`: a function of params and prompt with
static settings. It drives the same decoders (jaxchar.decoders, stateful or window): after
the prompt is read, one `lax.scan` over the new characters keeps `beam` hypotheses per
prompt: each step scores every hypothesis x next character (beam x vocab), keeps the `beam`
best totals (`lax.top_k`), and gathers each kept hypothesis's decoder state from its parent.
The characters are read back at the end from the parents and choices each step recorded (a
reverse scan).

With `stop_id` (say the id of "\n" or "."), a hypothesis that emits it is finished: it keeps
its score and is padded with `stop_id`. Its length is then where it stopped, and
`length_penalty` alpha ranks the final hypotheses by total / length**alpha (0: raw totals;
1: the mean log-probability per character). Without `stop_id` every hypothesis has the same
length and the penalty changes no ranking, only the reported `scores`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxchar.config import ModelConfig
from jaxchar.decoders import MODES, decoder
from jaxchar.sampling import NEG, rows_of


class Beams(NamedTuple):
    """The best hypotheses, best first: ids [..., beam, length], log_probs [..., beam] (the
    total natural-log probability of each continuation given the prompt, up to and
    including its stop character), lengths [..., beam] (characters up to and including the
    stop, or `length`) and scores [..., beam] (log_probs / lengths**length_penalty)."""

    ids: jax.Array
    log_probs: jax.Array
    lengths: jax.Array
    scores: jax.Array


def beam_search(
    params: dict,
    prompt: jax.Array,
    *,
    cfg: ModelConfig,
    length: int,
    beam: int,
    stop_id: int | None = None,
    length_penalty: float = 0.0,
    mode: str = "stateful",
    seq_length: int = 100,
    dec=None,
) -> Beams:
    """The `beam` best continuations of `length` characters of prompt [P] (or [N, P], N
    prompts at once); see the module's docstring. `mode` is the decoder's, as in
    `jaxchar.sample` ("window" re-reads the last `seq_length` characters, for window-trained
    runs); `dec`, any decoder (jaxchar.decoders' protocol), replaces cfg's and mode's.
    Checks its options, then runs jitted."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if length < 1:
        raise ValueError(f"length must be at least 1, not {length}")
    if not 1 <= beam <= 1024:
        raise ValueError(f"beam must be between 1 and 1024, not {beam}")
    if stop_id is not None and not 0 <= stop_id < cfg.vocab_size:
        raise ValueError(f"stop_id must be an id of the vocabulary (0..{cfg.vocab_size - 1})")
    if jnp.shape(prompt)[-1] < 1:
        raise ValueError("the prompt must have at least one character")
    return _beam_search(
        params,
        prompt,
        length=length,
        beam=beam,
        stop_id=stop_id,
        length_penalty=float(length_penalty),
        dec=dec if dec is not None else decoder(cfg, mode, seq_length),
    )


@partial(jax.jit, static_argnames=("length", "beam", "stop_id", "length_penalty", "dec"))
def _beam_search(params, prompt, *, length, beam, stop_id, length_penalty, dec) -> Beams:
    prompt, single = rows_of(prompt)
    rows, vocab = prompt.shape[0], dec.cfg.vocab_size

    def widen(x):  # [rows, ...] -> [rows * beam, ...], each row's state for all its beams
        return jnp.repeat(x, beam, axis=0)

    decoded = jax.tree.map(widen, dec.start(params, prompt))
    # one live hypothesis at the start: the others at -inf, so no continuation is kept twice
    totals = jnp.where(jnp.arange(beam) == 0, 0.0, NEG)[None].repeat(rows, 0)
    done = jnp.zeros((rows, beam), bool)
    lengths = jnp.zeros((rows, beam), jnp.int32)

    def body(state, _):
        decoded, totals, done, lengths = state
        logits = dec.logits(params, decoded).reshape(rows, beam, vocab)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if stop_id is not None:  # a finished hypothesis continues only with stop_id, free
            padded = jnp.where(jnp.arange(vocab) == stop_id, 0.0, NEG)
            logp = jnp.where(done[..., None], padded, logp)
        flat = (totals[..., None] + logp).reshape(rows, beam * vocab)
        totals, choice = jax.lax.top_k(flat, beam)
        parent, ids = choice // vocab, (choice % vocab).astype(jnp.int32)
        done = jnp.take_along_axis(done, parent, axis=1)
        lengths = jnp.take_along_axis(lengths, parent, axis=1) + (~done).astype(jnp.int32)
        if stop_id is not None:
            done = done | (ids == stop_id)
        gather = (parent + beam * jnp.arange(rows)[:, None]).reshape(-1)
        decoded = jax.tree.map(lambda x: x[gather], decoded)  # each kept one's parent state
        decoded = dec.advance(params, decoded, ids.reshape(-1))
        return (decoded, totals, done, lengths), (parent, ids)

    state = decoded, totals, done, lengths
    (_, totals, _, lengths), (parents, choices) = jax.lax.scan(body, state, None, length=length)

    def back(slot, step_out):  # from the last step to the first: which beam held what
        parent, ids = step_out
        return jnp.take_along_axis(parent, slot, axis=1), jnp.take_along_axis(ids, slot, axis=1)

    last = jnp.broadcast_to(jnp.arange(beam), (rows, beam))
    _, ids = jax.lax.scan(back, last, (parents, choices), reverse=True)
    ids = ids.transpose(1, 2, 0)  # [rows, beam, length]
    scores = totals / lengths.astype(jnp.float32) ** length_penalty
    order = jnp.argsort(-scores, axis=1, stable=True)

    def pick(x):
        return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)

    out = Beams(pick(ids), pick(totals), pick(lengths), pick(scores))
    return jax.tree.map(lambda x: x[0], out) if single else out
