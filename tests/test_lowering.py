"""Ready for the accelerators without one: every shipped config's jitted train step (its
steps_per_call scan), evaluation and sampler (both modes) lower for CUDA and TPU from this
CPU with jax.export, and the lowered modules hold nothing that only a CPU can run."""

import re

import jax
import jax.numpy as jnp
import pytest
from conftest import shipped_configs
from jax import export

from jaxchar import data
from jaxchar.config import load_config, override
from jaxchar.sampling import sample
from jaxchar.train import (
    _evaluate_jit,
    create_state,
    make_optimizer,
    run_steps,
    with_vocab,
    zero_totals,
)

SHIPPED = shipped_configs()  # the default in the quick loop; all in the whole suite
ACCELERATORS = ["cuda", "tpu"]
CPU_ONLY = re.compile(r"custom_call @(jaxchar_\w+)")  # the C++ kernels' FFI targets


def _cfg(name):
    return with_vocab(load_config(name), 60)


def _module(fn, *args, platforms=ACCELERATORS, **kw) -> str:
    return export.export(jax.jit(fn), platforms=platforms, **kw)(*args).mlir_module()


def _accelerator_safe(text: str) -> None:
    assert not CPU_ONLY.findall(text), "a CPU-only kernel in an accelerator module"
    assert "callback" not in text, "a host callback"
    assert "f64" not in text, "float64"


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    cfg = _cfg(request.param)
    tx = make_optimizer(cfg.train, 100)
    state = create_state(cfg, tx, jax.random.PRNGKey(0))
    ids = jnp.zeros((50_000,), jnp.uint8)
    spans = None
    if data.objective(cfg).needs_spans:
        spans = jnp.array([[i * 50, i * 50 + 40] for i in range(200)], jnp.int32)
    return cfg, tx, state, ids, spans


def test_the_train_step_lowers_for_cuda_and_tpu(shipped):
    cfg, tx, state, ids, spans = shipped

    def steps(state, totals, ids, spans):
        n = cfg.train.steps_per_call
        return run_steps(state, totals, ids, 0, 0, spans, cfg=cfg, tx=tx, n=n)

    text = _module(steps, state, zero_totals(), ids, spans)
    _accelerator_safe(text)
    assert "stablehlo.while" in text  # the steps_per_call scan


def test_evaluation_lowers_for_cuda_and_tpu(shipped):
    cfg, _, state, ids, spans = shipped
    obj = data.objective(cfg).for_evaluation(ids.shape[0])

    def evaluate(params, ids, spans):
        return _evaluate_jit(params, ids, spans, cfg=cfg, obj=obj, n=3)

    _accelerator_safe(_module(evaluate, state.params, ids, spans))


@pytest.mark.parametrize("mode", ["stateful", "window"])
def test_the_sampler_lowers_for_cuda_and_tpu(shipped, mode):
    cfg, _, state, _, _ = shipped

    def generate(params, key, prompt, temperature):
        return sample(
            params,
            key,
            prompt,
            cfg=cfg.model,
            length=16,
            temperature=temperature,
            mode=mode,
            seq_length=cfg.data.seq_length,
        )

    args = state.params, jax.random.PRNGKey(0), jnp.arange(7) % 60, 0.8
    _accelerator_safe(_module(generate, *args))


def test_one_module_for_every_platform_chooses_per_platform():
    """A module for cpu, cuda and tpu at once holds the C++ kernels for the CPU only: the
    choice is a platform_dependent switch on the platform index, made when it runs."""
    cfg = _cfg("fast")
    state = create_state(cfg, make_optimizer(cfg.train, 10), jax.random.PRNGKey(0))

    def generate(params, key, prompt):
        return sample(params, key, prompt, cfg=cfg.model, length=16, temperature=0.8)

    args = state.params, jax.random.PRNGKey(0), jnp.arange(7)
    both = _module(generate, *args, platforms=ACCELERATORS)
    everywhere = _module(
        generate,
        *args,
        platforms=["cpu", *ACCELERATORS],
        # the kernels are jaxchar's own FFI targets: JAX cannot promise they exist where
        # the module is loaded, so serializing them needs this acknowledgement
        disabled_checks=[export.DisabledSafetyCheck.custom_call("jaxchar_generate")],
    )
    from jaxchar.lstm import select

    kernel = select(cfg.model, "sample", platform="cpu").backend == "native"
    assert CPU_ONLY.findall(everywhere) == (["jaxchar_generate"] if kernel else [])
    assert "_platform_index" in everywhere  # the switch the loading runtime resolves
    _accelerator_safe(both)
    assert "f64" not in everywhere


def test_bfloat16_lowers_with_bfloat16_products_for_the_accelerators():
    cfg = override(_cfg("fast"), ["model.dtype=bfloat16"])
    tx = make_optimizer(cfg.train, 10)
    state = create_state(cfg, tx, jax.random.PRNGKey(0))

    def steps(state, totals, ids):
        return run_steps(state, totals, ids, 0, 0, None, cfg=cfg, tx=tx, n=2)

    text = _module(steps, state, zero_totals(), jnp.zeros((20_000,), jnp.uint8))
    _accelerator_safe(text)
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert sum("bf16" in line for line in dots) >= 4


GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(
    not GPU,
    reason="tracing jax.experimental.rnn sizes cuDNN's workspace through the CUDA plugin, "
    "so the cuDNN layer lowers only where a GPU is present (benchmarks/gpu_check.sh runs this)",
)
@pytest.mark.parametrize("name", SHIPPED)
def test_the_cudnn_layer_lowers_to_cudnns_rnn_calls(name):
    cfg = override(_cfg(name), ["model.impl=cudnn"])
    tx = make_optimizer(cfg.train, 10)
    state = create_state(cfg, tx, jax.random.PRNGKey(0))
    spans = None
    if data.objective(cfg).needs_spans:
        spans = jnp.array([[i * 50, i * 50 + 40] for i in range(200)], jnp.int32)

    def steps(state, totals, ids, spans):
        return run_steps(state, totals, ids, 0, 0, spans, cfg=cfg, tx=tx, n=2)

    # lowered, not exported: jax.export refuses to serialize jaxlib's cuDNN RNN targets
    # (cudnn_rnn_ffi, cudnn_rnn_bwd_ffi), which carry no compatibility guarantee
    ids = jnp.zeros((50_000,), jnp.uint8)
    text = jax.jit(steps).lower(state, zero_totals(), ids, spans).as_text()
    _accelerator_safe(text)
    calls = [c for c in re.findall(r"custom_call @(\w+)", text) if "rnn" in c]
    # forward and backward through cuDNN (jaxlib's cudnn_rnn targets), once per layer each
    assert sum("bwd" not in c for c in calls) == cfg.model.layers, calls
    assert sum("bwd" in c for c in calls) == cfg.model.layers, calls
