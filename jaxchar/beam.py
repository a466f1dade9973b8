"""Beam search: the most likely continuations of a prompt, not a random draw.

`beam_search` is pure and jitted like `jaxchar.sample`: a function of params and prompt with
static settings. After the prompt is read (stateful, the nn.scan layers), one `lax.scan`
over the new characters keeps `beam` hypotheses per prompt: each step scores every
hypothesis x next character (beam x vocab), keeps the `beam` best totals (`lax.top_k`),
and gathers each kept hypothesis's LSTM state from its parent. The characters are read back
at the end from the parents and choices each step recorded (a reverse scan).

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
from jaxchar.model import step
from jaxchar.sampling import _reference, _rows, _start

_NEG = -1e30


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
) -> Beams:
    """The `beam` best continuations of `length` characters of prompt [P] (or [N, P], N
    prompts at once); see the module's docstring. Checks its options, then runs jitted."""
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
        cfg=cfg,
        length=length,
        beam=beam,
        stop_id=stop_id,
        length_penalty=float(length_penalty),
    )


@partial(jax.jit, static_argnames=("cfg", "length", "beam", "stop_id", "length_penalty"))
def _beam_search(params, prompt, *, cfg, length, beam, stop_id, length_penalty) -> Beams:
    prompt, single = _rows(prompt, None)
    rows, vocab = prompt.shape[0], cfg.vocab_size
    carry, logits = _start(params, prompt, cfg, "stateful", 0)
    reference = _reference(cfg)

    def widen(x):  # [rows, ...] -> [rows * beam, ...], each row's state for all its beams
        return jnp.repeat(x, beam, axis=0)

    carry = jax.tree.map(widen, carry)
    logits = widen(logits).reshape(rows, beam, vocab)
    # one live hypothesis at the start: the others at -inf, so no continuation is kept twice
    totals = jnp.where(jnp.arange(beam) == 0, 0.0, _NEG)[None].repeat(rows, 0)
    done = jnp.zeros((rows, beam), bool)
    lengths = jnp.zeros((rows, beam), jnp.int32)

    def body(state, _):
        carry, logits, totals, done, lengths = state
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if stop_id is not None:  # a finished hypothesis continues only with stop_id, free
            padded = jnp.where(jnp.arange(vocab) == stop_id, 0.0, _NEG)
            logp = jnp.where(done[..., None], padded, logp)
        flat = (totals[..., None] + logp).reshape(rows, beam * vocab)
        totals, choice = jax.lax.top_k(flat, beam)
        parent, ids = choice // vocab, (choice % vocab).astype(jnp.int32)
        done = jnp.take_along_axis(done, parent, axis=1)
        lengths = jnp.take_along_axis(lengths, parent, axis=1) + (~done).astype(jnp.int32)
        if stop_id is not None:
            done = done | (ids == stop_id)
        gather = (parent + beam * jnp.arange(rows)[:, None]).reshape(-1)
        carry = jax.tree.map(lambda x: x[gather], carry)
        new_logits, carry = step(params, reference, carry, ids.reshape(-1))
        state = carry, new_logits.reshape(rows, beam, vocab), totals, done, lengths
        return state, (parent, ids)

    state = carry, logits, totals, done, lengths
    (_, _, totals, _, lengths), (parents, choices) = jax.lax.scan(body, state, None, length=length)

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
