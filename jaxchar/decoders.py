"""Decoders: the one way every generation path drives the model.

A decoder knows how to read a prompt into a state (at once, or piece by piece: `read`
continues from a state), give the next logits from a state, and advance a state by the ids
chosen for it; the loops around it (`jaxchar.sample` and
`sample_stream`, `beam_search`, the serving `Engine`, the exported sampler) choose the ids.
States are tuples of arrays with the rows first, so a loop may gather, write or move rows
with `jax.tree.map` (beam search gathers hypotheses by parent; the engine writes a new
request's row).

- `Stateful` reads the prompt once and then runs one cell step per character: its state is
  (carry, the logits of the next character).
- `Window` re-reads the last `seq_length` characters for every new one, as the tutorial
  generates from window-trained models: its state is (window [rows, L], mask [rows, L]),
  where a masked (left-padded) position leaves the LSTM state untouched.

`decoder(cfg, mode, seq_length)` is the one place that turns a mode's name into a decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxchar.config import ModelConfig
from jaxchar.lstm import select
from jaxchar.model import apply, for_inference, init_carry, step

MODES = ("stateful", "window")


def step_model(cfg: ModelConfig) -> ModelConfig:
    """The model config that runs one character a step, as jaxchar.lstm.select chooses it
    for this platform (the nn.scan cell: a single step has no sequence to fuse)."""
    choice = select(cfg, "step", platform=jax.default_backend())
    return cfg if cfg.impl == choice.backend else dataclasses.replace(cfg, impl=choice.backend)


@dataclass(frozen=True)
class Stateful:
    """Reads the prompt once, then one cell step per character."""

    cfg: ModelConfig

    def empty(self, rows: int) -> tuple:
        """A state for `rows` rows before any prompt: zero carry and logits."""
        cfg = step_model(self.cfg)
        return init_carry(cfg, rows), jnp.zeros((rows, cfg.vocab_size), jnp.float32)

    #: how many of a prompt's last characters can change the state (None: all of them)
    context = None

    def start(self, params, prompt: jax.Array, mask: jax.Array | None = None) -> tuple:
        """The state after prompt [rows, P]; `mask` [rows, P] False on left padding."""
        return self.read(params, self.empty(prompt.shape[0]), prompt, mask)

    def read(self, params, state: tuple, piece: jax.Array, mask: jax.Array | None = None):
        """The state after reading piece [rows, P] from `state`: reading a prompt in pieces
        gives the state of reading it at once. A row whose piece is all masked keeps its
        state."""
        logits, carry = apply(params, step_model(self.cfg), piece, state[0], mask=mask)
        if mask is None:
            return carry, logits[:, -1]
        return carry, jnp.where(mask.any(axis=1)[:, None], logits[:, -1], state[1])

    def logits(self, params, state: tuple) -> jax.Array:
        """The next character's logits [rows, vocab]."""
        return state[1]

    def advance(self, params, state: tuple, ids: jax.Array) -> tuple:
        """The state after ids [rows]."""
        logits, carry = step(params, step_model(self.cfg), state[0], ids)
        return carry, logits


@dataclass(frozen=True)
class Window:
    """Re-reads the last `seq_length` characters (left-padded and masked) for each new one."""

    cfg: ModelConfig
    seq_length: int

    def empty(self, rows: int) -> tuple:
        shape = (rows, self.seq_length)
        return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, bool)

    @property
    def context(self) -> int:
        """How many of a prompt's last characters can change the state."""
        return self.seq_length

    def start(self, params, prompt: jax.Array, mask: jax.Array | None = None) -> tuple:
        """The window after prompt [rows, P]: its last seq_length characters, left-padded
        (the padding masked)."""
        return self.read(params, self.empty(prompt.shape[0]), prompt, mask)

    def read(self, params, state: tuple, piece: jax.Array, mask: jax.Array | None = None):
        """The window after reading piece [rows, P] (`mask` False where a position is not
        a character): the last seq_length characters of window and piece together, with
        masked positions dropped rather than kept in the window."""
        window, valid = state
        given = jnp.ones(piece.shape, bool) if mask is None else mask
        ids = jnp.concatenate([window, piece.astype(window.dtype)], axis=1)
        ok = jnp.concatenate([valid, given], axis=1)
        order = jnp.argsort(ok.astype(jnp.int8), axis=1, stable=True)  # masked ones first
        ids = jnp.take_along_axis(ids, order, axis=1)[:, -self.seq_length :]
        ok = jnp.take_along_axis(ok, order, axis=1)[:, -self.seq_length :]
        return jnp.where(ok, ids, 0), ok

    def logits(self, params, state: tuple) -> jax.Array:
        window, mask = state
        logits, _ = apply(params, self.cfg, window, mask=mask, last_only=True)
        return logits

    def advance(self, params, state: tuple, ids: jax.Array) -> tuple:
        window, mask = state
        window = jnp.concatenate([window[:, 1:], ids[:, None].astype(window.dtype)], axis=1)
        mask = jnp.concatenate([mask[:, 1:], jnp.ones_like(mask[:, :1])], axis=1)
        return window, mask


Decoder = Stateful | Window


def decoder(cfg: ModelConfig, mode: str, seq_length: int = 100) -> Decoder:
    """The decoder for `mode` ("stateful" or "window"; window reads `seq_length`), of cfg
    with dropout off (`for_inference`: configs that differ only there share programs)."""
    cfg = for_inference(cfg)
    if mode == "stateful":
        return Stateful(cfg)
    if mode == "window":
        return Window(cfg, seq_length)
    raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
