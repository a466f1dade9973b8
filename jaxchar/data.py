"""Pure batch functions on the device-resident ids: no host arrays, no window matrix.

The corpus lives on the device once, as a [n] integer array. A batch is a gather of
`batch x (seq_length + 1)` ids at offsets computed from (key, epoch, step): the epoch's
order is a pseudo-random permutation of all windows evaluated element by element (a Feistel
network with cycle walking), so no [n] permutation array is ever stored either. Memory stays
proportional to the corpus; the same (key, epoch, step) always gives the same batch, which
is what makes a resumed run identical to an uninterrupted one.

Each training objective is one small object (`Window`, `Sequence`, `Streams`, `Sentences`,
built by `objective(cfg)`) that knows its steps per epoch, its training batches and its
evaluation batches; the training loop asks it and never switches on the objective's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxchar.config import Config

_ROUNDS = 4


def _mix(x: jax.Array) -> jax.Array:
    """A cheap uint32 hash (multiply-xorshift) used as the Feistel round function."""
    x = x * jnp.uint32(0x9E3779B1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x85EBCA77)
    return x ^ (x >> 13)


def permute(index: jax.Array, n: int, key: jax.Array) -> jax.Array:
    """A bijection of [0, n) chosen by `key`, evaluated at `index` (any shape, int)."""
    if n < 1 or n > 2**32:
        raise ValueError(f"cannot permute a range of {n} elements")
    half = max(1, math.ceil(math.log2(max(n, 2)) / 2))  # the domain is 4**half >= n
    low_mask = jnp.uint32((1 << half) - 1)
    round_keys = jax.random.bits(key, (_ROUNDS,), jnp.uint32)

    def feistel(x):
        left, right = x >> half, x & low_mask
        for r in range(_ROUNDS):
            left, right = right, left ^ (_mix(right ^ round_keys[r]) & low_mask)
        return (left << half) | right

    # cycle walking: re-apply until the value falls inside [0, n) (a permutation of the
    # domain restricted this way is a permutation of [0, n))
    x = feistel(index.astype(jnp.uint32))
    x = jax.lax.while_loop(lambda v: jnp.any(v >= n), lambda v: jnp.where(v >= n, feistel(v), v), x)
    return x.astype(jnp.int32)


def batch_count(n_items: int, batch: int) -> int:
    """Batches in one pass over n_items; the last one may be partial (masked), as in Keras."""
    return -(-n_items // batch)


def shuffled_positions(
    key: jax.Array, epoch, step, batch: int, n_items: int
) -> tuple[jax.Array, jax.Array]:
    """Item indices [batch] of step `step` in epoch `epoch`, and a validity mask [batch].

    Positions past the end of the epoch (the partial last batch) wrap around and are
    marked invalid so that they carry no weight in the loss."""
    pos = step * batch + jnp.arange(batch)
    valid = pos < n_items
    pos = jnp.where(valid, pos, pos % n_items)
    return permute(pos, n_items, jax.random.fold_in(key, epoch)), valid


def gather_windows(ids: jax.Array, offsets: jax.Array, width: int) -> jax.Array:
    """ids[offsets[b] : offsets[b] + width] for every b: [batch, width], int32."""
    return ids[offsets[:, None] + jnp.arange(width)].astype(jnp.int32)


def window_count(n_chars: int, seq_length: int) -> int:
    """Stride-1 windows of seq_length characters that have a next character."""
    return n_chars - seq_length


def window_batch(ids, key, epoch, step, batch: int, seq_length: int) -> dict[str, jax.Array]:
    """The tutorial's many-to-one batch: inputs [batch, T] and targets [batch]."""
    n = window_count(ids.shape[0], seq_length)
    offsets, valid = shuffled_positions(key, epoch, step, batch, n)
    chunk = gather_windows(ids, offsets, seq_length + 1)
    return {
        "inputs": chunk[:, :-1],
        "targets": chunk[:, -1],
        "weights": valid.astype(jnp.float32),
    }


def chunk_count(n_chars: int, seq_length: int) -> int:
    """Non-overlapping seq_length chunks (plus one target) whatever the epoch's shift."""
    return (n_chars - 1 - seq_length) // seq_length


def sequence_batch(ids, key, epoch, step, batch: int, seq_length: int) -> dict[str, jax.Array]:
    """Many-to-many: every position predicts its next character; inputs, targets [batch, T].

    An epoch visits non-overlapping chunks in a shuffled order, shifted by a random phase
    per epoch so that chunk borders move between epochs."""
    n = chunk_count(ids.shape[0], seq_length)
    epoch_key = jax.random.fold_in(key, epoch)
    shift = jax.random.randint(jax.random.fold_in(epoch_key, 1), (), 0, seq_length)
    chunks, valid = shuffled_positions(key, epoch, step, batch, n)
    chunk = gather_windows(ids, shift + chunks * seq_length, seq_length + 1)
    weights = jnp.broadcast_to(valid[:, None], (batch, seq_length)).astype(jnp.float32)
    return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:], "weights": weights}


def stream_steps(n_chars: int, batch: int, seq_length: int) -> int:
    """Steps per epoch of the stateful objective: the text cut into `batch` streams."""
    return ((n_chars - 1) // batch) // seq_length


def stream_batch(ids, step, batch: int, seq_length: int) -> dict[str, jax.Array]:
    """Stateful many-to-many: row b reads stream b (one contiguous 1/batch of the text),
    so step s+1 continues exactly where step s stopped and the LSTM state can carry over."""
    stream_len = (ids.shape[0] - 1) // batch
    offsets = jnp.arange(batch) * stream_len + step * seq_length
    chunk = gather_windows(ids, offsets, seq_length + 1)
    weights = jnp.ones((batch, seq_length), jnp.float32)
    return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:], "weights": weights}


def stream_eval_steps(n_chars: int, batch: int, seq_length: int) -> int:
    """Steps that score every character of a text read as `batch` in-order streams
    (`stream_eval_batch`): ceil(ceil((n_chars - 1) / batch) / seq_length)."""
    stream_len = -(-(n_chars - 1) // batch)
    return -(-stream_len // seq_length)


def stream_eval_batch(ids, step, batch: int, seq_length: int) -> dict[str, jax.Array]:
    """`stream_batch` for scoring: the text's n - 1 targets cut into `batch` streams of
    ceil((n - 1) / batch), so that together they hold every character once; a stream's
    positions past its end (or the text's) weigh 0."""
    n = ids.shape[0]
    stream_len = -(-(n - 1) // batch)
    offsets = step * seq_length + jnp.arange(seq_length + 1)  # within each stream
    positions = (jnp.arange(batch) * stream_len)[:, None] + offsets
    chunk = ids[jnp.minimum(positions, n - 1)].astype(jnp.int32)
    weights = (offsets[None, 1:] <= stream_len) & (positions[:, 1:] < n)
    return {
        "inputs": chunk[:, :-1],
        "targets": chunk[:, 1:],
        "weights": weights.astype(jnp.float32),
    }


def span_batch(ids, spans, items, valid, seq_length: int) -> dict[str, jax.Array]:
    """Sentence-padded many-to-many rows: row b holds the span spans[items[b]] from its
    first character, right-padded with id 0; padded targets and invalid rows weigh 0."""
    start, stop = spans[items, 0], spans[items, 1]
    real = jnp.arange(seq_length + 1) < (stop - start)[:, None]  # [batch, T + 1]
    chunk = jnp.where(real, gather_windows(ids, start, seq_length + 1), 0)
    weights = real[:, 1:] & valid[:, None]
    return {
        "inputs": chunk[:, :-1],
        "targets": chunk[:, 1:],
        "weights": weights.astype(jnp.float32),
    }


def sentence_batch(
    ids, spans, key, epoch, step, batch: int, seq_length: int
) -> dict[str, jax.Array]:
    """A shuffled batch of sentences (corpus.sentence_spans), each starting from a fresh
    state. The model is causal and the padding sits at the right, so padded positions cannot
    change any real position's output: the zero weights mask them out of the loss."""
    items, valid = shuffled_positions(key, epoch, step, batch, spans.shape[0])
    return span_batch(ids, spans, items, valid, seq_length)


def in_order_windows(ids, i, batch: int, seq_length: int) -> dict[str, jax.Array]:
    """Evaluation batch i of the window objective: windows i*batch .. (i+1)*batch - 1 in
    text order; those past the last window wrap around with weight 0."""
    count = window_count(ids.shape[0], seq_length)
    pos = i * batch + jnp.arange(batch)
    chunk = gather_windows(ids, pos % count, seq_length + 1)
    weights = (pos < count).astype(jnp.float32)
    return {"inputs": chunk[:, :-1], "targets": chunk[:, -1], "weights": weights}


@dataclass(frozen=True)
class Window:
    """The tutorial's objective: every stride-1 window predicts its next character."""

    batch: int
    seq_length: int
    last_only: ClassVar[bool] = True  # the loss reads the last position only
    carries_state: ClassVar[bool] = False  # the LSTM state between training steps
    eval_carries_state: ClassVar[bool] = False  # ... between evaluation steps
    needs_spans: ClassVar[bool] = False
    # how `generate` reads a trained model: windows of seq_length like training, or one
    # stream with the state carried
    sampling_mode: ClassVar[str] = "window"

    @property
    def chars_per_step(self) -> int:  # targets scored per training step
        return self.batch

    def steps_per_epoch(self, n_chars: int, n_spans: int = 0) -> int:
        return batch_count(window_count(n_chars, self.seq_length), self.batch)

    def train_batch(self, ids, spans, key, epoch, step) -> dict[str, jax.Array]:
        return window_batch(ids, key, epoch, step, self.batch, self.seq_length)

    def for_evaluation(self, n_chars: int) -> Window:
        return self

    def eval_steps(self, n_chars: int, n_spans: int = 0) -> int:
        return self.steps_per_epoch(n_chars)

    def eval_batch(self, ids, spans, i) -> dict[str, jax.Array]:
        """Every window once, in order, each from a fresh state."""
        return in_order_windows(ids, i, self.batch, self.seq_length)


@dataclass(frozen=True)
class Sequence(Window):
    """Many-to-many on shuffled non-overlapping chunks, each from a fresh state; evaluated
    as in-order streams with the state carried, so every character has its context."""

    last_only: ClassVar[bool] = False
    eval_carries_state: ClassVar[bool] = True
    sampling_mode: ClassVar[str] = "stateful"

    @property
    def chars_per_step(self) -> int:
        return self.batch * self.seq_length

    def steps_per_epoch(self, n_chars: int, n_spans: int = 0) -> int:
        return batch_count(chunk_count(n_chars, self.seq_length), self.batch)

    def train_batch(self, ids, spans, key, epoch, step) -> dict[str, jax.Array]:
        return sequence_batch(ids, key, epoch, step, self.batch, self.seq_length)

    def for_evaluation(self, n_chars: int) -> Sequence:
        """A text too short for `batch` streams is evaluated with fewer of them."""
        if stream_steps(n_chars, self.batch, self.seq_length) >= 1:
            return self
        return type(self)(max(1, (n_chars - 1) // self.seq_length), self.seq_length)

    def eval_steps(self, n_chars: int, n_spans: int = 0) -> int:
        return stream_eval_steps(n_chars, self.batch, self.seq_length)

    def eval_batch(self, ids, spans, i) -> dict[str, jax.Array]:
        """Step i of `batch` in-order streams that together hold every character once: the
        caller carries the state across steps."""
        return stream_eval_batch(ids, i, self.batch, self.seq_length)


@dataclass(frozen=True)
class Streams(Sequence):
    """Stateful many-to-many: the text cut into `batch` streams read in order, the LSTM
    state carried from each training step to the next (reset at each epoch)."""

    carries_state: ClassVar[bool] = True

    def steps_per_epoch(self, n_chars: int, n_spans: int = 0) -> int:
        return stream_steps(n_chars, self.batch, self.seq_length)

    def train_batch(self, ids, spans, key, epoch, step) -> dict[str, jax.Array]:
        return stream_batch(ids, step, self.batch, self.seq_length)


@dataclass(frozen=True)
class ResetEvery(Sequence):
    """Evaluation with a bounded context: the text cut in order into chunks of seq_length
    characters, each read from a fresh state and predicting the characters that follow
    its own (the next chunk's first one included), so every character but the text's first
    is scored once, with 1 to seq_length characters before it (comparable with
    fixed-context models of that length). The last chunk is partial and masked."""

    eval_carries_state: ClassVar[bool] = False

    def for_evaluation(self, n_chars: int) -> ResetEvery:
        return self

    def eval_steps(self, n_chars: int, n_spans: int = 0) -> int:
        return batch_count(batch_count(n_chars - 1, self.seq_length), self.batch)

    def eval_batch(self, ids, spans, i) -> dict[str, jax.Array]:
        """Chunks i*batch .. i*batch + batch - 1 of the text; positions past its end weigh 0."""
        n, width = ids.shape[0], self.seq_length
        starts = (i * self.batch + jnp.arange(self.batch)) * width
        positions = starts[:, None] + jnp.arange(width + 1)
        chunk = ids[jnp.minimum(positions, n - 1)].astype(jnp.int32)
        weights = (positions[:, 1:] < n).astype(jnp.float32)
        return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:], "weights": weights}


@dataclass(frozen=True)
class Sentences(Window):
    """Sentence-padded many-to-many: each row one sentence span from a fresh state."""

    last_only: ClassVar[bool] = False
    needs_spans: ClassVar[bool] = True
    sampling_mode: ClassVar[str] = "stateful"

    @property
    def chars_per_step(self) -> int:  # an upper bound: padded positions are counted too
        return self.batch * self.seq_length

    def steps_per_epoch(self, n_chars: int, n_spans: int = 0) -> int:
        return batch_count(n_spans, self.batch)

    def train_batch(self, ids, spans, key, epoch, step) -> dict[str, jax.Array]:
        return sentence_batch(ids, spans, key, epoch, step, self.batch, self.seq_length)

    def eval_steps(self, n_chars: int, n_spans: int = 0) -> int:
        return batch_count(n_spans, self.batch)

    def eval_batch(self, ids, spans, i) -> dict[str, jax.Array]:
        """Every sentence once, in order."""
        items = i * self.batch + jnp.arange(self.batch)
        valid = items < spans.shape[0]
        return span_batch(ids, spans, items % spans.shape[0], valid, self.seq_length)


Objective = Window | Sequence | Streams | Sentences | ResetEvery


def objective(cfg: Config, rows: int | None = None) -> Objective:
    """The object for cfg.data.objective (and data.stateful) at cfg.train.batch_size rows
    (or `rows`)."""
    d, b = cfg.data, rows or cfg.train.batch_size
    if d.objective == "sentences":
        return Sentences(b, d.seq_length)
    if d.objective == "sequence":
        return Streams(b, d.seq_length) if d.stateful else Sequence(b, d.seq_length)
    return Window(b, d.seq_length)
