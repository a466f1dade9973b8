import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxchar import data


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 4097])
def test_permute_is_a_bijection(n):
    out = np.asarray(data.permute(jnp.arange(n), n, jax.random.PRNGKey(n)))
    assert sorted(out.tolist()) == list(range(n))
    if n > 10:
        assert not np.array_equal(out, np.arange(n))  # actually shuffled


def test_permute_depends_on_the_key():
    a = data.permute(jnp.arange(500), 500, jax.random.PRNGKey(0))
    b = data.permute(jnp.arange(500), 500, jax.random.PRNGKey(1))
    assert not np.array_equal(a, b)


# widths from a few values and the offsets padded to 16 rows: every example reuses one of
# four compiled shapes (40 examples of free shapes compiled about 40 programs, 3.6 s)
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 900), min_size=1, max_size=16), st.sampled_from([1, 2, 13, 20]))
def test_gather_equals_naive_slicing(offsets, width):
    ids = np.random.default_rng(0).integers(0, 50, size=1000).astype(np.uint8)
    padded = np.array(offsets + [0] * (16 - len(offsets)))
    got = np.asarray(data.gather_windows(jnp.asarray(ids), jnp.asarray(padded), width))
    want = np.stack([ids[o : o + width] for o in offsets])
    np.testing.assert_array_equal(got[: len(offsets)], want)


def test_window_epoch_visits_every_window_once():
    ids = jnp.arange(300, dtype=jnp.int32)  # unique ids: a window's first id is its offset
    seq, batch = 10, 16
    n = data.window_count(300, seq)
    steps = data.batch_count(n, batch)
    seen = []
    key = jax.random.PRNGKey(3)
    for s in range(steps):
        b = data.window_batch(ids, key, 0, s, batch, seq)
        inputs, targets, w = map(np.asarray, (b["inputs"], b["targets"], b["weights"]))
        for row in range(batch):
            if w[row]:
                start = int(inputs[row, 0])
                seen.append(start)
                np.testing.assert_array_equal(inputs[row], np.arange(start, start + seq))
                assert targets[row] == start + seq
    assert sorted(seen) == list(range(n))
    # a new epoch has a new order
    first = np.asarray(data.window_batch(ids, key, 1, 0, batch, seq)["inputs"][:, 0])
    again = np.asarray(data.window_batch(ids, key, 0, 0, batch, seq)["inputs"][:, 0])
    assert not np.array_equal(first, again)


def test_sequence_batch_targets_are_inputs_shifted():
    ids = jnp.asarray(np.arange(1000) % 200, jnp.uint8)
    b = data.sequence_batch(ids, jax.random.PRNGKey(0), 0, 0, 8, 20)
    x, y = np.asarray(b["inputs"]), np.asarray(b["targets"])
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert b["weights"].shape == (8, 20)


def test_stream_batches_continue_each_other():
    n, batch, seq = 1001, 4, 10
    ids = jnp.asarray(np.arange(n), jnp.int32)
    a = data.stream_batch(ids, 0, batch, seq)
    b = data.stream_batch(ids, 1, batch, seq)
    np.testing.assert_array_equal(
        np.asarray(a["targets"])[:, -1] + 1, np.asarray(b["inputs"])[:, 0] + 1
    )
    np.testing.assert_array_equal(np.asarray(b["inputs"])[:, 0], np.asarray(a["inputs"])[:, -1] + 1)
    stream_len = (n - 1) // batch
    np.testing.assert_array_equal(np.asarray(a["inputs"])[:, 0], np.arange(batch) * stream_len)
    assert data.stream_steps(n, batch, seq) == stream_len // seq


@pytest.mark.parametrize(
    "n, batch, seq", [(1001, 4, 10), (14443, 32, 100), (97, 8, 5), (12, 4, 100)]
)
def test_held_out_streams_score_every_character_once(n, batch, seq):
    """The sequence objective's evaluation: `batch` in-order streams whose weighted targets
    are every position 1..n-1 exactly once (the last, partial chunks masked), each chunk
    continuing its stream where the previous step stopped."""
    ids = jnp.asarray(np.arange(n), jnp.int32)
    obj = data.Sequence(batch, seq).for_evaluation(n)
    seen = []
    last_input = None
    for i in range(obj.eval_steps(n)):
        b = {k: np.asarray(v) for k, v in obj.eval_batch(ids, None, i).items()}
        np.testing.assert_array_equal(b["targets"], np.minimum(b["inputs"] + 1, n - 1))
        if last_input is not None:  # each row goes on from its last position
            np.testing.assert_array_equal(b["inputs"][:, 0], np.minimum(last_input + 1, n - 1))
        last_input = b["inputs"][:, -1]
        seen.extend(b["targets"][b["weights"] > 0].tolist())
    assert sorted(seen) == list(range(1, n))


def test_sentence_batch_equals_naive_padded_slices():
    rng = np.random.default_rng(1)
    ids = np.arange(1, 401, dtype=np.int32)  # unique ids: a row's first id names its span
    starts = np.sort(rng.choice(390, size=40, replace=False))
    stops = np.minimum(starts + rng.integers(2, 12, size=40), 400)
    spans = np.stack([starts, stops], 1).astype(np.int32)
    seq, batch = 8, 16
    steps = data.batch_count(len(spans), batch)
    seen = []
    for step in range(steps):
        b = data.sentence_batch(
            jnp.asarray(ids), jnp.asarray(spans), jax.random.PRNGKey(0), 0, step, batch, seq
        )
        for row in range(batch):
            if b["weights"][row].sum() == 0:
                continue  # the padded tail of the last batch
            a = int(b["inputs"][row, 0])
            s = spans[list(starts).index(a - 1)]
            piece = ids[s[0] : min(s[1], s[0] + seq + 1)]
            want = np.zeros(seq + 1, np.int32)
            want[: len(piece)] = piece
            np.testing.assert_array_equal(b["inputs"][row], want[:-1])
            np.testing.assert_array_equal(b["targets"][row], want[1:])
            np.testing.assert_array_equal(b["weights"][row], np.arange(1, seq + 1) < len(piece))
            seen.append(s.tolist())
    assert sorted(seen) == sorted(spans.tolist())  # every sentence once per epoch
