import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import lstm_forward

from jaxchar.config import ModelConfig
from jaxchar.lstm import matmul
from jaxchar.model import CharLSTM, apply, dropout, init_carry, init_params, keep_mask, step


def _cfg(**kw):
    base = dict(vocab_size=11, layers=2, hidden=8, dropout=0.2, embed_dim=5)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("encoding", ["scaled", "onehot", "embed"])
def test_shapes(encoding):
    cfg = _cfg(encoding=encoding)
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.zeros((3, 7), jnp.int32)
    logits, carry = apply(params, cfg, ids)
    assert logits.shape == (3, 7, 11)
    assert len(carry) == 2 and carry[0][0].shape == (3, 8)
    last, _ = apply(params, cfg, ids, last_only=True)
    np.testing.assert_allclose(last, logits[:, -1], rtol=1e-5, atol=1e-6)


def _matches_reference_and_step_loop(params, cfg, ids):
    """The whole-sequence logits against the numpy loop and a character-by-character loop of
    `step`; returns the logits and the final carry."""
    logits, carry = apply(params, cfg, ids)
    np.testing.assert_allclose(logits, lstm_forward(params, cfg, ids), rtol=2e-4, atol=2e-5)
    stepped, steps = init_carry(cfg, ids.shape[0]), []
    for t in range(ids.shape[1]):
        out, stepped = step(params, cfg, stepped, ids[:, t])
        steps.append(out)
    np.testing.assert_allclose(jnp.stack(steps, 1), logits, rtol=2e-4, atol=2e-5)
    return logits, carry


@pytest.mark.parametrize("encoding", ["scaled", "onehot", "embed"])
@pytest.mark.parametrize("unroll", [1, 4])
def test_scanned_model_equals_numpy_reference_and_step_loop(encoding, unroll):
    cfg = _cfg(encoding=encoding, unroll=unroll)
    params = init_params(cfg, jax.random.PRNGKey(1))
    ids = jax.random.randint(jax.random.PRNGKey(2), (4, 9), 0, 11)
    _matches_reference_and_step_loop(params, cfg, ids)


@pytest.mark.parametrize("encoding", ["scaled", "embed"])
def test_gru_equals_numpy_reference_and_step_loop(encoding):
    cfg = _cfg(encoding=encoding, cell="gru")
    params = init_params(cfg, jax.random.PRNGKey(1))
    assert params["lstm_0"]["input_kernel"].shape[-1] == 3 * cfg.hidden
    ids = jax.random.randint(jax.random.PRNGKey(2), (4, 9), 0, 11)
    _, carry = _matches_reference_and_step_loop(params, cfg, ids)
    c, h = carry[-1]
    np.testing.assert_array_equal(c, h)  # the GRU's carry mirrors h in the c slot


def test_keras_initialisation():
    cfg = _cfg(layers=1, hidden=6)
    params = init_params(cfg, jax.random.PRNGKey(0))
    bias = np.asarray(params["lstm_0"]["bias"])
    np.testing.assert_array_equal(bias, np.r_[np.zeros(6), np.ones(6), np.zeros(12)])
    w_h = np.asarray(params["lstm_0"]["cell"]["recurrent_kernel"])  # [6, 24], orthogonal rows
    np.testing.assert_allclose(w_h @ w_h.T, np.eye(6), atol=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        dict(impl="fused", dropout=0.3, input_dropout=0.1, unroll=2),
        dict(impl="pallas", dtype="bfloat16", gate_activation="hard_sigmoid", encoding="onehot"),
        dict(impl="auto", cell="gru", dropout_locked=True, dropout=0.2, layers=1),
    ],
)
def test_init_params_are_flaxs_own_init_of_that_config(settings):
    """init_params shares one initializer among configs that differ only where parameters
    do not (backend, dropout, gates, unroll, dtype): the same arrays as flax's own init of
    the config as given, at any input length."""
    cfg = _cfg(**{"layers": 2, "hidden": 12, **settings})
    key = jax.random.PRNGKey(5)
    for length in (1, 7):
        want = CharLSTM(cfg).init({"params": key}, jnp.zeros((1, length), jnp.int32))["params"]
        got = init_params(cfg, key, length)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_masked_positions_leave_the_state_alone():
    cfg = _cfg(encoding="embed")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.array([[3, 4, 5]])
    padded = jnp.array([[9, 9, 3, 4, 5]])
    mask = jnp.array([[False, False, True, True, True]])
    want, _ = apply(params, cfg, ids, last_only=True)
    got, _ = apply(params, cfg, padded, mask=mask, last_only=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dropout_only_when_training():
    cfg = _cfg(dropout=0.5, input_dropout=0.3, encoding="embed")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 5), jnp.int32)
    a, _ = apply(params, cfg, ids)
    b, _ = apply(params, cfg, ids)
    c, _ = apply(params, cfg, ids, train=True, key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def _numpy_keep_mask(seed, shape, rate, time_axis, batch_axis, feature_axis):
    """keep_mask written out in numpy's uint32 arithmetic, one position at a time."""

    def fmix(h):
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))

    s0, s1 = (np.uint32(v) for v in seed)
    out = np.zeros(shape, bool)
    with np.errstate(over="ignore"):
        for pos in np.ndindex(*shape):
            t = np.uint32(0 if time_axis is None else pos[time_axis])
            f = np.uint32(0 if feature_axis is None else pos[feature_axis])
            row = t * np.uint32(shape[batch_axis]) + np.uint32(pos[batch_axis])
            h = fmix(row ^ s0)
            h = fmix(h ^ s1 ^ f * np.uint32(0x9E3779B9))
            out[pos] = fmix(h + s0) >= np.uint32(round(rate * 2**32))
    return out


@pytest.mark.parametrize(
    "shape, axes", [((4, 3, 5), (0, 1, 2)), ((5, 4, 3), (1, 2, 0)), ((3, 6), (None, 0, 1))]
)
def test_keep_mask_matches_a_numpy_reference(shape, axes):
    key = jax.random.PRNGKey(7)
    seed = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    want = _numpy_keep_mask(seed, shape, 0.3, *axes)
    np.testing.assert_array_equal(keep_mask(key, shape, 0.3, *axes), want)
    x = jax.random.normal(key, shape)
    np.testing.assert_allclose(dropout(x, key, 0.3, *axes), np.where(want, x / 0.7, 0.0))


def test_keep_mask_is_one_mask_in_every_layout():
    # what lets a fused layer take its input-kernel gradient from [H, T, B] without moving
    # the mask: [T, B, H], [B, T, H] and [H, T, B] draw the same value at the same position
    key, (t, b, h) = jax.random.PRNGKey(3), (7, 5, 16)
    time_major = keep_mask(key, (t, b, h), 0.4, 0, 1, 2)
    batch_major = keep_mask(key, (b, t, h), 0.4, 1, 0, 2)
    transposed = keep_mask(key, (h, t, b), 0.4, 1, 2, 0)
    np.testing.assert_array_equal(batch_major, time_major.transpose(1, 0, 2))
    np.testing.assert_array_equal(transposed, time_major.transpose(2, 0, 1))


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_keep_mask_draws_look_independent(rate):
    keep = 1 - rate
    shape = (100, 64, 256)  # the stacked model's second layer input
    a = np.asarray(keep_mask(jax.random.PRNGKey(0), shape, rate, 0, 1, 2))
    b = np.asarray(keep_mask(jax.random.PRNGKey(1), shape, rate, 0, 1, 2))
    assert abs(a.mean() - keep) < 0.002  # 1.6M draws: the mean's sd is ~4e-4
    agree = keep**2 + rate**2  # two independent draws are both kept or both dropped
    for x, y in (
        (a[:, :, 1:], a[:, :, :-1]),  # neighbouring units
        (a[:, 1:], a[:, :-1]),  # neighbouring rows of the batch
        (a[1:], a[:-1]),  # neighbouring timesteps
        (a, b),  # another key
    ):
        assert abs((x == y).mean() - agree) < 0.003
    rows = {r.tobytes() for r in a.reshape(-1, 256)}
    assert len(rows) == 6400  # no two [unit] rows repeat


def test_bfloat16_compute_stays_close():
    cfg = _cfg(encoding="embed")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 0, 11)
    full, _ = apply(params, cfg, ids)
    half, _ = apply(params, ModelConfig(**{**cfg.__dict__, "dtype": "bfloat16"}), ids)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, atol=0.05)


def test_bfloat16_products_accumulate_and_return_float32():
    # a weight gradient sums over batch x time rows; a bfloat16 result would keep 8 bits of
    # it (relative error ~2e-3 here), a float32 one the sum of the rounded operands
    a = jax.random.normal(jax.random.PRNGKey(0), (16, 4096)).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (4096, 32)).astype(jnp.bfloat16)
    want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    got = matmul(a, b, jnp.bfloat16)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


GPU = jax.default_backend() == "gpu"


@pytest.mark.parametrize("impl", ["fused", "auto", *(["cudnn"] if GPU else [])])
@pytest.mark.parametrize("encoding", ["scaled", "embed"])
@pytest.mark.parametrize("last_only", [True, False])
def test_fast_layers_match_the_scan_reference_in_values_and_gradients(impl, encoding, last_only):
    fused = _cfg(encoding=encoding, impl=impl, dropout=0.0)
    scan = _cfg(encoding=encoding, impl="scan", dropout=0.0)
    params = init_params(scan, jax.random.PRNGKey(3))
    ids = jax.random.randint(jax.random.PRNGKey(4), (5, 7), 0, 11)
    carry = jax.tree.map(lambda z: z + 0.1, init_carry(scan, 5))  # a non-zero start state

    def loss(p, cfg):
        logits, (c, h) = (
            apply(p, cfg, ids, carry, last_only=last_only)[0],
            apply(p, cfg, ids, carry)[1][-1],
        )
        return jnp.sum(jnp.sin(logits)) + jnp.sum(c * h)

    for p in (params, init_params(fused, jax.random.PRNGKey(3))):  # the same tree either way
        assert jax.tree.structure(p) == jax.tree.structure(params)
    with jax.default_matmul_precision("float32"):  # no TF32 on GPUs, for either side
        want, want_grad = jax.value_and_grad(loss)(params, scan)
        got, got_grad = jax.value_and_grad(loss)(params, fused)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("encoding", ["scaled", "embed"])
@pytest.mark.parametrize("last_only", [True, False])
def test_fast_layers_match_the_scan_reference_with_dropout(encoding, last_only):
    # training: the same key drops the same units on either path (the fused one time-major,
    # the upper layer's input-kernel gradient from its [H, T, B] copy), so the losses and
    # gradients agree
    cfg = _cfg(encoding=encoding, dropout=0.3, input_dropout=0.2 if encoding == "embed" else 0)
    scan = _cfg(**{**cfg.__dict__, "impl": "scan"})
    params = init_params(cfg, jax.random.PRNGKey(3))
    ids = jax.random.randint(jax.random.PRNGKey(4), (5, 7), 0, 11)

    def loss(p, cfg):
        logits = apply(p, cfg, ids, train=True, key=jax.random.PRNGKey(9), last_only=last_only)
        return jnp.sum(jnp.sin(logits[0]))

    want, want_grad = jax.value_and_grad(loss)(params, scan)
    got, got_grad = jax.value_and_grad(loss)(params, cfg)
    plain = loss(params, _cfg(**{**cfg.__dict__, "dropout": 0.0, "input_dropout": 0.0}))
    assert abs(float(want) - float(plain)) > 1e-3  # dropout did drop something
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


def _masks(cfg, shape, key):
    """The keep masks the model's dropper applies to ones of `shape` ([time, batch, F]) in
    training, with `cfg`'s locking."""

    def probe(module):
        return module._dropper(0.5, True)(jnp.ones(shape), 0, 1, 2) != 0

    return np.asarray(CharLSTM(cfg).apply({}, method=probe, rngs={"dropout": key}))


def test_locked_dropout_drops_the_same_features_at_every_timestep():
    shape, key = (6, 4, 32), jax.random.PRNGKey(2)
    locked = _masks(_cfg(dropout_locked=True), shape, key)
    for t in range(1, shape[0]):
        np.testing.assert_array_equal(locked[t], locked[0])
    assert not np.array_equal(locked[0, 0], locked[0, 1])  # each row its own mask
    assert 0.35 < locked.mean() < 0.65
    fresh = _masks(_cfg(), shape, key)  # unlocked: a new mask each timestep
    assert not np.array_equal(fresh[1], fresh[0])


def test_locked_dropout_trains_alike_on_the_fused_layers_and_the_scan_reference():
    # the fused path drops the upper layer's [H, T, B] copy of its input with the same
    # locked mask as the [T, B, H] input, so values and gradients agree with the scan
    cfg = _cfg(encoding="embed", dropout=0.3, input_dropout=0.2, dropout_locked=True)
    scan = _cfg(**{**cfg.__dict__, "impl": "scan"})
    params = init_params(cfg, jax.random.PRNGKey(3))
    ids = jax.random.randint(jax.random.PRNGKey(4), (5, 7), 0, 11)

    def loss(p, cfg):
        logits = apply(p, cfg, ids, train=True, key=jax.random.PRNGKey(9))[0]
        return jnp.sum(jnp.sin(logits))

    want, want_grad = jax.value_and_grad(loss)(params, scan)
    got, got_grad = jax.value_and_grad(loss)(params, cfg)
    unlocked = loss(params, _cfg(**{**cfg.__dict__, "dropout_locked": False}))
    assert abs(float(want) - float(unlocked)) > 1e-3  # the locked masks are other masks
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


def _spread_biases(params):
    """Each gate's biases spread from -5 to 5, so that hard-sigmoid gates run into both
    clips and their linear part."""
    out = dict(params)
    for name, layer in params.items():
        if name.startswith("lstm_"):
            hidden, width = layer["cell"]["recurrent_kernel"].shape
            out[name] = {
                **layer,
                "bias": jnp.tile(jnp.linspace(-5.0, 5.0, hidden), width // hidden),
            }
    return out


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("impl", ["fused", "scan"])
def test_hard_sigmoid_gates_equal_numpy_reference_and_step_loop(cell, impl):
    cfg = _cfg(cell=cell, impl=impl, gate_activation="hard_sigmoid")
    params = _spread_biases(init_params(cfg, jax.random.PRNGKey(1)))
    ids = jax.random.randint(jax.random.PRNGKey(2), (4, 9), 0, 11)
    logits, _ = _matches_reference_and_step_loop(params, cfg, ids)
    soft = lstm_forward(params, ModelConfig(**{**cfg.__dict__, "gate_activation": "sigmoid"}), ids)
    assert np.abs(logits - soft).max() > 1e-2  # the option changes the model


@pytest.mark.parametrize("encoding", ["scaled", "embed"])
def test_hard_sigmoid_fused_gradients_match_the_scan_reference(encoding):
    fused = _cfg(encoding=encoding, dropout=0.0, gate_activation="hard_sigmoid")
    scan = ModelConfig(**{**fused.__dict__, "impl": "scan"})
    params = _spread_biases(init_params(scan, jax.random.PRNGKey(3)))
    ids = jax.random.randint(jax.random.PRNGKey(4), (5, 7), 0, 11)

    def loss(p, cfg):
        logits, ((c, h), _) = apply(p, cfg, ids)
        return jnp.sum(jnp.sin(logits)) + jnp.sum(c * h)

    want, want_grad = jax.value_and_grad(loss)(params, scan)
    got, got_grad = jax.value_and_grad(loss)(params, fused)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)
    # the clipped gates pass no gradient: those bias entries get exactly zero
    for name in ("lstm_0", "lstm_1"):
        b = np.asarray(got_grad[name]["bias"])
        assert (b == 0).any() and (b != 0).any()


@pytest.mark.parametrize("in_dim", [1, 6])
def test_cudnn_weight_packing_matches_jax_reference_lstm(in_dim):
    # cuDNN itself needs a GPU; its weight layout is checked here against
    # jax.experimental.rnn's own unpacking and reference LSTM, which run anywhere
    from jax.experimental import rnn

    from jaxchar.lstm import LayerSpec, LSTMLayer
    from jaxchar.lstm.cudnn import pack_weights

    hidden, batch, steps = 5, 3, 4
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    x = jax.random.normal(keys[0], (batch, steps, in_dim))
    carry = (
        jax.random.normal(keys[1], (batch, hidden)),
        jax.random.normal(keys[2], (batch, hidden)),
    )
    layer = LSTMLayer(LayerSpec(hidden))  # the default choice: the scan reference
    variables = layer.init(keys[3], carry, x)
    p = variables["params"]
    p = {**p, "bias": jax.random.normal(keys[3], p["bias"].shape)}  # not just 0s and 1s
    (c, h), hs = layer.apply({"params": p}, carry, x)
    packed = pack_weights(p["input_kernel"], p["cell"]["recurrent_kernel"], p["bias"])
    assert packed.shape == (rnn.get_num_params_in_lstm(in_dim, hidden, 1, False),)
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(packed, in_dim, hidden, 1, False)
    ref_hs, ref_h, ref_c = rnn.lstm_ref(
        x, carry[1][None], carry[0][None], w_ih, w_hh, b_ih, b_hh,
        jnp.full((batch,), steps, jnp.int32), in_dim, hidden, 1, 0.0, False,
    )  # fmt: skip
    np.testing.assert_allclose(hs, ref_hs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, ref_h[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, ref_c[0], rtol=1e-5, atol=1e-6)


def test_the_embedding_keeps_nn_embeds_parameters_and_its_gradient_is_deterministic():
    import flax.linen as nn

    from jaxchar.model import Embed, embed_lookup

    ids = jax.random.randint(jax.random.PRNGKey(1), (6, 11), 0, 9)
    ours = Embed(9, 5).init(jax.random.PRNGKey(0), ids)["params"]["embedding"]
    flax_own = nn.Embed(9, 5).init(jax.random.PRNGKey(0), ids)["params"]["embedding"]
    np.testing.assert_array_equal(ours, flax_own)  # same seed, same model as before

    def loss(lookup, table):
        return jnp.sum(jnp.sin(lookup(table)) * jnp.arange(5.0))

    np.testing.assert_array_equal(embed_lookup(9, ours, ids), jnp.take(ours, ids, axis=0))
    want = jax.grad(loss, argnums=1)(lambda t: jnp.take(t, ids, axis=0), ours)  # scatter-add
    got = jax.grad(loss, argnums=1)(lambda t: embed_lookup(9, t, ids), ours)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # under jit (the product XLA compiles), twice: the same bits
    step = jax.jit(jax.grad(lambda t: loss(lambda u: embed_lookup(9, u, ids), t)))
    np.testing.assert_array_equal(step(ours), step(ours))
