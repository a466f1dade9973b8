"""Pure batch functions on the device-resident ids: no host arrays, no window matrix.

The corpus lives on the device once, as a [n] integer array. A batch is a gather of
`batch x (seq_length + 1)` ids at offsets computed from (key, epoch, step): the epoch's
order is a pseudo-random permutation of all windows evaluated element by element (a Feistel
network with cycle walking), so no [n] permutation array is ever stored either. Memory stays
proportional to the corpus; the same (key, epoch, step) always gives the same batch, which
is what makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

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


def steps_per_epoch(n_items: int, batch: int) -> int:
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
