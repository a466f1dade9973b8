"""The generation loops against fake decoders whose answers are known (no model), the one
draw against a row-by-row reference, and the real decoders through every generation path:
sample, beam search (window-trained runs too) and the serving engine."""

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchar.beam import beam_search
from jaxchar.config import ModelConfig
from jaxchar.decoders import Stateful, Window, decoder
from jaxchar.run import Run
from jaxchar.sampling import NEG, decode, sample_logits

V = 7


@dataclass(frozen=True)
class Counter:
    """After id i comes (i + 1) % V, certainly: state = the last id of each row."""

    cfg: ModelConfig = ModelConfig(vocab_size=V)

    def start(self, params, prompt, mask=None):
        return (prompt[:, -1],)

    def logits(self, params, state):
        return jnp.where(jax.nn.one_hot((state[0] + 1) % V, V) > 0, 0.0, NEG)

    def advance(self, params, state, ids):
        return (ids,)


@dataclass(frozen=True)
class Uniform:
    """Every id equally likely at every step (logits of zeros): the draw is the keys'."""

    cfg: ModelConfig = ModelConfig(vocab_size=V)

    def start(self, params, prompt, mask=None):
        return (jnp.zeros(prompt.shape[:1], jnp.int32),)

    def logits(self, params, state):
        return jnp.zeros((state[0].shape[0], V))

    def advance(self, params, state, ids):
        return (state[0] + 1,)


@dataclass(frozen=True)
class Ender:
    """Three free characters among 0..V-2 (uniform), then the end id V-1 is forced."""

    cfg: ModelConfig = ModelConfig(vocab_size=V)

    def start(self, params, prompt, mask=None):
        return (jnp.zeros(prompt.shape[:1], jnp.int32),)

    def logits(self, params, state):
        made = state[0][:, None]
        end = jnp.arange(V)[None] == V - 1
        return jnp.where(made >= 3, jnp.where(end, 0.0, NEG), jnp.where(end, NEG, 0.0))

    def advance(self, params, state, ids):
        return (state[0] + 1,)


PROMPT = jnp.array([[3, 1], [0, 5]])


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=2.5, top_k=1),
        dict(temperature=0.7, top_p=0.3),
    ],
)
def test_a_certain_next_id_is_drawn_whatever_the_settings(settings):
    got = decode(None, jax.random.PRNGKey(0), PROMPT, dec=Counter(), length=10, **settings)
    want = [[(last + 1 + i) % V for i in range(10)] for last in (1, 5)]
    np.testing.assert_array_equal(got, want)


def test_the_loop_draws_with_the_per_character_keys_sample_uses():
    # the reference: a Python loop over split(key, length), one categorical draw a step
    key, length = jax.random.PRNGKey(3), 12
    got = decode(None, key, PROMPT, dec=Uniform(), length=length, temperature=1.0)
    keys = jax.random.split(key, length)
    want = [jax.random.categorical(k, jnp.zeros((2, V))) for k in keys]
    np.testing.assert_array_equal(got, np.stack(want, axis=1))
    assert len(np.unique(np.asarray(got))) > 1


def test_beam_search_with_a_forced_end_stops_every_hypothesis_there():
    found = beam_search(
        None, PROMPT[0], cfg=Ender().cfg, length=8, beam=4, stop_id=V - 1, dec=Ender()
    )
    np.testing.assert_array_equal(found.lengths, [4, 4, 4, 4])  # three characters, the end
    np.testing.assert_allclose(found.log_probs, [3 * np.log(1 / (V - 1))] * 4, rtol=1e-5)
    ids = np.asarray(found.ids)
    assert (ids[:, 3:] == V - 1).all() and (ids[:, :3] < V - 1).all()
    assert len({tuple(r) for r in ids[:, :3]}) == 4  # four different hypotheses


def test_per_row_settings_draw_what_each_row_draws_alone():
    # the engine's draw (settings as arrays, a key per row) against sample's (scalars)
    rows = 6
    logits = jax.random.normal(jax.random.PRNGKey(1), (rows, V)) * 3
    keys = jax.random.split(jax.random.PRNGKey(2), rows)
    temperature = jnp.array([0.0, 1.0, 0.5, 2.0, 1.0, 0.8])
    top_k = jnp.array([0, 0, 2, 3, 1, 0])
    top_p = jnp.array([1.0, 0.5, 1.0, 0.9, 1.0, 0.2])

    def one(k, row, t, tk, tp):
        return sample_logits(k, row[None], t, tk, tp)[0]

    got = jax.vmap(one)(keys, logits, temperature, top_k, top_p)
    for r in range(rows):
        k = int(top_k[r]) or None
        p = float(top_p[r]) if top_p[r] < 1 else None
        want = sample_logits(keys[r], logits[r][None], float(temperature[r]), k, p)[0]
        assert int(got[r]) == int(want), r


def test_the_mode_names_a_decoder_in_one_place():
    cfg = ModelConfig(vocab_size=V)
    assert isinstance(decoder(cfg, "stateful"), Stateful)
    # with dropout off, which decoding does not read: configs that differ there share programs
    assert decoder(cfg, "window", 30) == Window(replace(cfg, dropout=0.0), 30)
    assert decoder(replace(cfg, dropout=0.5), "stateful") == decoder(cfg, "stateful")
    with pytest.raises(ValueError, match="stateful, window"):
        decoder(cfg, "windowed")


def test_beam_search_on_a_window_trained_run_uses_its_window_decoder(window_run, monkeypatch):
    # the tutorial's small model's shapes and a prompt longer than its window: beam 1 is
    # greedy window sampling, and Run.beam asks for the run's window decoder
    import jaxchar.run.reading
    from jaxchar.model import init_params
    from jaxchar.sampling import sample

    with Run.open(window_run) as run:
        cfg, seq = run.cfg.model, run.cfg.data.seq_length
        text = (  # longer than the window: the window decoder forgets its start
            "alice was beginning to get very tired of sitting by her sister on the bank, "
            "and of having nothing to do: once or twice she had peeped into the book"
        )
        ids = run.encode_prompt(text)
        assert len(ids) > seq
        params = jax.tree.map(lambda w: 4.0 * w, init_params(cfg, jax.random.PRNGKey(5)))
        greedy = sample(
            params,
            jax.random.PRNGKey(0),
            ids,
            cfg=cfg,
            length=30,
            temperature=0,
            mode="window",
            seq_length=seq,
        )
        found = beam_search(params, ids, cfg=cfg, length=30, beam=1, mode="window", seq_length=seq)
        np.testing.assert_array_equal(found.ids[0], greedy)
        seen = {}

        def spy(*args, **kwargs):
            seen.update(kwargs)
            return beam_search(*args, **kwargs)

        monkeypatch.setattr(jaxchar.run.reading, "beam_search", spy)
        run.beam("alice", beam=2, length=5)
    assert seen["mode"] == "window" and seen["seq_length"] == seq


def test_a_short_window_forgets_what_the_stateful_decoder_remembers():
    from jaxchar.model import init_params

    cfg = ModelConfig(vocab_size=5, layers=1, hidden=16, encoding="embed", embed_dim=4)
    params = jax.tree.map(lambda w: 3.0 * w, init_params(cfg, jax.random.PRNGKey(0)))
    prompts = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2], [4, 4, 0, 0, 3, 1, 0, 2]])
    window = beam_search(params, prompts, cfg=cfg, length=12, beam=2, mode="window", seq_length=3)
    stateful = beam_search(params, prompts, cfg=cfg, length=12, beam=2)
    assert not np.array_equal(window.ids, stateful.ids)
    # a window as long as everything read is the stateful decoder again
    wide = beam_search(params, prompts, cfg=cfg, length=12, beam=2, mode="window", seq_length=20)
    np.testing.assert_array_equal(wide.ids, stateful.ids)


@pytest.mark.parametrize("mode", ["stateful", "window"])
def test_a_prompt_read_in_pieces_gives_the_state_of_reading_it_at_once(mode):
    # pieces of different lengths, left-padded and masked as the engine pads them, and a
    # row with nothing to read in one piece (it keeps its state)
    from jaxchar.model import init_params

    cfg = ModelConfig(vocab_size=6, layers=2, hidden=16, encoding="embed", embed_dim=4)
    params = jax.tree.map(lambda w: 3.0 * w, init_params(cfg, jax.random.PRNGKey(1)))
    dec = decoder(cfg, mode, 7)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 6, n) for n in (19, 5)]
    whole = jax.tree.map(
        lambda *rows: jnp.concatenate(rows),
        *(dec.start(params, jnp.asarray(p)[None]) for p in prompts),
    )
    state, read = dec.empty(2), [0, 0]
    for sizes in [(4, 5), (8, 0), (7, 0)]:
        width = 8
        piece, mask = np.zeros((2, width), np.int32), np.zeros((2, width), bool)
        for r, n in enumerate(sizes):
            piece[r, width - n :] = prompts[r][read[r] : read[r] + n]
            mask[r, width - n :] = True
            read[r] += n
        state = dec.read(params, state, jnp.asarray(piece), jnp.asarray(mask))
    assert read == [19, 5]
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    ids = jnp.array([1, 2])
    np.testing.assert_allclose(
        dec.logits(params, dec.advance(params, state, ids)),
        dec.logits(params, dec.advance(params, whole, ids)),
        rtol=1e-5,
        atol=1e-6,
    )
