"""The Pallas training kernels (jaxchar/lstm/pallas/layer.py) against the lax.scan loops they stand
in for and the model through them against the nn.scan reference, on every shipped config's
shapes. On a CPU they run in Pallas's interpreter with one program per row block; the split
over unit groups and the grid barrier run on a GPU only, where benchmarks/gpu_check.sh runs
this file (and the comparisons with the reference) before timing them. The lowering tests
show the kernels in the CUDA module where they are chosen and nowhere else."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    REPO,
    assert_recurrences_match_the_scan,
    lowered_for_a_hopper_gpu,
    lstm_layer_args,
    shipped_configs,
)

from jaxchar.config import DEFAULT_CONFIG, ModelConfig, load_config
from jaxchar.lstm import BackendError, pallas, select
from jaxchar.model import apply, init_carry, init_params

# the default in the quick loop; the others in the whole suite, each model shape once
SHIPPED = shipped_configs(distinct_models=True)
VOCAB = 45
GPU = jax.default_backend() == "gpu"
INTERPRET = not GPU
# float32 values: the same products in another order (and TF32 on a GPU, where XLA's own
# products use it too); gradients pass through T steps of them
TOL = dict(rtol=1e-5, atol=1e-5) if not GPU else dict(rtol=2e-3, atol=2e-3)
GRAD_TOL = dict(rtol=2e-4, atol=2e-5) if not GPU else dict(rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("kind", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("hidden", [32, 48])  # 48: contractions in 16-wide pieces
def test_recurrences_match_the_scan_loops(kind, dtype, hidden):
    # 20 rows, so the last row block is padded
    args = lstm_layer_args(hidden, batch=20, steps=7)
    # bfloat16: the same rounded operands, float32 sums in another order; an h that lands
    # on the other side of a rounding boundary moves the next step's product by 2^-8
    tol = TOL if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_recurrences_match_the_scan(
        pallas.forward, pallas.backward, args, kind=kind, dtype=dtype, tol=tol, interpret=INTERPRET
    )


def test_the_chunks_of_a_contraction_are_powers_of_two():
    # Triton's tensors have power-of-two shapes: hidden 384 is contracted in 128-wide pieces
    assert [pallas.piece_width(n) for n in (32, 48, 256, 384, 1024)] == [32, 16, 128, 128, 128]


def _model(name: str, **kw) -> tuple[ModelConfig, object]:
    full = load_config(REPO / "configs" / f"{name}.toml")
    cfg = dataclasses.replace(
        full.model, vocab_size=VOCAB, dropout=0.0, input_dropout=0.0, impl="pallas", **kw
    )
    return cfg, full


def _kernels(f, *args, static=()) -> tuple[int, int]:
    """How many forward and backward kernels f's program runs on this platform: its jaxpr
    holds a branch per platform (compiled for CUDA, interpreted for CPUs), and the
    interpreter leaves no named call in a CPU module to count."""
    text = str(jax.make_jaxpr(f, static_argnums=static)(*args))
    names = []
    for call in text.split("pallas_call[")[1:]:
        if re.search(r"interpret=(\w+)", call).group(1) == str(INTERPRET):
            names.append(re.search(r"name=(\w+)", call).group(1))
    return names.count("jaxchar_lstm_forward_pallas"), names.count("jaxchar_lstm_backward_pallas")


def _loss(params, cfg, ids, last_only, carry=None):
    logits, carries = apply(params, cfg, ids, carry, last_only=last_only)
    c, h = carries[-1]  # the top layer's final state
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]) + jnp.mean(c * h)


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != DEFAULT_CONFIG])
def test_the_model_through_the_kernels_matches_the_reference_on_every_shipped_config(name):
    # the config's hidden size, layers, encoding, gates and sequence length; 3 rows (the
    # default config: its full batch, in the next test)
    cfg, full = _model(name)
    assert select(cfg, "layer", platform="cpu").backend == "pallas"
    params = init_params(cfg, jax.random.PRNGKey(7))
    ids = jax.random.randint(jax.random.PRNGKey(8), (3, full.data.seq_length), 0, VOCAB)
    carry = jax.tree.map(lambda z: z + 0.1, init_carry(cfg, 3))
    last_only = full.data.objective == "window"
    args = params, cfg, ids, last_only, carry
    assert _kernels(jax.value_and_grad(_loss), *args, static=(1, 3)) == (cfg.layers,) * 2
    grad = jax.jit(jax.value_and_grad(_loss), static_argnums=(1, 3))
    got, got_grad = grad(params, cfg, ids, last_only, carry)
    want, want_grad = grad(params, dataclasses.replace(cfg, impl="scan"), ids, last_only, carry)
    np.testing.assert_allclose(got, want, **TOL)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)


def test_the_default_configs_full_batch_matches_the_reference_and_repeats_bit_for_bit():
    # the default config: its batch (fast: 4 rows, one row block, padded; several blocks:
    # the tests above), its sequence length, its layers and units (fast: 2 x 384,
    # contracted in three 128-wide pieces), from a non-zero state, as users train it
    cfg, full = _model(DEFAULT_CONFIG)
    assert select(cfg, "layer", platform="cpu").backend == "pallas"
    params = init_params(cfg, jax.random.PRNGKey(1))
    rows, steps = full.train.batch_size, full.data.seq_length
    ids = jax.random.randint(jax.random.PRNGKey(2), (rows, steps), 0, VOCAB)
    carry = jax.tree.map(lambda z: z + 0.1, init_carry(cfg, rows))
    last_only = full.data.objective == "window"
    args = params, cfg, ids, last_only, carry
    assert _kernels(jax.value_and_grad(_loss), *args, static=(1, 3)) == (cfg.layers,) * 2
    grad = jax.jit(jax.value_and_grad(_loss), static_argnums=(1, 3))
    got, got_grad = grad(*args)
    again, again_grad = grad(*args)
    assert np.array_equal(got, again)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(again_grad), strict=True):
        assert np.array_equal(a, b)
    want, want_grad = grad(params, dataclasses.replace(cfg, impl="scan"), ids, last_only, carry)
    np.testing.assert_allclose(got, want, **TOL)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)


def test_under_vmap_the_rows_fold_into_one_call_and_mapped_weights_take_the_scan():
    cfg, _ = _model("tiny")
    scan = dataclasses.replace(cfg, impl="scan")
    params = init_params(cfg, jax.random.PRNGKey(3))
    ids = jax.random.randint(jax.random.PRNGKey(4), (3, 5, 12), 0, VOCAB)  # 3 maps of 5 rows

    def logits(p, c, i):
        return apply(p, c, i)[0]

    mapped = jax.vmap(logits, in_axes=(None, None, 0))
    assert _kernels(mapped, params, cfg, ids, static=(1,)) == (1, 0)  # one call, 15 rows
    over_ids = jax.jit(mapped, static_argnums=1)
    np.testing.assert_allclose(over_ids(params, cfg, ids), over_ids(params, scan, ids), **TOL)
    many = jax.tree.map(lambda w: jnp.stack([w, 1.5 * w, -w]), params)
    mapped = jax.vmap(logits, in_axes=(0, None, 0))
    assert _kernels(mapped, many, cfg, ids, static=(1,)) == (0, 0)
    over_params = jax.jit(mapped, static_argnums=1)
    np.testing.assert_allclose(over_params(many, cfg, ids), over_params(many, scan, ids), **TOL)


def test_the_selector_runs_pallas_only_when_forced_and_where_it_can():
    cfg = ModelConfig(vocab_size=VOCAB, hidden=256)
    for platform in ("cpu", "gpu", "tpu"):  # auto has no measurement that picks it
        assert select(cfg, "layer", platform=platform).backend != "pallas"
    forced = dataclasses.replace(cfg, impl="pallas")
    assert select(forced, "layer", platform="gpu").backend == "pallas"
    assert "interpreter" in select(forced, "layer", platform="cpu").reason
    assert select(forced, "sample", platform="gpu").backend == "pallas"  # its sampling loop
    odd = dataclasses.replace(forced, hidden=40)
    choice = select(odd, "layer", platform="gpu")
    assert choice.backend == "fused" and "hidden % 16" in choice.reason
    assert select(forced, "layer", platform="tpu").backend == "pallas"  # pallas/tpu.py
    with pytest.raises(BackendError, match="pallas.*metal"):
        select(forced, "layer", platform="metal")
    assert select(dataclasses.replace(forced, cell="gru"), "layer", platform="gpu").backend == (
        "scan"
    )


@pytest.mark.parametrize("name", ["small", "shakespeare"])
def test_the_cuda_module_holds_one_triton_kernel_each_way_per_layer(name):
    # lowered for CUDA from this CPU: the kernels with their real grids, and no CPU kernel
    from jax import export

    cfg, full = _model(name)
    params = init_params(cfg, jax.random.PRNGKey(0))
    batch = full.train.batch_size
    ids = jnp.zeros((batch, full.data.seq_length), jnp.int32)
    last_only = full.data.objective == "window"
    grad = jax.jit(jax.value_and_grad(lambda p: _loss(p, cfg, ids, last_only)))
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    text = lowered_for_a_hopper_gpu(
        export.export(grad, platforms=["cuda"], disabled_checks=[triton]), params
    )
    calls = [line for line in text.splitlines() if "custom_call @__gpu$xla.gpu.triton" in line]
    names = [re.search(r'name = "(\w+)"', line).group(1) for line in calls]
    want = ["jaxchar_lstm_backward_pallas", "jaxchar_lstm_forward_pallas"]
    assert sorted(names) == sorted(want * cfg.layers), names
    groups, blocks = cfg.hidden // pallas.UNITS, -(-batch // pallas.ROWS)
    assert set(re.findall(r"grid_x = (\d+)", text)) == {str(groups)}
    assert set(re.findall(r"grid_y = (\d+)", text)) == {str(blocks)}
    assert 'jaxchar_lstm_forward"' not in text and "jaxchar_generate" not in text
    auto = dataclasses.replace(cfg, impl="auto")
    plain = jax.jit(jax.value_and_grad(lambda p: _loss(p, auto, ids, last_only)))
    assert "xla.gpu.triton" not in export.export(plain, platforms=["cuda"])(params).mlir_module()
