"""Beam search against exhaustive search, greedy sampling and the model's own scores."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchar.beam import beam_search
from jaxchar.cli import main
from jaxchar.config import ModelConfig
from jaxchar.model import apply, init_carry, init_params
from jaxchar.run import Run
from jaxchar.sampling import sample

TINY = ModelConfig(vocab_size=4, layers=2, hidden=8, encoding="embed", embed_dim=4, dropout=0.0)
PROMPT = jnp.array([1, 2, 0, 3])


def _params(seed=0):
    # larger weights than the initializer's, so that the continuations' scores spread out
    params = init_params(TINY, jax.random.PRNGKey(seed))
    return jax.tree.map(lambda w: 3.0 * w, params)


def _log_probs(params, cfg, prompt, continuations) -> np.ndarray:
    """The model's log-probabilities of each row of `continuations` [n, L] after `prompt`,
    position by position [n, L], read off one forward pass (in float64 from there on)."""
    conts = np.asarray(continuations)
    ids = np.concatenate([np.broadcast_to(np.asarray(prompt), (len(conts), len(prompt))), conts], 1)
    forward = jax.jit(apply, static_argnums=1)  # one compilation for all the rows
    logits, _ = forward(params, cfg, jnp.asarray(ids), init_carry(cfg, len(conts)))
    logits = np.asarray(logits, np.float64)[:, len(prompt) - 1 : -1]
    top = logits.max(-1, keepdims=True)
    logp = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
    return np.take_along_axis(logp, conts[..., None], -1)[..., 0]


def _exhaustive(params, length, stop_id=None, alpha=0.0):
    """Every continuation of `length` characters, scored (one forward pass over them all);
    with stop_id, each cut after its first stop (continuations equal up to it are the same
    hypothesis)."""
    conts = np.array(list(itertools.product(range(TINY.vocab_size), repeat=length)))
    logp = _log_probs(params, TINY, PROMPT, conts)
    found = {}
    for cont, row in zip(conts, logp, strict=True):
        cont = tuple(int(c) for c in cont)
        if stop_id is not None and stop_id in cont:
            cont = cont[: cont.index(stop_id) + 1]
        if cont not in found:
            total = float(row[: len(cont)].sum())
            found[cont] = (total / len(cont) ** alpha, total)
    return sorted(found.items(), key=lambda item: -item[1][0])


def test_a_wide_beam_finds_exactly_what_exhaustive_search_finds():
    params, length = _params(), 4
    want = _exhaustive(params, length)
    # beam >= vocab ** (length - 1): nothing is ever pruned, so the top is exact
    got = beam_search(params, PROMPT, cfg=TINY, length=length, beam=64)
    for i in range(10):
        cont, (_, total) = want[i]
        assert tuple(int(x) for x in got.ids[i]) == cont
        np.testing.assert_allclose(float(got.log_probs[i]), total, rtol=1e-5, atol=1e-5)


def test_stop_and_length_normalization_against_exhaustive_search():
    params, length = _params(1), 4
    # stop id 2: with these weights the best hypotheses end at every length from 1 to 4
    want = _exhaustive(params, length, stop_id=2, alpha=1.0)
    got = beam_search(params, PROMPT, cfg=TINY, length=length, beam=64, stop_id=2, length_penalty=1)
    for i in range(8):
        cont, (score, total) = want[i]
        n = int(got.lengths[i])
        assert tuple(int(x) for x in got.ids[i][:n]) == cont
        assert all(int(x) == 2 for x in got.ids[i][n:])  # padded with the stop id
        np.testing.assert_allclose(float(got.scores[i]), score, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(got.log_probs[i]), total, rtol=1e-5, atol=1e-5)
    assert len({int(n) for n in got.lengths[:8]}) > 1  # the ranking mixed lengths


def test_a_narrow_beam_returns_the_models_scores_best_first(tiny_run):
    trained = Run.open(tiny_run)
    params, _ = trained.params()
    prompt = trained.encode_prompt("alice was ")
    got = beam_search(params, prompt, cfg=trained.cfg.model, length=12, beam=5)
    totals = [float(x) for x in got.log_probs]
    assert totals == sorted(totals, reverse=True)
    assert len({tuple(np.asarray(r)) for r in got.ids}) == 5  # five different hypotheses
    want = _log_probs(params, trained.cfg.model, prompt, np.asarray(got.ids)).sum(1)
    np.testing.assert_allclose(totals, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["tiny_run", "fast_run"])
def test_beam_one_is_greedy_sampling(which, request):
    """On the tiny config and on the default config's shapes (2 x LSTM-384)."""
    trained = Run.open(request.getfixturevalue(which))
    params, _ = trained.params()
    prompt = trained.encode_prompt("the queen said")
    greedy = sample(
        params, jax.random.PRNGKey(0), prompt, cfg=trained.cfg.model, length=60, temperature=0
    )
    got = beam_search(params, prompt, cfg=trained.cfg.model, length=60, beam=1)
    np.testing.assert_array_equal(got.ids[0], greedy)


def test_prompts_in_a_batch_get_what_each_gets_alone():
    params = _params(2)
    prompts = jnp.array([[1, 2, 0, 3], [3, 3, 1, 0], [0, 1, 2, 2]])
    both = beam_search(params, prompts, cfg=TINY, length=6, beam=3)
    for i in range(3):
        alone = beam_search(params, prompts[i], cfg=TINY, length=6, beam=3)
        np.testing.assert_array_equal(both.ids[i], alone.ids)
        np.testing.assert_allclose(both.log_probs[i], alone.log_probs, rtol=1e-6)


def test_beam_search_is_jittable_and_vmappable_and_refuses_bad_options():
    params = _params()
    fn = jax.jit(lambda p, x: beam_search(p, x, cfg=TINY, length=3, beam=2).ids)
    np.testing.assert_array_equal(
        fn(params, PROMPT), beam_search(params, PROMPT, cfg=TINY, length=3, beam=2).ids
    )
    mapped = jax.vmap(lambda x: beam_search(params, x, cfg=TINY, length=3, beam=2).ids)
    assert mapped(jnp.stack([PROMPT, PROMPT])).shape == (2, 2, 3)
    for bad, message in [
        (dict(length=0, beam=2), "length"),
        (dict(length=3, beam=0), "beam"),
        (dict(length=3, beam=2, stop_id=9), "stop_id"),
    ]:
        with pytest.raises(ValueError, match=message):
            beam_search(params, PROMPT, cfg=TINY, **bad)


def test_generate_beam_prints_the_best_beams(tiny_run, capsys):
    args = ["generate", str(tiny_run), "--prompt", "alice", "--length", "20", "--quiet"]
    assert main([*args, "--beam", "4"]) == 0
    best = capsys.readouterr().out
    assert main([*args, "--beam", "4", "--num-samples", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("===== beam") == 3 and "log-probability" in out
    first = out.split("=====\n")[1].split("\n=====")[0]
    assert best.rstrip("\n") == first.rstrip("\n")  # the best of three is the one printed alone
    found = Run.open(tiny_run).beam("alice", beam=4, length=20, results=3)
    assert [text for text, _ in found][0] == first.rstrip("\n")
    assert main([*args, "--beam", "0"]) == 2
    assert main([*args, "--beam", "2", "--num-samples", "3"]) == 2
    err = capsys.readouterr().err
    assert "beam" in err and "Traceback" not in err
