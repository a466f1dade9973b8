"""The C++ training recurrences (jaxchar/csrc/lstm_train.h) against the lax.scan loops of
jaxchar/lstm/fused.py that they stand in for, and the model trained through them against the
nn.scan reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchar.config import ModelConfig
from jaxchar.lstm import fused, native
from jaxchar.model import apply, init_carry, init_params

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"no C++ kernel variant loaded: {native.variant()[1]}"
)


def _layer(scalar: bool, hidden=128, batch=13, steps=5, features=24, seed=0):
    """A layer's arguments: strong enough weights that the gates leave their linear middle,
    biases spread over both clips of a hard sigmoid, a non-zero start state."""
    k = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    w_h = 0.3 * jax.random.normal(next(k), (hidden, 4 * hidden))
    if scalar:
        xs = jax.random.uniform(next(k), (steps, batch))
        w_in = 3 * jax.random.normal(next(k), (4 * hidden,))
    else:
        xs = jax.random.normal(next(k), (steps, batch, features))
        w_in = 0.5 * jax.random.normal(next(k), (features, 4 * hidden))
    bias = jnp.tile(jnp.linspace(-5.0, 5.0, hidden), 4)
    c0 = jax.random.normal(next(k), (batch, hidden))
    h0 = 0.5 * jax.random.normal(next(k), (batch, hidden))
    return w_h, xs, c0, h0, w_in, bias


@pytest.mark.parametrize("scalar", [True, False], ids=["scalar", "vector"])
@pytest.mark.parametrize("kind", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_recurrences_match_the_scan_loops(scalar, kind, threads):
    # 13 rows: two 6-row blocks and a 1-row remainder; 4 threads: 32 units each, so a tile of
    # 64 columns spans two gates
    w_h, xs, c0, h0, w_in, bias = _layer(scalar)
    if scalar:
        want = fused._scan_forward(w_h, xs, c0, h0, w_in, bias, jnp.float32, kind)
    else:  # the kernel takes vector inputs projected, and adds the bias itself
        xs, w_in = fused.matmul(xs, w_in), None
        want = fused._scan_forward(w_h, xs + bias, c0, h0, None, None, jnp.float32, kind)
    (want_hs, want_c, want_h), (want_acts, want_cs) = want
    hs, acts, cs, h_prev_fm, hs_fm = native.layer_forward(
        w_h, xs, c0, h0, w_in, bias, kind, threads, hs_fm=True
    )
    np.testing.assert_array_equal(hs_fm, np.asarray(hs).transpose(2, 0, 1))
    for got, want in ((hs, want_hs), (acts, want_acts), (cs, want_cs)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    h_prev = np.concatenate([np.asarray(h0)[None], np.asarray(hs)[:-1]])  # [T, B, H]
    extra = [np.asarray(xs)[None]] if scalar else []  # then the scalar features, then ones
    want_fm = np.concatenate([h_prev.transpose(2, 0, 1), *extra, np.ones((1, *xs.shape[:2]))])
    np.testing.assert_array_equal(h_prev_fm, want_fm)
    np.testing.assert_allclose(cs[-1], want_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hs[-1], want_h, rtol=1e-5, atol=1e-5)

    k = iter(jax.random.split(jax.random.PRNGKey(9), 3))
    d_hs = jax.random.normal(next(k), hs.shape)
    d_c, d_h = jax.random.normal(next(k), c0.shape), jax.random.normal(next(k), h0.shape)
    want = fused._scan_backward(w_h, acts, cs, c0, d_hs, d_c, d_h, jnp.float32, kind)
    got = native.layer_backward(w_h, acts, cs, c0, d_hs, d_c, d_h, kind, threads)
    for g, w, name in zip(got, want, ["dz", "dc0", "dh0"], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
    if kind == "hard_sigmoid":  # a clipped gate (output 0 or 1) passes no gradient
        a, dz = np.asarray(acts), np.asarray(got[0])
        hidden = a.shape[-1] // 4
        gates = np.r_[0 : 2 * hidden, 3 * hidden : 4 * hidden]  # i, f, o (not g: tanh)
        clipped = (a[..., gates] <= 0) | (a[..., gates] >= 1)
        assert clipped.any() and (~clipped).any()  # the data reach both sides of the clip
        assert (dz[..., gates][clipped] == 0).all()
        assert (dz[..., gates][~clipped] != 0).mean() > 0.5


def _cfg(**kw):
    # forced: the kernels run wherever a variant is loaded (auto's choice is test_backends's)
    base = dict(vocab_size=11, layers=2, hidden=64, dropout=0.0, embed_dim=5, impl="native")
    return ModelConfig(**{**base, **kw})


def _loss(params, cfg, ids, carry):
    logits, ((c, h), _) = apply(params, cfg, ids, carry)
    return jnp.sum(jnp.sin(logits)) + jnp.sum(c * h)


@pytest.mark.parametrize("encoding", ["scaled", "embed"])
@pytest.mark.parametrize("gates", ["sigmoid", "hard_sigmoid"])
def test_model_through_the_kernels_matches_the_scan_reference(encoding, gates):
    cfg = _cfg(encoding=encoding, gate_activation=gates)
    scan = dataclasses.replace(cfg, impl="scan")
    params = init_params(cfg, jax.random.PRNGKey(3))
    ids = jax.random.randint(jax.random.PRNGKey(4), (7, 9), 0, 11)
    carry = jax.tree.map(lambda z: z + 0.1, init_carry(cfg, 7))
    grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)
    assert "jaxchar_lstm_backward" in grad.lower(params, cfg, ids, carry).as_text()
    got, got_grad = grad(params, cfg, ids, carry)
    want, want_grad = grad(params, scan, ids, carry)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


def test_kernels_run_on_the_cpu_only_where_they_apply():
    ids = jnp.zeros((3, 5), jnp.int32)

    def lowered(cfg):
        params = init_params(cfg, jax.random.PRNGKey(0))
        loss = jax.value_and_grad(lambda p: _loss(p, cfg, ids, None))
        return jax.jit(loss).lower(params).as_text()

    text = lowered(_cfg())
    assert text.count("jaxchar_lstm_forward") >= 2 and "jaxchar_lstm_backward" in text
    for cfg in (
        _cfg(impl="scan"),  # the reference
        _cfg(hidden=32),  # not a multiple of 64
        _cfg(dtype="bfloat16"),  # XLA's bfloat16 products
        _cfg(cell="gru"),
    ):
        assert "jaxchar_lstm" not in lowered(cfg), cfg


@pytest.fixture
def other_platform(monkeypatch):
    """lax.platform_dependent takes its default branch, as on a platform without the kernels.
    The layer's loops are jitted on their own (one compiled loop per shape), so a loop an
    earlier test traced with the real switch would be reused: trace afresh, and leave no
    loop traced with this one behind."""
    jax.clear_caches()
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *a, cpu, default: default(*a))
    yield
    jax.clear_caches()


def test_the_path_for_other_platforms_matches_too(other_platform):
    # where the kernels are built but the step runs elsewhere (a GPU), lax.platform_dependent
    # takes the scan loops, which must hand the backward pass the same residuals
    cfg = _cfg(encoding="embed")
    params = init_params(cfg, jax.random.PRNGKey(3))
    ids = jax.random.randint(jax.random.PRNGKey(4), (7, 9), 0, 11)
    carry = jax.tree.map(lambda z: z + 0.1, init_carry(cfg, 7))
    grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)
    assert "jaxchar_lstm" not in grad.lower(params, cfg, ids, carry).as_text()
    got, got_grad = grad(params, cfg, ids, carry)
    want, want_grad = grad(params, dataclasses.replace(cfg, impl="scan"), ids, carry)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("platform", ["cpu", "other"])
def test_training_with_dropout_between_the_layers_matches_the_scan(platform, request):
    # the lower layer hands the upper one its outputs as [H, T, B] (the kernel writes them;
    # elsewhere XLA transposes), dropped by the same mask: the input-kernel gradient from
    # them must equal the reference's
    if platform == "other":
        request.getfixturevalue("other_platform")
    cfg = _cfg(encoding="embed", layers=3, dropout=0.3)
    params = init_params(cfg, jax.random.PRNGKey(3))
    ids = jax.random.randint(jax.random.PRNGKey(4), (7, 9), 0, 11)

    def loss(p, cfg):
        logits = apply(p, cfg, ids, train=True, key=jax.random.PRNGKey(5))[0]
        return jnp.sum(jnp.sin(logits))

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    text = grad.lower(params, cfg).compile().as_text()
    calls = [line for line in text.splitlines() if "jaxchar_lstm_forward" in line]
    assert len(calls) == (3 if platform == "cpu" else 0)
    assert sum("f32[64,9,7]" in line and "f32[64,0,7]" not in line for line in calls) == (
        2 if platform == "cpu" else 0
    )  # the two lower layers write hs_fm
    got, got_grad = grad(params, cfg)
    want, want_grad = grad(params, dataclasses.replace(cfg, impl="scan"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


def test_a_training_step_lowered_for_gpus_leaves_the_kernels_out():
    # lowering for CUDA needs no GPU: the step must take the scan loops there
    cfg = _cfg(encoding="embed")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.zeros((4, 9), jnp.int32)
    grad = jax.jit(jax.value_and_grad(lambda p: _loss(p, cfg, ids, None)))
    text = jax.export.export(grad, platforms=["cuda"])(params).mlir_module()
    assert "jaxchar_lstm" not in text and "stablehlo.while" in text
