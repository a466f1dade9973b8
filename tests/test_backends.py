"""The LSTM backends' contract, on every shipped config's real shapes: the selector's table,
the sampler under jit, vmap and lax.scan, training values and gradients on every backend the
selector may choose here, and bit-identical training for a seed on the default backend."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, shipped_configs

from jaxchar.config import ModelConfig, load_config
from jaxchar.corpus import prepare
from jaxchar.lstm import BackendError, generation, native, select
from jaxchar.lstm.backends import MEASURED_FASTER, runnable
from jaxchar.model import apply, init_params
from jaxchar.sampling import sample
from jaxchar.train import fit, with_vocab

# the default in the quick loop; the others in the whole suite, each model shape once
SHIPPED = shipped_configs(distinct_models=True)
VOCAB = 45  # Alice's lowercased vocabulary is about this size
KERNELS = native.available()


def _model(name: str) -> ModelConfig:
    return dataclasses.replace(
        load_config(REPO / "configs" / f"{name}.toml").model, vocab_size=VOCAB
    )


def _scan(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, impl="scan")


# ---- the selector's table -------------------------------------------------------------

LSTM = ModelConfig(vocab_size=VOCAB, hidden=256)


def _loaded(monkeypatch, name):
    monkeypatch.setattr(native.loader, "variant", lambda: (name, "test"))


@pytest.mark.parametrize(
    "variant, cfg, purpose, kwargs, want",
    [
        # auto on a CPU with AVX-512 kernels: the kernels where they apply
        ("avx512", LSTM, "layer", {}, "native"),
        ("avx512", dataclasses.replace(LSTM, hidden=96), "layer", {}, "fused"),  # % 64
        ("avx512", dataclasses.replace(LSTM, dtype="bfloat16"), "layer", {}, "fused"),
        ("avx512", dataclasses.replace(LSTM, cell="gru"), "layer", {}, "scan"),
        ("avx512", LSTM, "layer", {"masked": True}, "scan"),
        ("avx512", LSTM, "sample", {"rows": 1}, "native"),
        ("avx512", LSTM, "sample", {"rows": 64}, "native"),
        ("avx512", LSTM, "sample", {"rows": 65}, "scan"),
        ("avx512", LSTM, "sample", {"filtered": True}, "scan"),
        ("avx512", dataclasses.replace(LSTM, hidden=24), "sample", {}, "scan"),  # % 16
        ("avx512", dataclasses.replace(LSTM, dtype="bfloat16"), "sample", {}, "scan"),
        ("avx512bf16", dataclasses.replace(LSTM, dtype="bfloat16"), "sample", {}, "native"),
        # no kernels (an AVX2-only CPU, not built, another architecture, JAXCHAR_NATIVE=0)
        (None, LSTM, "layer", {}, "fused"),
        (None, LSTM, "sample", {}, "scan"),
        # forced backends that apply
        ("avx512", dataclasses.replace(LSTM, impl="scan"), "layer", {}, "scan"),
        ("avx512", dataclasses.replace(LSTM, impl="fused"), "layer", {}, "fused"),
        ("avx512", dataclasses.replace(LSTM, impl="fused"), "sample", {}, "scan"),
        ("avx512", dataclasses.replace(LSTM, impl="native", hidden=96), "layer", {}, "fused"),
    ],
)
def test_the_selector_table_on_a_cpu(monkeypatch, variant, cfg, purpose, kwargs, want):
    _loaded(monkeypatch, variant)
    choice = select(cfg, purpose, platform="cpu", **kwargs)
    assert choice.backend == want, choice
    assert choice.reason  # every choice says why


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_auto_on_accelerators_takes_no_cpu_kernel(monkeypatch, platform):
    _loaded(monkeypatch, "avx512")
    assert select(LSTM, "layer", platform=platform).backend == "fused"
    assert select(LSTM, "sample", platform=platform).backend == "scan"


@pytest.mark.parametrize(
    "variant, impl, platform, words",
    [
        (None, "native", "cpu", "native.*cannot run here"),
        ("avx512", "native", "gpu", "native.*cannot run here"),
        ("avx512", "cudnn", "cpu", "cudnn.*NVIDIA GPU"),
    ],
)
def test_a_forced_backend_that_cannot_run_says_why(monkeypatch, variant, impl, platform, words):
    _loaded(monkeypatch, variant)
    cfg = dataclasses.replace(LSTM, impl=impl)
    with pytest.raises(BackendError, match=words):
        select(cfg, "layer", platform=platform)
    model, note = runnable(cfg, platform)  # a stored run is read with auto instead
    assert model.impl == "auto" and impl in note


@pytest.mark.parametrize("mode", ["stateful", "window"])
def test_a_run_forced_onto_a_backend_missing_here_still_samples(monkeypatch, mode):
    # jaxchar.load_checkpoint of a cuDNN run on a CPU: sampling takes the scan, same ids
    cfg = dataclasses.replace(_model("tiny"), impl="cudnn")
    assert select(cfg, "sample", platform="cpu").backend == "scan"
    params = init_params(_scan(cfg), jax.random.PRNGKey(0))
    key, prompt = jax.random.PRNGKey(1), jnp.arange(6)
    kw = dict(length=10, temperature=0.8, mode=mode, seq_length=8)
    got = sample(params, key, prompt, cfg=cfg, **kw)
    np.testing.assert_array_equal(got, sample(params, key, prompt, cfg=_scan(cfg), **kw))


def test_jaxchar_native_0_keeps_the_kernels_unloaded():
    import subprocess
    import sys

    code = "from jaxchar.lstm import native; print(native.variant())"
    env = {**__import__("os").environ, "JAXCHAR_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "turned off by JAXCHAR_NATIVE=0" in out.stdout, out.stderr[-500:]


# ---- the sampler on every shipped config --------------------------------------------


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    cfg = _model(request.param)
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def _loop(params, cfg, keys, prompts, **kw):
    """The reference: the scan path, one call per key (and prompt)."""
    return np.stack(
        [
            np.asarray(sample(params, k, p, cfg=_scan(cfg), length=12, **kw))
            for k, p in zip(keys, prompts, strict=True)
        ]
    )


@pytest.mark.parametrize(
    "kw", [{"temperature": 0.8}, {"temperature": 0.9, "top_k": 5, "top_p": 0.9}], ids=["t", "top"]
)
def test_sample_under_jit_and_vmap_over_keys_equals_the_reference(shipped, kw):
    cfg, params = shipped
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    prompt = jnp.arange(7) % VOCAB

    @jax.jit
    def many(params, keys):
        return jax.vmap(lambda k: sample(params, k, prompt, cfg=cfg, length=12, **kw))(keys)

    got = many(params, keys)
    np.testing.assert_array_equal(got, _loop(params, cfg, keys, [prompt] * 6, **kw))
    calls = many.lower(params, keys).as_text().count("jaxchar_generate")
    kernel = select(cfg, "sample", platform="cpu", rows=6, filtered="top_k" in kw).backend
    assert calls == (1 if kernel == "native" else 0)  # folded: one call for all the rows


def test_sample_vmapped_over_prompts_without_jit_and_inside_a_scan(shipped):
    cfg, params = shipped
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    prompts = jax.random.randint(jax.random.PRNGKey(3), (4, 5), 0, VOCAB)
    want = _loop(params, cfg, keys, prompts, temperature=0.7)
    got = jax.vmap(lambda k, p: sample(params, k, p, cfg=cfg, length=12, temperature=0.7))(
        keys, prompts
    )
    np.testing.assert_array_equal(got, want)

    def body(carry, xs):
        k, p = xs
        return carry, sample(params, k, p, cfg=cfg, length=12, temperature=0.7)

    _, scanned = jax.lax.scan(body, 0, (keys, prompts))
    np.testing.assert_array_equal(scanned, want)
    one = jax.vmap(lambda k: sample(params, k, prompts[0, :1], cfg=cfg, length=12))(keys)
    np.testing.assert_array_equal(one, _loop(params, cfg, keys, [prompts[0, :1]] * 4))


@pytest.mark.parametrize("name", ["small", "fast"])  # one layer and two
def test_vmap_over_params_runs_the_reference_loop(name):
    cfg = _model(name)
    params = init_params(cfg, jax.random.PRNGKey(0))
    two = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), params)
    key, prompt = jax.random.PRNGKey(4), jnp.arange(4)
    got = jax.vmap(lambda p: sample(p, key, prompt, cfg=cfg, length=12, temperature=0.8))(two)
    for i in range(2):
        one = jax.tree.map(lambda x, i=i: x[i], two)
        want = sample(one, key, prompt, cfg=_scan(cfg), length=12, temperature=0.8)
        np.testing.assert_array_equal(got[i], want)


def test_long_generation_in_several_kernel_calls_equals_one_scan(monkeypatch):
    # the kernel makes at most NOISE_BYTES of noise a call: a long sample runs as several
    # calls in a lax.scan, and must draw exactly what one scan draws
    monkeypatch.setattr(generation, "NOISE_BYTES", 3 * 4 * 2 * VOCAB * 16)  # 48 chars a call
    cfg = _model("fast")
    params = init_params(cfg, jax.random.PRNGKey(5))
    key, prompt = jax.random.PRNGKey(6), jnp.arange(9)
    got = sample(params, key, prompt, cfg=cfg, length=130, temperature=0.9, num_samples=2)
    want = sample(params, key, prompt, cfg=_scan(cfg), length=130, temperature=0.9, num_samples=2)
    np.testing.assert_array_equal(got, want)
    assert generation.chunk_length(2, VOCAB) == 48


# ---- training on every backend the selector may choose here ---------------------------


def _backends_here(cfg):
    # the kernels are forced wherever a variant is loaded, whether or not auto picks them
    impls = ["fused"] + (["native"] if KERNELS else [])
    return [
        i
        for i in impls
        if select(dataclasses.replace(cfg, impl=i), "layer", platform="cpu").backend == i
    ]


@pytest.mark.parametrize("name", SHIPPED)
def test_training_values_and_gradients_match_the_reference_on_every_backend(name):
    full = load_config(REPO / "configs" / f"{name}.toml")
    cfg = dataclasses.replace(full.model, vocab_size=VOCAB, dropout=0.0, input_dropout=0.0)
    params = init_params(cfg, jax.random.PRNGKey(7))
    ids = jax.random.randint(jax.random.PRNGKey(8), (3, full.data.seq_length), 0, VOCAB)
    last_only = full.data.objective == "window"

    @jax.jit
    def grads(params, ids):
        def per_impl(impl):
            c = dataclasses.replace(cfg, impl=impl)

            def loss(p):
                logits, _ = apply(p, c, ids, last_only=last_only)
                return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

            return jax.value_and_grad(loss)(params)

        return {impl: per_impl(impl) for impl in ["scan", *_backends_here(cfg)]}

    out = grads(params, ids)
    want, want_grad = out.pop("scan")
    assert out, "no backend besides the reference ran"
    for impl, (got, got_grad) in out.items():
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=impl)
        for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5, err_msg=impl)


def test_training_twice_with_a_seed_gives_the_same_bits_on_the_default_backend(alice_text):
    # the fast config's shapes on its default backend (whatever auto picks on this CPU: the
    # C++ kernels with AVX-512, the fused layer elsewhere), with dropout, a few steps:
    # parameters, optimizer state and losses bit-identical
    cfg = load_config(REPO / "configs" / "fast.toml")
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, max_steps=4, batch_size=8, steps_per_call=2)
    )
    corpus = prepare(alice_text[:30000], cfg.data)
    cfg = with_vocab(cfg, len(corpus.vocab))
    chosen = select(cfg.model, "layer", platform="cpu").backend
    assert chosen == ("native" if native.variant()[0] in MEASURED_FASTER else "fused")
    events = [[], []]
    runs = [fit(cfg, corpus.train_ids, log=events[i].append) for i in range(2)]
    a, b = (jax.tree.leaves_with_path((r.state.params, r.state.opt_state)) for r in runs)
    pairs = zip(a, b, strict=True)
    differ = [jax.tree_util.keystr(p) for (p, x), (_, y) in pairs if not np.array_equal(x, y)]
    assert not differ, f"not bit-identical: {differ}"
    losses = [[e["loss"] for e in run if "loss" in e] for run in events]
    assert losses[0] and losses[0] == losses[1]


AS_AVX2 = """
import dataclasses, jax, jax.numpy as jnp, numpy as np
from jaxchar.config import ModelConfig
from jaxchar.lstm import BackendError, native, select
from jaxchar.model import apply, init_params
from jaxchar.sampling import sample
assert "avx512f" not in native.cpu_flags() and "avx2" in native.cpu_flags()
assert native.variant()[0] is None, native.variant()
cfg = ModelConfig(vocab_size=45, layers=2, hidden=128, encoding="embed")
assert select(cfg, "layer", platform="cpu").backend == "fused"
assert select(cfg, "sample", platform="cpu").backend == "scan"
try:
    select(dataclasses.replace(cfg, impl="native"), "layer", platform="cpu")
    raise SystemExit("a forced native layer was accepted")
except BackendError as err:
    assert "lacks the instructions" in str(err) or "not built" in str(err), err
ids = jax.random.randint(jax.random.PRNGKey(2), (5, 30), 0, 45)
params = init_params(cfg, jax.random.PRNGKey(0))
text = jax.jit(lambda p: apply(p, cfg, ids)[0]).lower(params).as_text()
assert "jaxchar_" not in text  # no kernel call where none is loaded
print("ok")
"""


@pytest.mark.slow  # starts processes
@pytest.mark.skipif(
    not {"avx2", "fma", "bmi2"} <= native.cpu_flags(), reason="this CPU has no AVX2"
)
def test_jaxchar_cpu_as_avx2_makes_the_loader_see_an_avx2_only_cpu():
    # what an AVX2-only CPU runs, shown on any x86-64 machine: no kernel variant loads (none
    # is built for AVX2), auto takes the JAX paths, a forced native layer says why
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAXCHAR_CPU_AS": "avx2"}
    done = subprocess.run(
        [sys.executable, "-c", AS_AVX2], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_jaxchar_cpu_as_names_a_known_kind(monkeypatch):
    monkeypatch.setenv("JAXCHAR_CPU_AS", "avx9")
    native.cpu_flags.cache_clear()
    try:
        with pytest.raises(ValueError, match="JAXCHAR_CPU_AS.*avx2"):
            native.cpu_flags()
    finally:
        monkeypatch.delenv("JAXCHAR_CPU_AS")
        native.cpu_flags.cache_clear()


def _eqns(jaxpr):
    """Every equation of a jaxpr and, at each call site, of the jaxprs inside it (a jitted
    function's body counted once per call, where the printed jaxpr shows it once)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for inner in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_unroll_reaches_the_fused_layers_loops_and_changes_no_value():
    # model.unroll is a speed lever for the fused layer's loops too (benchmarks/bench_kernels)
    cfg = ModelConfig(vocab_size=11, layers=2, hidden=32, encoding="embed", embed_dim=5)
    cfg = dataclasses.replace(cfg, impl="fused")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (3, 9), 0, 11)
    grad = jax.jit(
        jax.value_and_grad(lambda p, c: jnp.sum(jnp.sin(apply(p, c, ids)[0]))), static_argnums=1
    )
    unrolled = dataclasses.replace(cfg, unroll=4)
    jaxpr = jax.make_jaxpr(grad, static_argnums=1)(params, unrolled).jaxpr
    unrolls = [eqn.params["unroll"] for eqn in _eqns(jaxpr) if eqn.primitive.name == "scan"]
    assert unrolls == [4] * (2 * cfg.layers)  # the forward and backward loops
    for got, want in zip(
        jax.tree.leaves(grad(params, unrolled)), jax.tree.leaves(grad(params, cfg)), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
