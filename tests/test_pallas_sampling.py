"""The Pallas sampling loop (jaxchar/lstm/pallas/sampling.py) against the lax.scan loop it
stands in for, on every shipped config's shapes. On a CPU it runs in Pallas's interpreter,
one program per row block (the split over unit groups and the barrier run on a GPU only,
where benchmarks/gpu_check.sh runs this file before timing the kernel). The lowering tests
show the kernel in the CUDA module where it is chosen and nowhere else."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, lowered_for_a_hopper_gpu, shipped_configs

from jaxchar.config import ModelConfig, load_config
from jaxchar.lstm import generation, pallas, select
from jaxchar.model import apply, init_carry, init_params
from jaxchar.sampling import sample, sample_stream

# the default in the quick loop; the others in the whole suite, each model shape once
SHIPPED = shipped_configs(distinct_models=True)
VOCAB = 45
GPU = jax.default_backend() == "gpu"


def _model(name: str, **kw) -> ModelConfig:
    model = load_config(REPO / "configs" / f"{name}.toml").model
    return dataclasses.replace(model, vocab_size=VOCAB, impl="pallas", **kw)


def _scan(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, impl="scan")


def _params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Initial weights scaled up, so that the logits are spread (a near-uniform draw would
    hide a wrong state) and the gates leave their linear middle."""
    params = init_params(cfg, jax.random.PRNGKey(seed))
    return jax.tree.map(lambda x: 2.5 * x, params)


def _kernel_calls(f, *args) -> int:
    """How many sampling kernel launches f's program holds for this platform (its jaxpr has
    a branch per platform: compiled for CUDA, interpreted for CPUs)."""
    text = str(jax.make_jaxpr(f)(*args))
    calls = text.split("pallas_call[")[1:]
    return sum(
        re.search(r"interpret=(\w+)", c).group(1) == str(not GPU) and "jaxchar_generate_pallas" in c
        for c in calls
    )


@pytest.mark.parametrize("name", SHIPPED)
def test_the_kernel_draws_the_scans_ids_on_every_shipped_config(name):
    # the config's layers, hidden size, encoding and gates; 3 rows (one row block, padded),
    # a prompt, argmax and a temperature; the same key twice gives the same bits
    cfg = _model(name)
    params = _params(cfg)
    key, prompt = jax.random.PRNGKey(1), jnp.arange(10) % VOCAB
    assert select(cfg, "sample", platform=jax.default_backend(), rows=3).backend == "pallas"
    for temperature in (0.0, 0.8):
        kw = dict(length=40, temperature=temperature, num_samples=3)
        got = sample(params, key, prompt, cfg=cfg, **kw)
        want = sample(params, key, prompt, cfg=_scan(cfg), **kw)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(sample(params, key, prompt, cfg=cfg, **kw), got)
        if temperature:  # a draw, not one character repeated
            assert len(set(np.asarray(got).ravel().tolist())) > 3


@pytest.mark.parametrize(
    "layers, hidden, encoding, kind",
    [(1, 32, "scaled", "sigmoid"), (2, 48, "embed", "hard_sigmoid"), (3, 32, "onehot", "sigmoid")],
)
def test_the_kernels_state_and_logits_are_the_models(layers, hidden, encoding, kind):
    # after a prompt and 30 drawn characters, the carry and the next logits are the model's
    # over all of them (hidden 48: contractions in 16-wide pieces; 3 layers: two above the
    # first); 20 rows, so that the second row block is padded
    cfg = ModelConfig(
        vocab_size=VOCAB, layers=layers, hidden=hidden, encoding=encoding, gate_activation=kind
    )
    params, rows = _params(cfg, seed=layers), 20
    prompt = jax.random.randint(jax.random.PRNGKey(2), (rows, 6), 0, VOCAB)
    keys = jax.random.split(jax.random.PRNGKey(3), 30)
    core = functools.partial(pallas.sampling.generate_call, interpret=not GPU)

    @functools.partial(jax.jit, static_argnums=3)
    def run(params, keys, prompt, temperature):
        empty = init_carry(cfg, rows), jnp.zeros((rows, VOCAB))
        return generation.generate(core, params, cfg, *empty, keys, temperature, prompt)

    for temperature in (0.7, 0.0):
        (carry, logits), ids = run(params, keys, prompt, temperature)
        every = jnp.concatenate([prompt, ids], axis=1)
        want_logits, want_carry = apply(params, _scan(cfg), every, init_carry(cfg, rows))
        tol = dict(rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits, want_logits[:, -1], **tol)
        for (c, h), (wc, wh) in zip(carry, want_carry, strict=True):
            np.testing.assert_allclose(c, wc, **tol)
            np.testing.assert_allclose(h, wh, **tol)
        if not temperature:  # the argmax of the model's logits
            np.testing.assert_array_equal(ids, jnp.argmax(want_logits[:, 5:-1], axis=-1))


def test_bfloat16_products_draw_the_scans_ids():
    # operands rounded to bfloat16 as the model rounds them, float32 sums
    cfg = ModelConfig(vocab_size=VOCAB, layers=2, hidden=32, dtype="bfloat16", impl="pallas")
    params = _params(cfg, seed=5)
    key, prompt = jax.random.PRNGKey(6), jnp.arange(8)
    kw = dict(length=30, temperature=0.8, num_samples=2)
    got = sample(params, key, prompt, cfg=cfg, **kw)
    np.testing.assert_array_equal(got, sample(params, key, prompt, cfg=_scan(cfg), **kw))


def test_under_vmap_keys_and_prompts_fold_into_one_kernel_call():
    cfg = ModelConfig(vocab_size=VOCAB, layers=2, hidden=32, encoding="embed", impl="pallas")
    params = _params(cfg, seed=7)
    keys = jax.random.split(jax.random.PRNGKey(8), 3)
    prompts = jax.random.randint(jax.random.PRNGKey(9), (3, 2, 7), 0, VOCAB)

    def many(cfg):
        def one(key, prompt):
            return sample(params, key, prompt, cfg=cfg, length=20, temperature=0.9)

        return jax.jit(jax.vmap(one))

    got = many(cfg)(keys, prompts)  # [3, 2, 20]: 3 keys x 2 prompts each, 6 rows
    np.testing.assert_array_equal(got, many(_scan(cfg))(keys, prompts))
    assert _kernel_calls(many(cfg), keys, prompts) == 1
    for i in range(3):  # and each is the unmapped call's
        one = sample(params, keys[i], prompts[i], cfg=cfg, length=20, temperature=0.9)
        np.testing.assert_array_equal(got[i], one)


def test_a_long_sample_runs_as_several_kernel_calls_and_equals_one_scan(monkeypatch):
    # at most NOISE_BYTES of noise a call: 48 characters a call for 2 rows
    monkeypatch.setattr(generation, "NOISE_BYTES", 3 * 4 * 2 * VOCAB * 16)
    cfg = ModelConfig(vocab_size=VOCAB, layers=2, hidden=32, encoding="embed", impl="pallas")
    params = _params(cfg, seed=10)
    key, prompt = jax.random.PRNGKey(11), jnp.arange(9)
    kw = dict(length=130, temperature=0.9, num_samples=2)
    got = sample(params, key, prompt, cfg=cfg, **kw)
    np.testing.assert_array_equal(got, sample(params, key, prompt, cfg=_scan(cfg), **kw))
    streamed = sample_stream(params, key, prompt, cfg=cfg, chunk=50, **kw)
    np.testing.assert_array_equal(jnp.concatenate(list(streamed), axis=1), got)


def test_the_selector_runs_the_kernel_only_when_forced_and_where_it_applies():
    cfg = ModelConfig(vocab_size=VOCAB, hidden=256)
    for platform in ("cpu", "gpu", "tpu"):  # auto has no GPU measurement that picks it
        assert select(cfg, "sample", platform=platform).backend != "pallas"
    forced = dataclasses.replace(cfg, impl="pallas")
    assert select(forced, "sample", platform="gpu", rows=64).backend == "pallas"
    assert "interpreted" in select(forced, "sample", platform="cpu").reason
    rows = pallas.sampling.MAX_ROWS + 1
    assert select(forced, "sample", platform="gpu", rows=rows).backend == "scan"
    filtered = select(forced, "sample", platform="gpu", filtered=True)
    assert filtered.backend == "scan" and "top-k" in filtered.reason
    odd = select(dataclasses.replace(forced, hidden=40), "sample", platform="gpu")
    assert odd.backend == "scan" and "hidden % 16" in odd.reason
    assert select(forced, "sample", platform="tpu").backend == "scan"
    gru = dataclasses.replace(forced, cell="gru")
    assert select(gru, "sample", platform="gpu").backend == "scan"


def test_filtered_and_oversized_calls_take_the_scan():
    cfg = ModelConfig(vocab_size=VOCAB, hidden=32, impl="pallas")
    params, key, prompt = _params(cfg), jax.random.PRNGKey(0), jnp.arange(4)

    def calls(**kw):
        return _kernel_calls(
            lambda p, k: sample(p, k, prompt, cfg=cfg, length=5, temperature=1.0, **kw),
            params,
            key,
        )

    assert calls() == 1
    assert calls(top_k=5) == 0 and calls(top_p=0.9) == 0
    assert calls(num_samples=pallas.sampling.MAX_ROWS + 1) == 0
    got = sample(params, key, prompt, cfg=cfg, length=12, temperature=1.0, top_k=5)
    want = sample(params, key, prompt, cfg=_scan(cfg), length=12, temperature=1.0, top_k=5)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows", [1, 64])
def test_the_cuda_module_holds_one_sampling_kernel(rows):
    # lowered for CUDA from this CPU: the default config's sampler at 1 and 64 rows, the
    # kernel with its real grid (hidden / UNITS unit groups, one block per 16 rows)
    from jax import export

    cfg = _model("fast")
    params, key, prompt = _params(cfg), jax.random.PRNGKey(0), jnp.arange(5)

    def sampler(cfg):
        return jax.jit(
            lambda p, k: sample(p, k, prompt, cfg=cfg, length=64, temperature=0.8, num_samples=rows)
        )

    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exp = export.export(sampler(cfg), platforms=["cuda"], disabled_checks=[triton])
    text = lowered_for_a_hopper_gpu(exp, params, key)
    calls = [line for line in text.splitlines() if "custom_call @__gpu$xla.gpu.triton" in line]
    assert [re.search(r'name = "(\w+)"', c).group(1) for c in calls] == ["jaxchar_generate_pallas"]
    assert re.findall(r"grid_x = (\d+)", text) == [str(cfg.hidden // pallas.UNITS)]
    assert re.findall(r"grid_y = (\d+)", text) == [str(-(-rows // pallas.ROWS))]
    auto = dataclasses.replace(cfg, impl="auto")
    plain = export.export(sampler(auto), platforms=["cuda"])(params, key).mlir_module()
    assert "xla.gpu.triton" not in plain


def test_the_serving_engine_runs_unfiltered_rows_on_the_kernel_with_the_same_ids():
    # requests at temperature 0 and 0.8 share kernel launches; a top-k request beside them
    # takes the lax.scan loop for those calls; each gets what `sample` gives for its seed
    import threading

    from jaxchar.config import SampleConfig
    from jaxchar.engine import Engine, Request, _advance_kernel

    cfg = ModelConfig(vocab_size=VOCAB, layers=2, hidden=32, encoding="embed", impl="pallas")
    params = _params(cfg, seed=12)
    prompt = np.arange(12) % VOCAB
    jobs = [(0.0, 0, 3), (0.8, 0, 4), (0.8, 0, 5), (0.8, 5, 6)]  # temperature, top_k, seed
    before = _advance_kernel._cache_size()
    engine = Engine(params, cfg, slots=4, chunk=8, gather_ms=50).start()
    try:
        out = {seed: [] for *_, seed in jobs}
        done = [threading.Event() for _ in jobs]
        for (t, k, seed), ev in zip(jobs[:3], done, strict=False):  # unfiltered together
            opts = SampleConfig(length=24, temperature=t, top_k=k)
            engine.submit(
                Request(prompt, opts, seed, lambda ids, s=seed, e=ev: _take(ids, s, e, out))
            )
        for ev in done[:3]:
            assert ev.wait(120)
        t, k, seed = jobs[3]
        opts = SampleConfig(length=24, temperature=t, top_k=k)
        engine.submit(Request(prompt, opts, seed, lambda ids: _take(ids, seed, done[3], out)))
        assert done[3].wait(120)
    finally:
        engine.stop()
    assert _advance_kernel._cache_size() > before  # the kernel ran
    scan = _scan(cfg)
    for t, k, seed in jobs:
        want = sample(
            params, jax.random.PRNGKey(seed), prompt, cfg=scan, length=24, temperature=t, top_k=k
        )
        assert out[seed] == np.asarray(want).tolist(), seed


def _take(ids, seed, event, out):
    if ids is None:
        event.set()
    else:
        out[seed].extend(ids)
