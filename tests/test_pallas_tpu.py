"""The Pallas training kernels for TPUs (jaxchar/lstm/pallas/tpu.py) against the lax.scan
loops they stand in for, interpreted on this CPU: the recurrences alone in Pallas's TPU
interpreter, races checked (several row blocks and time chunks, both gate functions,
float32 and bfloat16 products), then the fused layer through them, in Pallas's generic
interpreter as its CPU branch runs them, on every shipped config's layer shapes (values,
final state and gradients, under jit, vmap and grad; the same bits twice). No TPU has run them:
the lowering tests show that a module lowered for TPUs holds them, with their names, where
the `pallas` backend is forced and nowhere else."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    REPO,
    assert_recurrences_match_the_scan,
    lstm_layer_args,
    shipped_configs,
)
from jax import export
from jax.experimental.pallas import tpu as pltpu

from jaxchar.config import ModelConfig, load_config
from jaxchar.lstm import fused, pallas, select
from jaxchar.lstm.pallas import tpu
from jaxchar.model import apply, init_params

SHIPPED = shipped_configs()  # the default in the quick loop; all in the whole suite
VOCAB = 45
# The interpreter runs the kernels' own float32 operations in the scan's order, so the
# values agree to the last bits (they matched exactly when written); the tolerances are the
# GPU kernels' (tests/test_pallas.py), for products summed in another order.
TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
    "kind, dtype, interpret",
    [
        ("sigmoid", jnp.float32, "tpu"),
        ("hard_sigmoid", jnp.float32, "tpu"),
        ("sigmoid", jnp.bfloat16, "tpu"),
        ("hard_sigmoid", jnp.bfloat16, "generic"),
    ],
)
def test_recurrences_match_the_scan_loops_over_row_blocks_and_time_chunks(
    kind, dtype, interpret, monkeypatch
):
    # 130 rows: two row blocks of 128 (the second padded); a budget that fits 2 of 12 steps
    hidden, batch, steps = 128, 130, 12
    monkeypatch.setattr(tpu, "BLOCK_BUDGET", 2 * (2 * 12 * 128 * hidden * 4))
    assert tpu.plan(steps, batch, hidden) == (128, 2, 2)
    args = lstm_layer_args(hidden, batch, steps)
    # the TPU interpreter (VMEM, the block copies, the grid's order; races checked) or
    # Pallas's generic one, which the fused layer's CPU branch runs
    mode = pltpu.InterpretParams(detect_races=True) if interpret == "tpu" else True
    # bfloat16: the same rounded operands; an operand that lands on the other side of a
    # rounding boundary moves a product by 2^-8 (the GPU kernels' tolerance)
    tol = TOL if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_recurrences_match_the_scan(
        tpu.forward, tpu.backward, args, kind=kind, dtype=dtype, tol=tol, interpret=mode
    )


@pytest.mark.parametrize(
    "steps, batch, hidden", [(100, 32, 256), (100, 128, 256), (200, 32, 256), (100, 128, 768)]
)
def test_the_plan_fits_the_vmem_budget_and_divides_the_sequence(steps, batch, hidden):
    rows, blocks, chunk = tpu.plan(steps, batch, hidden)
    assert rows % tpu.SUBLANES == 0 and rows <= tpu.MAX_ROWS and rows * blocks >= batch
    assert steps % chunk == 0
    assert chunk == 1 or 2 * 12 * rows * hidden * 4 * chunk <= tpu.BLOCK_BUDGET
    # every TPU since v4 has at least 32 MiB of VMEM per core (v5e and v6e: 128 MiB)
    assert tpu._vmem_limit(rows, hidden, chunk, jnp.float32) <= 32 * 2**20


def _layer_shapes():
    """(config, layer index, input features (0: the tutorial's scalar), hidden, sequence
    length, gates) for every distinct layer shape of the shipped configs the TPU kernels
    fit (a layer shaped as an earlier config's is that config's test)."""
    shapes, seen = [], set()
    for param in SHIPPED:
        name = getattr(param, "values", [param])[0]
        marks = getattr(param, "marks", ())
        model = load_config(REPO / "configs" / f"{name}.toml")
        m = model.model
        first = {"scaled": 0, "onehot": VOCAB, "embed": m.embed_dim}[m.encoding]
        for layer in range(m.layers):
            features = first if layer == 0 else m.hidden
            shape = (name, layer, features, m.hidden, model.data.seq_length, m.gate_activation)
            if shape[2:] in seen:
                continue
            seen.add(shape[2:])
            ok = tpu.supports(m.hidden, jnp.float32)[0]
            marks_here = [*marks] if ok else [*marks, pytest.mark.skip(reason="hidden % 128")]
            shapes.append(pytest.param(*shape, marks=marks_here, id=f"{name}-{layer}"))
    return shapes


def _interpreted(f, *args) -> list[str]:
    """The names of the Pallas kernels f's program interprets on this CPU: its jaxpr holds a
    branch per platform (the CUDA and TPU ones compiled, the CPU's interpreted)."""
    text = str(jax.make_jaxpr(f, static_argnums=0)(*args))
    calls = text.split("pallas_call[")[1:]
    return [
        re.search(r"name=(\w+)", call).group(1)
        for call in calls
        if re.search(r"interpret=(\w+)", call).group(1) != "False"
    ]


def _through(loop: fused.Loop, w_h, xs, c0, h0, w_in, bias):
    hs, c, h = fused.lstm_layer(w_h, xs, c0, h0, w_in, bias, None, loop)
    return hs, c, h


@pytest.mark.parametrize("name, layer, features, hidden, steps, kind", _layer_shapes())
def test_the_fused_layer_through_the_tpu_kernels_matches_the_scan_loops(
    name, layer, features, hidden, steps, kind
):
    # 3 rows (one row block, padded); values, final state and every gradient, under jit
    # and grad; then vmap over 2 maps of the rows (folded into one call); then the bits again
    k = iter(jax.random.split(jax.random.PRNGKey(layer), 8))
    w_h = 0.1 * jax.random.normal(next(k), (hidden, 4 * hidden))
    bias = 0.1 * jax.random.normal(next(k), (4 * hidden,))
    if features:  # vectors: projected before the loop
        xs = jax.random.normal(next(k), (steps, 3, features))
        w_in = 0.1 * jax.random.normal(next(k), (features, 4 * hidden))
    else:  # the tutorial's scalar input
        xs = jax.random.uniform(next(k), (steps, 3))
        w_in = 0.1 * jax.random.normal(next(k), (4 * hidden,))
    c0 = 0.5 * jax.random.normal(next(k), (3, hidden))
    h0 = 0.5 * jax.random.normal(next(k), (3, hidden))
    kernels = fused.Loop(gate_activation=kind, kernel="pallas", interprets="tpu")
    loops = fused.Loop(gate_activation=kind)

    def loss(loop, w_h, xs, c0, h0, w_in, bias):
        hs, c, h = _through(loop, w_h, xs, c0, h0, w_in, bias)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(c * c) + jnp.sum(h), (hs, c, h)

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5, 6), has_aux=True)
    grad = jax.jit(grad, static_argnums=0)
    args = w_h, xs, c0, h0, w_in, bias
    want_names = ["jaxchar_lstm_backward_pallas_tpu", "jaxchar_lstm_forward_pallas_tpu"]
    assert sorted(_interpreted(grad, kernels, *args)) == want_names
    (got, got_out), got_grad = grad(kernels, *args)
    (want, want_out), want_grad = grad(loops, *args)
    np.testing.assert_allclose(got, want, **TOL)
    for g, w in zip(jax.tree.leaves(got_out), jax.tree.leaves(want_out), strict=True):
        np.testing.assert_allclose(g, w, **TOL)
    for g, w in zip(got_grad, want_grad, strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)
    (again, _), again_grad = grad(kernels, *args)
    assert np.array_equal(again, got)
    assert all(np.array_equal(a, b) for a, b in zip(again_grad, got_grad, strict=True))

    two = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), (xs, c0, h0))  # 2 maps of 3 rows

    def outputs(loop, xs, c0, h0):
        return _through(loop, w_h, xs, c0, h0, w_in, bias)

    mapped = jax.jit(jax.vmap(outputs, in_axes=(None, 0, 0, 0)), static_argnums=0)
    assert _interpreted(mapped, kernels, *two) == want_names[1:]  # one call for both maps
    for g, w in zip(mapped(kernels, *two), mapped(loops, *two), strict=True):
        np.testing.assert_allclose(g, w, **TOL)


def test_the_selector_runs_the_tpu_kernels_when_forced_and_where_they_fit():
    cfg = ModelConfig(vocab_size=VOCAB, hidden=256)
    assert select(cfg, "layer", platform="tpu").backend == "fused"  # auto: never measured
    forced = dataclasses.replace(cfg, impl="pallas")
    choice = select(forced, "layer", platform="tpu")
    assert choice.backend == "pallas" and "TPU" in choice.reason
    narrow = dataclasses.replace(forced, hidden=48)  # the GPU kernels' 16 fits, not 128
    choice = select(narrow, "layer", platform="tpu")
    assert choice.backend == "fused" and "hidden % 128" in choice.reason
    assert select(narrow, "layer", platform="gpu").backend == "pallas"
    sampler = select(forced, "sample", platform="tpu")  # no sampling kernel for TPUs
    assert sampler.backend == "scan" and "TPU" in sampler.reason


def _tpu_module(cfg, batch, steps, last_only) -> str:
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.zeros((batch, steps), jnp.int32)

    def loss(p):
        logits, _ = apply(p, cfg, ids, last_only=last_only)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    grad = jax.jit(jax.value_and_grad(loss))
    return export.export(grad, platforms=["tpu"])(params).mlir_module()


@pytest.mark.parametrize("name", ["small", "shakespeare"])
def test_the_tpu_module_holds_one_mosaic_kernel_each_way_per_layer(name):
    # lowered for TPUs from this CPU (Pallas builds the Mosaic module in Python; a TPU's
    # compiler takes it from there): the kernels of the config's real batch, by name
    full = load_config(REPO / "configs" / f"{name}.toml")
    cfg = dataclasses.replace(full.model, vocab_size=VOCAB, impl="pallas")
    batch, steps = full.train.batch_size, full.data.seq_length
    text = _tpu_module(cfg, batch, steps, full.data.objective == "window")
    names = re.findall(r'custom_call @tpu_custom_call.*?kernel_name = "(\w+)"', text)
    want = ["jaxchar_lstm_backward_pallas_tpu", "jaxchar_lstm_forward_pallas_tpu"]
    assert sorted(names) == sorted(want * cfg.layers), names
    rows, blocks, chunk = tpu.plan(steps, batch, cfg.hidden)
    assert f"tensor<{steps}x{rows * blocks}x{4 * cfg.hidden}xf32>" in text
    auto = dataclasses.replace(cfg, impl="auto")
    assert "tpu_custom_call" not in _tpu_module(auto, batch, steps, False)


def test_a_layer_the_tpu_kernels_do_not_fit_lowers_to_the_scan_on_tpus():
    # forced pallas, hidden 48: the GPU kernels take it, so the CPU's choice is pallas, but
    # the module's TPU branch is the lax.scan loop
    cfg = ModelConfig(vocab_size=VOCAB, hidden=48, encoding="embed", impl="pallas")
    assert pallas.supports(48, jnp.float32)[0] and not tpu.supports(48, jnp.float32)[0]
    text = _tpu_module(cfg, 4, 6, False)
    assert "tpu_custom_call" not in text and "stablehlo.while" in text
