import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchar import data, train
from jaxchar.checkpoint import CheckpointError, RunDir, load_checkpoint
from jaxchar.config import Config, ConfigError, override
from jaxchar.corpus import prepare
from jaxchar.model import init_params
from jaxchar.train import (
    Plan,
    create_state,
    evaluate,
    fit,
    loss_fn,
    make_optimizer,
    train_step,
    used_params,
    with_vocab,
    zero_totals,
)


def _setup(alice_text, *sets, chars=20000):
    cfg = override(
        Config(),
        [
            "model.hidden=24",
            "model.layers=1",
            "model.encoding=embed",
            "model.embed_dim=8",
            "model.dropout=0.1",
            "data.seq_length=16",
            "data.val_fraction=0.1",
            "train.batch_size=16",
            "train.learning_rate=0.01",
            "train.log_every=5",
            *sets,
        ],
    )
    corpus = prepare(alice_text[:chars], dataclasses.replace(cfg.data, strip_gutenberg=False))
    return with_vocab(cfg, len(corpus.vocab)), corpus


@pytest.mark.parametrize("objective", ["window", "sequence", "stateful", "sentences", "gru"])
def test_loss_falls(alice_text, objective):
    sets = {
        "window": [],
        "sequence": ["data.objective=sequence"],
        "stateful": ["data.objective=sequence", "data.stateful=true"],
        "sentences": ["data.objective=sentences"],
        "gru": ["data.objective=sequence", "model.cell=gru"],
    }[objective]
    cfg, corpus = _setup(
        alice_text,
        "train.max_steps=60",
        "train.steps_per_call=10",
        "train.save_every_steps=20",
        *sets,
    )
    spans = dict(train_spans=corpus.train_spans, val_spans=corpus.val_spans)
    hist = fit(cfg, corpus.train_ids, corpus.val_ids, **spans).history
    assert len(hist) == 3
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 0.1
    assert hist[-1]["train_loss"] < 3.2 and hist[-1]["val_loss"] < 3.2  # ln(vocab) is ~3.6


def test_sentence_padding_is_masked_out_of_loss_and_gradients(alice_text):
    cfg, corpus = _setup(alice_text, "data.objective=sentences", "model.layers=2")
    spans = jnp.asarray(corpus.train_spans)
    batch = data.sentence_batch(
        jnp.asarray(corpus.train_ids), spans, jax.random.PRNGKey(0), 0, 0, 16, 16
    )
    pad = batch["weights"] == 0
    assert pad.any() and not pad.all()  # short sentences are padded in this batch
    noisy = dict(
        batch,
        inputs=jnp.where(pad, 7, batch["inputs"]),
        targets=jnp.where(pad, 3, batch["targets"]),
    )
    params = init_params(cfg.model, jax.random.PRNGKey(1))
    grad = jax.value_and_grad(loss_fn, has_aux=True)
    (want, (w1, _)), g1 = grad(params, cfg, batch, None, train=False)
    (got, (w2, _)), g2 = grad(params, cfg, noisy, None, train=False)
    assert float(w1) == float(w2) == float(batch["weights"].sum())
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_training_is_deterministic_for_a_seed_and_seeds_share_one_program(alice_text):
    cfg, corpus = _setup(alice_text, "train.max_steps=12", "train.steps_per_call=4")
    a = fit(cfg, corpus.train_ids).state.params
    programs = train.run_steps._cache_size()
    b = fit(cfg, corpus.train_ids).state.params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # fields the train step never reads change neither the result nor the program
    unread = ["train.log_every=3", "train.keep_best=1", "train.sample_chars=5"]
    unread += ["train.eval_rows=2", "train.epochs=7", "data.lowercase=false"]
    c = fit(override(cfg, unread), corpus.train_ids).state.params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True):
        np.testing.assert_array_equal(x, y)
    # another seed trains differently (its keys are traced) in the same program
    d = fit(override(cfg, ["train.seed=7"]), corpus.train_ids).state.params
    assert not np.array_equal(a["head"]["kernel"], d["head"]["kernel"])
    assert train.run_steps._cache_size() == programs


def test_runs_whose_optimizers_are_the_same_share_one_optimizer():
    t = Config().train  # a constant rate: the length of the run does not enter it
    assert make_optimizer(t, 10) is make_optimizer(dataclasses.replace(t, seed=3, epochs=2), 99)
    assert make_optimizer(t, 10) is not make_optimizer(dataclasses.replace(t, clip_norm=1.0), 10)
    cosine = dataclasses.replace(t, schedule="cosine")
    assert make_optimizer(cosine, 10) is make_optimizer(dataclasses.replace(cosine, seed=1), 10)
    assert make_optimizer(cosine, 10) is not make_optimizer(cosine, 99)
    warm = dataclasses.replace(t, warmup_steps=5)  # the warm-up's end depends on the length
    assert make_optimizer(warm, 3) is not make_optimizer(warm, 99)


@pytest.mark.parametrize("case", ["window", "stateful", "ema"])
def test_resume_equals_uninterrupted(alice_text, tmp_path, case):
    extra = {
        "window": [],
        "stateful": ["data.objective=sequence", "data.stateful=true"],
        "ema": ["train.ema=0.9"],  # the average is kept in the optimizer's state
    }[case]
    cfg, corpus = _setup(
        alice_text, "train.epochs=1", "train.save_every_steps=5", "train.steps_per_call=5", *extra
    )
    total = 15
    full_cfg = override(cfg, [f"train.max_steps={total}"])
    straight = fit(full_cfg, corpus.train_ids, corpus.val_ids)

    run = RunDir.create(tmp_path / "run", full_cfg, corpus.vocab)
    calls = iter(range(total))  # a stop after the second call of 5 steps, as Ctrl-C makes
    first = fit(
        full_cfg,
        corpus.train_ids,
        corpus.val_ids,
        checkpointer=run,
        should_stop=lambda: next(calls) == 1,
    )
    assert int(first.state.step) == 10 and first.interrupted
    run.close()
    reopened = RunDir.open(tmp_path / "run")
    resumed = fit(full_cfg, corpus.train_ids, corpus.val_ids, checkpointer=reopened)
    reopened.close()
    assert int(resumed.state.step) == total
    for x, y in zip(
        jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    assert resumed.history[-1]["train_loss"] == straight.history[-1]["train_loss"]
    assert resumed.history[-1]["val_loss"] == straight.history[-1]["val_loss"]
    if case == "ema":  # and readers load the average, which the validation loss scored
        ema = straight.state.opt_state[-1].ema
        for x, y in zip(
            jax.tree.leaves(ema),
            jax.tree.leaves(used_params(resumed.state, full_cfg.train)),
            strict=True,
        ):
            np.testing.assert_array_equal(x, y)
        with RunDir.open(tmp_path / "run") as again:
            stored = again.read_params(total)
        for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(stored), strict=True):
            np.testing.assert_array_equal(x, y)
        val = evaluate(ema, full_cfg, corpus.val_ids)
        assert straight.history[-1]["val_loss"] == pytest.approx(val, rel=1e-6)
        assert val != pytest.approx(evaluate(straight.state.params, full_cfg, corpus.val_ids))


def test_the_moving_average_of_the_weights_is_the_hand_computed_one(alice_text):
    # three train steps by hand: ema_0 = the initial params, then
    # ema_t = d_t ema_{t-1} + (1 - d_t) params_t with d_t = min(decay, (1 + t) / (10 + t))
    cfg, corpus = _setup(alice_text, "train.ema=0.5")
    tx = make_optimizer(cfg.train, total_steps=3)
    state = create_state(cfg, tx, jax.random.PRNGKey(0))
    obj = data.objective(cfg)
    ids = jnp.asarray(corpus.train_ids)
    want = jax.tree.map(np.asarray, state.params)
    for t in range(1, 4):
        batch = obj.train_batch(ids, None, jax.random.PRNGKey(1), 0, t)
        state, _ = train_step(state, batch, jax.random.PRNGKey(t), cfg=cfg, tx=tx)
        d = min(0.5, (1 + t) / (10 + t))  # 2/11, 3/12, then the decay itself: 0.5 > 4/13
        want = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * np.asarray(p), want, state.params)
    got = used_params(state, cfg.train)
    assert int(state.opt_state[-1].count) == 3
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert used_params(state, dataclasses.replace(cfg.train, ema=0.0)) is state.params


@pytest.mark.parametrize("decay", ["all", "matrices"])
def test_weight_decay_is_hand_computed_adamw(alice_text, decay):
    # two updates of the model's own parameter tree with fixed gradients, against AdamW
    # written out in numpy: m, v as Adam's (b1 0.9, b2 0.999, bias-corrected, eps 1e-7
    # outside the root), then the step adds weight_decay * p, on every parameter or, with
    # train.decay = "matrices", on the kernels and the embedding table but not the biases
    lr, wd = 0.01, 0.3
    cfg, _ = _setup(alice_text, f"train.learning_rate={lr}", f"train.weight_decay={wd}")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, decay=decay))
    tx = make_optimizer(cfg.train, total_steps=2)
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    state = tx.init(params)
    rng = np.random.default_rng(0)
    draw = lambda p: rng.normal(size=p.shape).astype(np.float32)  # noqa: E731
    grads = [jax.tree.map(draw, params) for _ in range(2)]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    decayed = {path: decay == "all" or p.ndim >= 2 for path, p in flat}
    biases = sum(len(path) and path[-1].key == "bias" for path, _ in flat)
    assert biases == 2 and sum(decayed.values()) == len(flat) - (biases if decay != "all" else 0)
    want = {path: np.asarray(p, np.float64) for path, p in flat}
    m = {path: 0.0 for path in want}
    v = {path: 0.0 for path in want}
    got = params
    for t, g in enumerate(grads, start=1):
        updates, state = tx.update(g, state, got)
        got = jax.tree.map(lambda p, u: p + u, got, updates)
        for path, gl in jax.tree_util.tree_flatten_with_path(g)[0]:
            m[path] = 0.9 * m[path] + 0.1 * gl
            v[path] = 0.999 * v[path] + 0.001 * gl * gl
            step = (m[path] / (1 - 0.9**t)) / (np.sqrt(v[path] / (1 - 0.999**t)) + 1e-7)
            if decayed[path]:
                step = step + wd * want[path]
            want[path] = want[path] - lr * step
    # what tells the two settings apart is the forget gate's bias (initialised to 1):
    # decayed, it moves by lr * wd = 0.003 a step more, a thousand times the tolerance
    for path, p in jax.tree_util.tree_flatten_with_path(got)[0]:
        np.testing.assert_allclose(p, want[path], rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_decay_names_its_choices():
    with pytest.raises(ConfigError, match="train.decay = 'biases' is not one of all, matrices"):
        override(Config(), ["train.decay=biases"])


def _metric_lines(run_dir) -> list[dict]:
    """metrics.jsonl without its timings, and without the saves made on interruption
    (those exist only in the interrupted run, and are marked)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timings = ("wall_s", "chars_per_s")
    return [
        {k: v for k, v in m.items() if k not in timings} for m in lines if not m.get("interrupted")
    ]


@pytest.fixture(scope="module")
def boundary_setup(alice_text, tmp_path_factory):
    """The uninterrupted run: 2+ epochs of 21 steps, saves every 10 steps and at each
    epoch's end, no held-out text (the tutorial's case: the best is chosen by training
    loss), keep-best 2."""
    cfg, corpus = _setup(
        alice_text,
        "data.objective=sequence",
        "data.val_fraction=0",
        "train.max_steps=50",
        "train.save_every_steps=10",
        "train.steps_per_call=1",
        "train.keep_best=2",
        chars=6000,
    )
    straight_dir = tmp_path_factory.mktemp("straight") / "run"
    with RunDir.create(straight_dir, cfg, corpus.vocab) as run:
        fit(cfg, corpus.train_ids, checkpointer=run)
    return cfg, corpus, straight_dir


@pytest.mark.parametrize(
    "boundary",
    ["mid-epoch save", "end-of-epoch save", "between saves", "just after an epoch began"],
)
def test_a_resumed_run_logs_and_keeps_what_the_uninterrupted_run_does(
    boundary_setup, tmp_path, boundary
):
    """Stopped at each kind of boundary (a stop at a save is also what kill -9 soon after
    that save leaves on disk), then resumed: the same metrics.jsonl lines and the same
    best checkpoints as the uninterrupted run."""
    cfg, corpus, straight_dir = boundary_setup
    per_epoch = Plan.of(cfg, len(corpus.train_ids)).steps_per_epoch
    assert 16 < per_epoch <= 24  # the cases below: 10 and 15 inside epoch 1, 2 epochs < 50
    stop_at = {
        "mid-epoch save": 10,
        "end-of-epoch save": per_epoch,
        "between saves": 15,
        "just after an epoch began": 2 * per_epoch + 1,
    }[boundary]
    polls = iter(range(1, 10**6))  # one poll per dispatch of one step
    with RunDir.create(tmp_path / "run", cfg, corpus.vocab) as run:
        first = fit(
            cfg, corpus.train_ids, checkpointer=run, should_stop=lambda: next(polls) >= stop_at
        )
    assert first.interrupted and int(first.state.step) == stop_at
    at_a_save = stop_at % 10 == 0 or stop_at % per_epoch == 0
    assert first.history[-1].get("interrupted", False) == (not at_a_save)
    with RunDir.open(tmp_path / "run") as run:
        fit(cfg, corpus.train_ids, checkpointer=run)
    assert _metric_lines(tmp_path / "run") == _metric_lines(straight_dir), boundary
    with RunDir.open(tmp_path / "run") as resumed, RunDir.open(straight_dir) as straight:
        assert resumed.best_step() == straight.best_step()
        assert resumed._ranked(resumed.steps())[:2] == straight._ranked(straight.steps())[:2]


def test_a_save_on_interruption_skips_the_validation_pass(alice_text, monkeypatch):
    """Ctrl-C must be quick on any corpus: the interruption's save does not evaluate the
    held-out text (it says so), while regular saves do."""
    import jaxchar.train

    cfg, corpus = _setup(alice_text, "train.max_steps=20", "train.save_every_steps=10")
    cfg = override(cfg, ["train.steps_per_call=1"])
    calls, real = [], jaxchar.train.score
    monkeypatch.setattr(jaxchar.train, "score", lambda *a, **k: calls.append(1) or real(*a, **k))
    polls = iter(range(1, 100))
    result = fit(cfg, corpus.train_ids, corpus.val_ids, should_stop=lambda: next(polls) >= 13)
    first, last = result.history
    assert first["step"] == 10 and "val_loss" in first and len(calls) == 1
    assert last["step"] == 13 and last["interrupted"] and "val_loss" not in last


def test_checkpoint_round_trip_and_best_k(alice_text, tmp_path):
    cfg, corpus = _setup(
        alice_text,
        "train.max_steps=20",
        "train.save_every_steps=4",
        "train.keep_best=2",
        "train.steps_per_call=4",
    )
    run = RunDir.create(tmp_path / "run", cfg, corpus.vocab)
    result = fit(cfg, corpus.train_ids, corpus.val_ids, checkpointer=run)
    steps = run.steps()
    losses = {m["step"]: m["val_loss"] for m in result.history}
    best_two = sorted(losses, key=losses.get)[:2]
    assert set(steps) == set(best_two) | {20}  # the best two plus the latest
    assert run.best_step() == best_two[0]
    run.close()
    params, cfg2, vocab = load_checkpoint(tmp_path / "run", step=20)
    assert cfg2 == cfg and vocab == corpus.vocab
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(result.state.params), strict=True):
        np.testing.assert_array_equal(x, y)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5


def test_resume_keeps_the_best_saves_from_before_it(alice_text, tmp_path):
    # seen on a long run: after --resume, the next saves deleted the run's best checkpoint
    # (orbax 0.12 kept a preservation policy's metrics only in memory)
    cfg, corpus = _setup(alice_text, "train.max_steps=1", "train.keep_best=1")
    tree = {"state": fit(cfg, corpus.train_ids, corpus.val_ids).state, "totals": zero_totals()}

    def save(run, step, loss):
        run.save(step, tree, {"step": step, "train_loss": loss + 1, "val_loss": loss})

    with RunDir.create(tmp_path / "run", cfg, corpus.vocab) as run:
        save(run, 1, 1.0)
        save(run, 2, 2.0)
        assert run.steps() == [1, 2]
    with RunDir.open(tmp_path / "run") as run:
        save(run, 3, 3.0)
        assert run.steps() == [1, 3]  # the best from before the resume, and the latest
        assert run.best_step() == 1
        save(run, 4, 0.5)
        assert run.steps() == [4]  # nothing piles up across resumes either
    with RunDir.open(tmp_path / "run") as run:
        assert run.best_step() == 4


def test_run_dir_refuses_to_overwrite(alice_text, tmp_path):
    cfg, corpus = _setup(alice_text)
    RunDir.create(tmp_path / "run", cfg, corpus.vocab).close()
    with pytest.raises(CheckpointError, match="--resume"):
        RunDir.create(tmp_path / "run", cfg, corpus.vocab)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a jaxchar run"):
        RunDir.create(tmp_path / "other", cfg, corpus.vocab, overwrite=True)
    assert (tmp_path / "other" / "precious.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="not a jaxchar run"):
        RunDir.open(tmp_path / "other")


def test_stop_request_saves_and_returns(alice_text, tmp_path):
    cfg, corpus = _setup(alice_text, "train.max_steps=50", "train.steps_per_call=5")
    run = RunDir.create(tmp_path / "run", cfg, corpus.vocab)
    calls = iter(range(100))
    result = fit(
        cfg,
        corpus.train_ids,
        corpus.val_ids,
        checkpointer=run,
        should_stop=lambda: next(calls) >= 1,
    )
    assert result.interrupted and int(result.state.step) == 10
    assert run.steps() == [10]
    run.close()


def test_bfloat16_training_through_the_fused_backward(alice_text):
    """The products run in bfloat16 (the lowered step holds bf16 dots, forward and
    backward), the params and the loss stay float32, and training follows the float32 run
    closely (XLA on a CPU may keep excess precision through the casts, so bits may differ
    or not: the losses are compared with a tolerance)."""
    sets = [
        "data.objective=sequence",
        "model.layers=2",
        "train.max_steps=40",
        "train.steps_per_call=10",
        "train.save_every_steps=20",
    ]
    cfg, corpus = _setup(alice_text, "model.dtype=bfloat16", *sets)
    f32, _ = _setup(alice_text, *sets)
    params = init_params(cfg.model, jax.random.PRNGKey(0), cfg.data.seq_length)
    batch = data.objective(cfg).train_batch(
        jnp.asarray(corpus.train_ids), None, jax.random.PRNGKey(0), 0, 0
    )
    grad = jax.jit(jax.grad(lambda p: loss_fn(p, cfg, batch, jax.random.PRNGKey(1))[0]))
    text = grad.lower(params).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert sum("bf16" in line for line in dots) >= 4, "no bfloat16 products in the step"
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grad(params)))
    hist = fit(cfg, corpus.train_ids, corpus.val_ids).history
    want = fit(f32, corpus.train_ids, corpus.val_ids).history
    assert hist[-1]["val_loss"] < np.log(cfg.model.vocab_size) - 0.5  # it learns
    for got, ref in zip(hist, want, strict=True):
        assert abs(got["val_loss"] - ref["val_loss"]) < 0.05, (got, ref)


def test_at_most_two_calls_are_queued_so_a_stop_saves_soon(alice_text, monkeypatch):
    # asynchronous dispatch let the loop queue log_every steps ahead of the device, and a
    # Ctrl-C then waited for all of them; with at most two calls queued it waits for two
    from jaxchar import train

    cfg, corpus = _setup(
        alice_text, "train.max_steps=40", "train.steps_per_call=1", "train.log_every=1000"
    )
    real, issued, queued = train.run_steps, [], []

    def counting(*args, **kwargs):
        queued.append(sum(not x.is_ready() for x in issued))  # before this dispatch
        out = real(*args, **kwargs)
        issued.append(out[2])
        return out

    monkeypatch.setattr(train, "run_steps", counting)
    fit(cfg, corpus.train_ids)
    assert len(queued) == 40 and max(queued) <= 1, queued


@pytest.mark.parametrize(
    "seconds, step_s, eval_s, per_epoch, every",
    [
        (10.0, 0.01, 0.5, 300, 0),
        (10.0, 0.01, 0.5, 300, 70),
        (3.0, 0.002, 1.2, 1000, 0),
        (0.4, 0.01, 0.5, 50, 0),
        (7.3, 0.003, 0.0, 17, 5),
    ],
)
def test_the_steps_within_a_budget_are_the_most_whose_time_fits(
    seconds, step_s, eval_s, per_epoch, every
):
    """Against a loop over every step count: a step's time, plus one evaluation per epoch
    begun and per train.save_every_steps."""
    from jaxchar.config import TrainConfig
    from jaxchar.train import _steps_within

    def cost(n):
        saves = -(-n // per_epoch) + (n // every if every else 0)
        return n * step_s + saves * eval_s

    want = max(n for n in range(int(seconds / step_s) + 2) if cost(n) <= seconds)
    t = TrainConfig(save_every_steps=every)
    assert _steps_within(seconds, step_s, eval_s, per_epoch, t) == want


class _Clock:
    """A clock that moves only when the test says."""

    def __init__(self):
        self.now, self.calls, self.step_s = 100.0, 0, 0.01

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def timed_clock(monkeypatch) -> _Clock:
    """A clock that jaxchar.train's train steps and evaluations move, by exact amounts: a
    step takes 10 ms (clock.step_s), the first call also compiles for 2 s, an evaluation
    takes 0.5 s."""
    from jaxchar import train

    clock = _Clock()
    run_steps, score = train.run_steps, train.score

    def timed_run_steps(*args, n, **kw):
        clock.now += (2.0 if clock.calls == 0 else 0.0) + clock.step_s * n
        clock.calls += 1
        return run_steps(*args, n=n, **kw)

    def timed_score(*args, **kw):
        clock.now += 0.5
        return score(*args, **kw)

    monkeypatch.setattr(train, "run_steps", timed_run_steps)
    monkeypatch.setattr(train, "score", timed_score)
    return clock


def test_a_run_sized_by_minutes_takes_the_steps_its_measured_times_allow(
    alice_text, monkeypatch, timed_clock
):
    """train.minutes: sized() times the step and an evaluation (on the test's clock, so
    the figures are exact) and chooses the most steps that fit what is left, over
    several epochs whatever train.epochs says; fit sizes a config not sized yet the same
    way, says so, and takes exactly those steps."""
    from functools import partial

    from jaxchar import train
    from jaxchar.train import SIZING_SLACK, _steps_within, sized

    clock = timed_clock
    sets = ("train.minutes=0.3", "train.steps_per_call=5", "train.epochs=1")
    cfg, corpus = _setup(alice_text, *sets, chars=3000)
    assert sized(override(cfg, ["train.minutes=0"]), corpus.train_ids)[1] is None
    chosen, sizing = sized(cfg, corpus.train_ids, corpus.val_ids, began=100.0, clock=clock)
    per_epoch = Plan.of(override(cfg, ["train.minutes=0"]), len(corpus.train_ids)).steps_per_epoch
    assert sizing.step_s == pytest.approx(0.01) and sizing.compile_s == pytest.approx(2.0)
    assert sizing.eval_s == pytest.approx(0.5) and clock.calls >= 4
    assert sizing.left_s == pytest.approx(18.0 - (clock.now - 100.0))
    want = _steps_within(SIZING_SLACK * (sizing.left_s - 2.0), 0.01, 0.5, per_epoch, cfg.train)
    assert sizing.steps == want > 2 * per_epoch  # epochs = 1 is not used
    assert chosen.train.max_steps == want and chosen.train.minutes == 0.3
    assert sizing.deadline == pytest.approx(100.0 + 18.0)  # on the clock it was timed on
    json.dumps(dataclasses.asdict(sizing))  # a record: bench_quality.py stores it
    assert Plan.of(chosen, len(corpus.train_ids)).total_steps == want
    # a given train.max_steps is an upper bound
    capped, _ = sized(override(cfg, ["train.max_steps=7"]), corpus.train_ids, clock=clock)
    assert capped.train.max_steps == 7
    # too little time is refused in one line that says what to do
    with pytest.raises(train.TrainingError, match="leaves no time.*raise train.minutes"):
        sized(override(cfg, ["train.minutes=0.01"]), corpus.train_ids, clock=clock)
    # fit: the same measurements, the same choice
    clock.now, clock.calls, events = 100.0, 0, []
    monkeypatch.setattr(train, "sized", partial(sized, clock=clock))
    monkeypatch.setattr(train, "_now", clock)  # fit reads the deadline on the same clock
    result = fit(cfg, corpus.train_ids, corpus.val_ids, log=events.append)
    said = [e for e in events if e["event"] == "sized"]
    assert len(said) == 1 and said[0]["max_steps"] == want, said
    assert "train.minutes = 0.3" in said[0]["text"] and f"{want:,} steps" in said[0]["text"]
    assert int(result.state.step) == want


def test_a_run_slower_than_its_timing_saves_and_stops_before_its_deadline(
    alice_text, monkeypatch, timed_clock
):
    """train.minutes is a promise: where the machine runs slower than when it was timed
    (here a step takes 25 ms in the run, 10 ms when timed), the run saves, evaluated, and
    stops before its deadline instead of running past it, and says so."""
    from jaxchar import train
    from jaxchar.train import sized

    clock = timed_clock
    sets = ("train.minutes=0.3", "train.steps_per_call=5", "train.epochs=1")
    cfg, corpus = _setup(alice_text, *sets, chars=3000)

    def sized_then_slower(*args, **kw):
        out = sized(*args, clock=clock, **kw)
        clock.step_s = 0.025
        return out

    monkeypatch.setattr(train, "sized", sized_then_slower)
    monkeypatch.setattr(train, "_now", clock)  # the deadline is read on the same clock
    events = []
    result = fit(cfg, corpus.train_ids, corpus.val_ids, log=events.append)
    chosen = next(e for e in events if e["event"] == "sized")["max_steps"]
    up = [e for e in events if e["event"] == "time_up"]
    assert len(up) == 1 and result.time_up and result.interrupted
    assert "the time is up" in up[0]["text"] and "--resume" in up[0]["text"]
    deadline, call = 100.0 + 0.3 * 60, 5 * 0.025
    # within the budget, its last save's evaluation included, and no call earlier than needed
    assert deadline - call < clock.now <= deadline + 1e-9
    last = result.history[-1]
    assert last["step"] == up[0]["step"] == int(result.state.step) < chosen
    assert "val_loss" in last and not last.get("interrupted")  # evaluated: it may rank best


def test_a_stateful_run_of_part_epochs_spends_the_part_first(alice_text, timed_clock):
    """data.stateful reads the text as streams in order: a run whose length is not whole
    epochs begins partway into its first epoch, so that every later epoch, the last
    included, ends where the streams end; sized() takes all the steps that fit and says so."""
    from jaxchar.train import SIZING_SLACK, _steps_within, sized

    stateful = ("data.objective=sequence", "data.stateful=true", "train.batch_size=4")
    cfg, corpus = _setup(alice_text, *stateful, "train.steps_per_call=7")
    per_epoch = Plan.of(cfg, len(corpus.train_ids)).steps_per_epoch
    plan = Plan.of(override(cfg, [f"train.max_steps={2 * per_epoch + 3}"]), len(corpus.train_ids))
    assert (plan.total_steps, plan.offset) == (2 * per_epoch + 3, per_epoch - 3)
    assert plan.position(0) == (0, per_epoch - 3) and plan.position(3) == (1, 0)
    assert plan.steps_in_next_call(0, cfg.train) == 3  # never past the first epoch's end
    assert [s for s in range(1, plan.total_steps + 1) if plan.saves_at(s, cfg.train)] == [
        3,
        per_epoch + 3,
        2 * per_epoch + 3,
    ]
    assert Plan.of(override(cfg, ["train.epochs=2"]), len(corpus.train_ids)).offset == 0
    shuffled = override(cfg, ["data.stateful=false", f"train.max_steps={per_epoch + 3}"])
    assert Plan.of(shuffled, len(corpus.train_ids)).offset == 0  # chunks: no streams to end
    # fit: its saves come at those epochs' ends
    short = override(cfg, ["train.max_steps=5", "train.epochs=3"])
    result = fit(short, corpus.train_ids, corpus.val_ids)
    ends = [(m["step"], m["epoch"], m["epoch_done"]) for m in result.history]
    assert per_epoch > 5 and ends == [(5, 1, True)], ends  # one part epoch, ending the streams
    long = override(cfg, [f"train.max_steps={per_epoch + 3}", "train.epochs=3"])
    result = fit(long, corpus.train_ids, corpus.val_ids)
    ends = [(m["step"], m["epoch"], m["epoch_done"]) for m in result.history]
    assert ends == [(3, 1, True), (per_epoch + 3, 2, True)], ends
    # sized: every step that fits, the fraction first
    timed_clock.now, timed_clock.calls = 100.0, 0
    timed = override(cfg, ["train.minutes=0.5"])
    chosen, sizing = sized(timed, corpus.train_ids, corpus.val_ids, clock=timed_clock)
    fits = _steps_within(SIZING_SLACK * (sizing.left_s - 2.0), 0.01, 0.5, per_epoch, cfg.train)
    assert sizing.steps == fits == chosen.train.max_steps and fits % per_epoch, fits
    assert "the fraction first" in sizing.event()["text"]
    assert Plan.of(chosen, len(corpus.train_ids)).offset == per_epoch - fits % per_epoch
