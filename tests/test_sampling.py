import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import softmax

from jaxchar.config import ModelConfig
from jaxchar.model import apply, init_carry, init_params, step
from jaxchar.sampling import (
    sample,
    sample_logits,
    sample_stream,
    static_off,
    top_k_filter,
    top_p_filter,
)

CFG = ModelConfig(vocab_size=13, layers=2, hidden=12, encoding="embed", embed_dim=6)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def test_filters_against_numpy():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.0, -1.0]])
    kept = np.asarray(top_k_filter(logits, 2)) > -1e29
    np.testing.assert_array_equal(kept, [[False, True, True, False, False]])
    probs = softmax(np.asarray(logits, np.float64))[0]
    order = np.argsort(-probs)
    for p in (0.3, 0.7, 0.9, 0.99, 1.0):
        # numpy nucleus: the smallest prefix of the sorted ids whose mass reaches p
        need = int(np.searchsorted(np.cumsum(probs[order]), p - 1e-12) + 1)
        want = np.zeros(5, bool)
        want[order[:need]] = True
        got = np.asarray(top_p_filter(logits, p))[0] > -1e29
        np.testing.assert_array_equal(got, want, err_msg=f"p={p}")


def test_temperature_zero_is_argmax_and_draws_follow_softmax():
    logits = jnp.log(jnp.array([0.1, 0.6, 0.3]))
    assert int(sample_logits(jax.random.PRNGKey(0), logits, 0.0)) == 1
    draws = jax.vmap(lambda k: sample_logits(k, logits, 1.0))(
        jax.random.split(jax.random.PRNGKey(1), 20000)
    )
    freq = np.bincount(np.asarray(draws), minlength=3) / 20000
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.015)


_draw = jax.jit(sample_logits, static_argnames="top_k")  # compiled per top_k, not per call


@settings(max_examples=30, deadline=None)
@given(
    st.floats(0.0, 5.0),
    st.one_of(st.none(), st.integers(1, 13)),
    st.one_of(st.none(), st.floats(0.01, 1.0)),
    st.integers(0, 2**31 - 1),
)
def test_sampler_never_leaves_the_vocabulary(temperature, top_k, top_p, seed):
    logits = jax.random.normal(jax.random.PRNGKey(seed), (4, 13)) * 5
    out = np.asarray(_draw(jax.random.PRNGKey(seed + 1), logits, temperature, top_k, top_p))
    assert ((out >= 0) & (out < 13)).all()
    if top_k:  # only among the k largest
        ranks = np.argsort(np.argsort(-np.asarray(logits), axis=-1), axis=-1)
        assert (ranks[np.arange(4), out] < top_k).all()


_cell_step = jax.jit(
    step, static_argnames="cfg"
)  # one cell step compiled once: the loop stays Python


def _greedy_reference(params, prompt, length):
    """Step by step in Python: run the prompt, then argmax and feed back."""
    carry = init_carry(CFG, 1)
    for c in prompt:
        logits, carry = _cell_step(params, CFG, carry, jnp.array([c]))
    out = []
    for _ in range(length):
        nxt = int(np.argmax(np.asarray(logits[0])))
        out.append(nxt)
        logits, carry = _cell_step(params, CFG, carry, jnp.array([nxt]))
    return out


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=6, max_size=6))
def test_greedy_equals_step_by_step_reference_for_any_prompt(params, prompt):
    # the values vary, the shapes do not: one compile for every example
    got = sample(
        params, jax.random.PRNGKey(0), jnp.array(prompt), cfg=CFG, length=6, temperature=0.0
    )
    assert np.asarray(got).tolist() == _greedy_reference(params, prompt, 6)


def test_window_mode_equals_rereading_the_window(params):
    prompt, width = [3, 1, 4, 1, 5, 9, 2], 4
    got = sample(
        params,
        jax.random.PRNGKey(0),
        jnp.array(prompt),
        cfg=CFG,
        length=6,
        temperature=0.0,
        mode="window",
        seq_length=width,
    )
    seq = list(prompt)
    for _ in range(6):
        logits, _ = apply(params, CFG, jnp.array([seq[-width:]]), last_only=True)
        seq.append(int(jnp.argmax(logits[0])))
    assert np.asarray(got).tolist() == seq[len(prompt) :]
    # a prompt shorter than the window is padded with masked positions
    short = sample(
        params,
        jax.random.PRNGKey(0),
        jnp.array([3, 1]),
        cfg=CFG,
        length=3,
        temperature=0.0,
        mode="window",
        seq_length=width,
    )
    assert np.asarray(short)[0] == int(
        jnp.argmax(apply(params, CFG, jnp.array([[3, 1]]))[0][0, -1])
    )


def test_deterministic_for_a_seed_and_batched_samples_differ(params):
    kw = dict(cfg=CFG, length=40, temperature=1.0, num_samples=3)
    a = sample(params, jax.random.PRNGKey(7), jnp.array([1, 2]), **kw)
    b = sample(params, jax.random.PRNGKey(7), jnp.array([1, 2]), **kw)
    c = sample(params, jax.random.PRNGKey(8), jnp.array([1, 2]), **kw)
    assert a.shape == (3, 40)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])


def test_new_temperature_or_top_p_does_not_recompile(params):
    kw = dict(cfg=CFG, length=5, top_p=0.9)
    sample(params, jax.random.PRNGKey(0), jnp.array([1, 2]), temperature=0.5, **kw)
    size = sample._cache_size()

    def again(cfg):  # new temperature and top_p: the same program
        key, prompt = jax.random.PRNGKey(1), jnp.array([2, 3])
        return sample(params, key, prompt, temperature=1.3, **{**kw, "cfg": cfg, "top_p": 0.5})

    want = again(CFG)
    assert sample._cache_size() == size
    # nor does a config that differs only in dropout (which sampling does not read)
    got = again(dataclasses.replace(CFG, dropout=0.5, input_dropout=0.1, dropout_locked=True))
    assert sample._cache_size() == size
    np.testing.assert_array_equal(got, want)


def test_sample_inside_user_jit_and_vmap(params):
    @jax.jit
    def many(keys):
        return jax.vmap(
            lambda k: sample(params, k, jnp.array([1, 2]), cfg=CFG, length=8, temperature=1.0)
        )(keys)

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    out = np.asarray(many(keys))
    # each row is the sample of its key, as a plain call gives it
    want = [sample(params, k, jnp.array([1, 2]), cfg=CFG, length=8, temperature=1.0) for k in keys]
    np.testing.assert_array_equal(out, np.stack(want))
    assert len({tuple(row) for row in out.tolist()}) == 3


def test_off_is_top_k_0_and_top_p_1_as_in_the_config_the_cli_and_the_server(params):
    # one meaning of off everywhere: 0 and 1.0 draw what None draws, and trace no filter
    key, prompt = jax.random.PRNGKey(3), jnp.array([1, 2, 3])
    kw = {"cfg": CFG, "length": 12, "temperature": 0.9}
    want = sample(params, key, prompt, top_k=None, top_p=None, **kw)
    np.testing.assert_array_equal(sample(params, key, prompt, top_k=0, top_p=1.0, **kw), want)
    np.testing.assert_array_equal(sample(params, key, prompt, **kw), want)  # the defaults
    stream = sample_stream(params, key, prompt, top_k=0, top_p=1.0, chunk=5, **kw)
    np.testing.assert_array_equal(np.concatenate([np.asarray(c) for c in stream]), want)
    assert static_off(0, 1.0) == (None, None) and static_off(5, 0.9) == (5, 0.9)

    def program(**filters):
        return jax.jit(lambda p: sample(p, key, prompt, **filters, **kw)).lower(params).as_text()

    assert "stablehlo.sort" in program(top_p=0.9)  # a top-p filter sorts
    assert "stablehlo.sort" not in program(top_k=0, top_p=1.0)  # no filter in the program


@pytest.mark.parametrize(
    "option, words",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 14}, "top_k"),
        ({"length": 0}, "length"),
        ({"mode": "sideways"}, "mode"),
    ],
)
def test_out_of_range_options_are_refused_before_tracing(params, option, words):
    kw = {"cfg": CFG, "length": 5, **option}
    with pytest.raises(ValueError, match=words):
        sample(params, jax.random.PRNGKey(0), jnp.array([1, 2]), **kw)
    with pytest.raises(ValueError, match=words):
        next(iter(sample_stream(params, jax.random.PRNGKey(0), jnp.array([1, 2]), **kw)))
    # traced values cannot be read: inside a caller's jit they are not refused
    if set(option) == {"top_p"} and option["top_p"] > 0:
        out = jax.jit(
            lambda p: sample(
                params, jax.random.PRNGKey(0), jnp.array([1]), cfg=CFG, length=3, top_p=p
            )
        )(option["top_p"])
        assert out.shape == (3,)
