"""The CPU generation kernel (jaxchar/csrc/native.cc) against the lax.scan path it stands in for."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchar.config import ModelConfig
from jaxchar.lstm import native
from jaxchar.lstm.backends import select
from jaxchar.model import apply, init_carry, init_params
from jaxchar.sampling import sample, sample_stream

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"no C++ kernel variant loaded: {native.variant()[1]}"
)

CONFIGS = [  # every input encoding, one and two layers, both gate functions; forced, so
    # the kernel runs wherever a variant is loaded (auto's choice is test_backends's)
    ModelConfig(vocab_size=13, layers=1, hidden=32, encoding="scaled", impl="native"),
    ModelConfig(vocab_size=13, layers=2, hidden=32, encoding="embed", embed_dim=6, impl="native"),
    ModelConfig(
        vocab_size=13,
        layers=2,
        hidden=64,
        encoding="onehot",
        gate_activation="hard_sigmoid",
        impl="native",
    ),
]


def _params(cfg, seed=0):
    # random biases, a stronger input and recurrence than at init: argmax generation from
    # an initialised model settles on one character at once, and a test of that tells little
    params = init_params(cfg, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), cfg.layers))
    scale = 30.0 if cfg.encoding == "scaled" else 10.0  # the scaled feature is in [0, 1)
    for layer in range(cfg.layers):
        p = params[f"lstm_{layer}"]
        params[f"lstm_{layer}"] = {
            "input_kernel": scale * p["input_kernel"],
            "bias": jax.random.normal(next(keys), p["bias"].shape),
            "cell": {"recurrent_kernel": 3 * p["cell"]["recurrent_kernel"]},
        }
    params["head"] = {**params["head"], "kernel": 3 * params["head"]["kernel"]}
    return params


def _reference(cfg):
    return dataclasses.replace(cfg, impl="scan")  # the lax.scan path, never the kernel


def test_sample_runs_the_kernel_on_the_cpu_only_where_it_applies():
    cfg = CONFIGS[0]
    prompt, key = jnp.arange(5), jax.random.PRNGKey(0)

    def lowered(cfg, **kw):
        return sample.lower(_params(cfg), key, prompt, cfg=cfg, length=8, **kw).as_text()

    # forced, the kernel runs wherever a variant is loaded; auto runs it where measured faster
    auto = dataclasses.replace(cfg, impl="auto")
    assert ("jaxchar_generate" in lowered(auto)) == (_sampler(auto) == "native")
    assert "jaxchar_generate" in lowered(cfg)
    assert "jaxchar_generate" not in lowered(_reference(cfg))
    assert "jaxchar_generate" not in lowered(cfg, top_k=3)
    assert "jaxchar_generate" in lowered(cfg, num_samples=2)
    assert "jaxchar_generate" not in lowered(cfg, num_samples=native.MAX_ROWS + 1)
    assert "jaxchar_generate" not in lowered(dataclasses.replace(cfg, hidden=24))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["scaled-1", "embed-2", "onehot-2-hard"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_kernel_draws_the_characters_the_scan_draws(cfg, temperature):
    params = _params(cfg)
    prompt = jax.random.randint(jax.random.PRNGKey(1), (20,), 0, cfg.vocab_size)
    key = jax.random.PRNGKey(2)
    got = sample(params, key, prompt, cfg=cfg, length=300, temperature=temperature)
    want = sample(params, key, prompt, cfg=_reference(cfg), length=300, temperature=temperature)
    np.testing.assert_array_equal(got, want)
    assert len(set(np.asarray(got).tolist())) > 1  # not one character repeated


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_kernel_state_and_logits_match_the_model_for_any_thread_count(threads):
    cfg = CONFIGS[2]
    params = _params(cfg, seed=3)
    prompt = jnp.array([1, 5, 2, 7])
    keys = jax.random.split(jax.random.PRNGKey(4), 40)
    run = jax.jit(
        lambda params, keys: native.generate(
            params, cfg, init_carry(cfg, 1), jnp.zeros((1, 13)), keys, 0.0, prompt[None], threads
        )
    )
    (carry, logits), ids = run(params, keys)
    # the model over the prompt and the drawn characters gives the same state and logits
    every = jnp.concatenate([prompt, ids[0]])[None]
    want_logits, want_carry = apply(params, _reference(cfg), every, init_carry(cfg, 1))
    np.testing.assert_array_equal(ids[0], jnp.argmax(want_logits[0, 3:-1], axis=-1))
    np.testing.assert_allclose(logits, want_logits[:, -1], rtol=1e-4, atol=1e-5)
    for (c, h), (wc, wh) in zip(carry, want_carry, strict=True):
        np.testing.assert_allclose(c, wc, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(h, wh, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vocab", [16, 30, 45, 70, 100])
def test_kernel_logits_for_any_vocabulary_width(vocab):
    # the head runs in register blocks of 16 to 64 columns: 16, 32, 48, 64 + 16, 64 + 48;
    # and with 48 units a thread, the 64-column tiles of the gates start mid-gate
    cfg = ModelConfig(vocab_size=vocab, layers=1, hidden=96, encoding="onehot")
    params = _params(cfg, seed=vocab)
    prompt = jax.random.randint(jax.random.PRNGKey(vocab), (6,), 0, vocab)
    key = jax.random.PRNGKey(7)
    got = sample(params, key, prompt, cfg=cfg, length=60, temperature=0.8)
    want = sample(params, key, prompt, cfg=_reference(cfg), length=60, temperature=0.8)
    np.testing.assert_array_equal(got, want)
    assert len(set(np.asarray(got).tolist())) > 1  # not one character repeated
    # and the logits themselves, after the prompt and 30 characters drawn by argmax
    keys = jax.random.split(key, 30)
    (_, logits), ids = jax.jit(
        lambda params, keys: native.generate(
            params, cfg, init_carry(cfg, 1), jnp.zeros((1, vocab)), keys, 0.0, prompt[None], 2
        )
    )(params, keys)
    every = jnp.concatenate([prompt, ids[0]])[None]
    want_logits, _ = apply(params, _reference(cfg), every, init_carry(cfg, 1))
    np.testing.assert_array_equal(ids[0], jnp.argmax(want_logits[0, 5:-1], axis=-1))
    np.testing.assert_allclose(logits, want_logits[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 7, 13])
def test_kernel_draws_each_rows_characters_as_the_scan_does(rows):
    # rows of the batch go through the products in blocks of up to 6 (7 = 6 + 1, 13 =
    # 6 + 6 + 1) and the head in blocks of up to 6; each row has a prompt of its own
    cfg = CONFIGS[1]
    params = _params(cfg, seed=rows)
    prompt = jax.random.randint(jax.random.PRNGKey(rows), (rows, 9), 0, cfg.vocab_size)
    key = jax.random.PRNGKey(8)
    got = sample(params, key, prompt, cfg=cfg, length=120, temperature=0.7)
    want = sample(params, key, prompt, cfg=_reference(cfg), length=120, temperature=0.7)
    assert got.shape == (rows, 120)
    np.testing.assert_array_equal(got, want)
    assert len({tuple(row) for row in np.asarray(got).tolist()}) == rows  # rows differ


def _kernel_against_the_model(cfg, rows, seed, rtol, atol, threads=2):
    """Argmax characters from the kernel after a prompt per row; the model over the same
    characters must give them, and the kernel's final state and logits. Returns the logits."""
    params = _params(cfg, seed=seed)
    prompt = jax.random.randint(jax.random.PRNGKey(9), (rows, 4), 0, cfg.vocab_size)
    keys = jax.random.split(jax.random.PRNGKey(10), 30)
    (carry, logits), ids = jax.jit(
        lambda params, keys: native.generate(
            params, cfg, init_carry(cfg, rows), jnp.zeros((rows, 13)), keys, 0.0, prompt, threads
        )
    )(params, keys)
    every = jnp.concatenate([prompt, ids], axis=1)
    want_logits, want_carry = apply(params, _reference(cfg), every, init_carry(cfg, rows))
    np.testing.assert_array_equal(ids, jnp.argmax(want_logits[:, 3:-1], axis=-1))
    np.testing.assert_allclose(logits, want_logits[:, -1], rtol=rtol, atol=atol)
    for (c, h), (wc, wh) in zip(carry, want_carry, strict=True):
        np.testing.assert_allclose(c, wc, rtol=rtol, atol=atol)
        np.testing.assert_allclose(h, wh, rtol=rtol, atol=atol)
    return logits, params, every


SCALED_64 = ModelConfig(vocab_size=13, layers=1, hidden=64, encoding="scaled")
EMBED_128 = ModelConfig(vocab_size=13, layers=2, hidden=128, encoding="embed", embed_dim=6)


@pytest.mark.parametrize(
    "cfg,rows,threads",
    [(CONFIGS[2], 5, 2), (CONFIGS[2], 13, 2), (CONFIGS[2], 30, 2), (CONFIGS[2], 25, 1)]
    + [(SCALED_64, 64, 2), (EMBED_128, 12, 4)],
    ids=["5", "13", "30", "25-one-thread", "64-scaled-sigmoid", "12-four-threads"],
)
def test_batched_kernel_state_and_logits_match_the_model(cfg, rows, threads):
    # from 12 rows on, float32 recurrent products run by one level of Strassen's algorithm on
    # the first multiple of 12 rows (13 = 12 + 1, 30 = 24 + 6, 25 = 24 + 1, 64 = 60 + 4, as
    # in the benchmark) and as before on the rest; with 64 units, each thread's gate columns
    # split into two halves of whole tiles
    _kernel_against_the_model(cfg, rows, seed=rows, rtol=1e-4, atol=1e-5, threads=threads)


def test_streamed_chunks_carry_the_kernels_state_on():
    # sample_stream runs the kernel once per chunk, each from the last one's state
    cfg = CONFIGS[1]
    params, prompt, key = _params(cfg), jnp.array([3, 1, 4, 1, 5]), jax.random.PRNGKey(5)
    chunks = sample_stream(params, key, prompt, cfg=cfg, length=70, temperature=0.5, chunk=16)
    want = sample(params, key, prompt, cfg=_reference(cfg), length=70, temperature=0.5)
    np.testing.assert_array_equal(np.concatenate(list(chunks)), want)


def test_kernel_under_vmap_and_jit_equals_one_call_per_key():
    cfg = CONFIGS[0]
    params, prompt = _params(cfg), jnp.array([2, 3])
    keys = jax.random.split(jax.random.PRNGKey(6), 3)

    @jax.jit
    def many(keys):
        return jax.vmap(lambda k: sample(params, k, prompt, cfg=cfg, length=50, temperature=1.0))(
            keys
        )

    want = [
        sample(params, k, prompt, cfg=_reference(cfg), length=50, temperature=1.0) for k in keys
    ]
    np.testing.assert_array_equal(many(keys), np.stack(want))


def test_a_prompt_outside_the_vocabulary_is_an_error_not_a_wild_read():
    cfg = CONFIGS[1]
    with pytest.raises(Exception, match="outside the vocabulary"):
        out = sample(_params(cfg), jax.random.PRNGKey(0), jnp.array([1, 99]), cfg=cfg, length=5)
        out.block_until_ready()


BF16 = [dataclasses.replace(cfg, dtype="bfloat16") for cfg in CONFIGS]
needs_bf16 = pytest.mark.skipif(not native.bf16(), reason="no AVX512-BF16 in this build")


@needs_bf16
@pytest.mark.parametrize("cfg", BF16, ids=["scaled-1", "embed-2", "onehot-2-hard"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_bfloat16_kernel_draws_the_characters_the_bfloat16_scan_draws(cfg, temperature):
    # the same bfloat16 operands (weights and h rounded to nearest even), float32 sums
    params = _params(cfg)
    prompt = jax.random.randint(jax.random.PRNGKey(1), (3, 20), 0, cfg.vocab_size)
    key = jax.random.PRNGKey(2)
    lowered = sample.lower(params, key, prompt, cfg=cfg, length=80, temperature=temperature)
    assert "jaxchar_generate" in lowered.as_text()
    got = sample(params, key, prompt, cfg=cfg, length=80, temperature=temperature)
    want = sample(params, key, prompt, cfg=_reference(cfg), length=80, temperature=temperature)
    np.testing.assert_array_equal(got, want)
    assert len(set(np.asarray(got).ravel().tolist())) > 1  # not one character repeated


@needs_bf16
def test_bfloat16_kernel_state_and_logits_match_the_bfloat16_model():
    # two layers: the upper one's input product in bfloat16 too; float32 sums in another
    # order can move an h across a bfloat16 rounding boundary, hence the wider tolerance
    cfg = BF16[1]
    logits, params, every = _kernel_against_the_model(cfg, rows=7, seed=5, rtol=1e-3, atol=1e-3)
    float32, _ = apply(params, _reference(CONFIGS[1]), every, init_carry(cfg, 7))
    assert np.abs(np.asarray(float32[:, -1]) - np.asarray(logits)).max() > 1e-3  # it is bf16


def _sampler(cfg, rows=1):
    return select(cfg, "sample", platform="cpu", rows=rows).backend


def test_bfloat16_generation_needs_hidden_a_multiple_of_32():
    cfg = dataclasses.replace(BF16[0], hidden=48)
    assert _sampler(cfg) == "scan"
    assert _sampler(BF16[0]) == "native" and BF16[0].hidden % 32 == 0


def test_a_build_this_cpu_cannot_run_leaves_sampling_to_the_scan(monkeypatch):
    # no variant loads where the CPU lacks every built variant's instructions
    monkeypatch.setattr(native.loader, "variant", lambda: (None, "this CPU lacks them"))
    cfg = CONFIGS[0]
    assert _sampler(cfg) == "scan"
    lowered = sample.lower(_params(cfg), jax.random.PRNGKey(0), jnp.arange(3), cfg=cfg, length=4)
    assert "jaxchar_generate" not in lowered.as_text()


CONCURRENT = """
from concurrent.futures import ThreadPoolExecutor
import jax, jax.numpy as jnp, numpy as np
from jaxchar.config import ModelConfig
from jaxchar.model import init_params
from jaxchar.sampling import sample
cfg = ModelConfig(vocab_size=13, layers=1, hidden=64, encoding="embed", embed_dim=6)
params = init_params(cfg, jax.random.PRNGKey(0))
prompt = jnp.array([1, 2, 3])
run = lambda t: sample(params, jax.random.PRNGKey(1), prompt, cfg=cfg, length=400, temperature=t)
alone = [np.asarray(run(t)) for t in (0.2, 0.5, 1.0)]
with ThreadPoolExecutor(4) as threads:  # four samples in flight at once
    at_once = list(threads.map(lambda t: np.asarray(run(t)), (0.2, 0.5, 1.0) * 4))
assert all(np.array_equal(a, b) for a, b in zip(alone * 4, at_once))
print("ok")
"""


@pytest.mark.slow  # starts processes
def test_samples_dispatched_together_finish_and_agree():
    # several kernels in flight hold XLA's threads at once: a kernel whose helper thread
    # cannot start must run alone rather than wait for it (this hung the two-process
    # training test, where two kernels ran at once in one process)
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
