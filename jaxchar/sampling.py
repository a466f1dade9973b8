"""Sampling: logits filters, one draw, and the jitted generation loop.

`sample` is a pure function of (params, key, prompt) plus static settings, so research code
can jit, vmap or embed it. The loop over characters is `lax.scan`; `temperature` and
`top_p` are traced (new values do not recompile), `length`, `top_k` and the config are
static. Temperature 0 means argmax, as in the tutorial.

The stateful loop runs as the C++ generation kernel where jaxchar.lstm.backends chooses it
(CPUs; the same ids for the same keys) and as the lax.scan below everywhere else. The model
inside the scan loop always runs its `scan` layers: one character a step is one cell step,
and the prompt is read once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxchar.config import ModelConfig
from jaxchar.lstm import native, select
from jaxchar.model import apply, init_carry, step

_NEG = -1e30  # stands for -inf without creating NaNs in softmax


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of each row [..., vocab]; the rest become -inf."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, _NEG, logits)


def top_p_filter(logits: jax.Array, p) -> jax.Array:
    """Keeps the smallest set of most likely ids whose probability reaches p (nucleus)."""
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each id
    kept = before < p  # the first id is always kept
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, _NEG, logits)


def sample_logits(
    key: jax.Array, logits: jax.Array, temperature=1.0, top_k: int | None = None, top_p=None
) -> jax.Array:
    """One id per row of logits [..., vocab]: argmax when temperature is 0, else a draw
    from softmax(logits / temperature) restricted by top-k, then top-p."""
    logits = logits.astype(jnp.float32)

    def draw():
        scaled = logits / jnp.maximum(temperature, 1e-6)
        if top_k:
            scaled = top_k_filter(scaled, top_k)
        if top_p is not None:
            scaled = top_p_filter(scaled, top_p)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    # a cond, not a where: at temperature 0 the random draw (most of a step's cost at batch
    # 64, measured in benchmarks/bench_generate.py) is skipped, while temperature stays traced
    return jax.lax.cond(jnp.asarray(temperature) > 0, draw, greedy)


def _reference(cfg: ModelConfig) -> ModelConfig:
    """The model config the lax.scan sampling loop runs: the nn.scan layers, which every
    other backend is tested against (and which vmap, grad and every platform take)."""
    return cfg if cfg.impl == "scan" else dataclasses.replace(cfg, impl="scan")


def _start(params, prompt, cfg: ModelConfig, mode: str, seq_length: int):
    """The generation state after reading the prompt [rows, P]: (carry, last logits) for
    stateful mode, (window, mask) for window mode."""
    rows = prompt.shape[0]
    if mode == "stateful":
        cfg = _reference(cfg)
        logits, carry = apply(params, cfg, prompt, init_carry(cfg, rows))
        return carry, logits[:, -1]
    if mode == "window":
        tail = prompt[:, -seq_length:]
        pad = seq_length - tail.shape[1]
        window = jnp.pad(tail, ((0, 0), (pad, 0)))
        return window, jnp.broadcast_to(jnp.arange(seq_length) >= pad, (rows, seq_length))
    raise ValueError(f"mode must be 'stateful' or 'window', not {mode!r}")


def _kernel(cfg: ModelConfig, rows: int, top_k, top_p) -> bool:
    """Whether the C++ generation loop runs `rows` rows (jaxchar.lstm.backends's choice)."""
    filtered = top_k is not None or top_p is not None
    choice = select(cfg, "sample", platform=jax.default_backend(), rows=rows, filtered=filtered)
    return choice.backend == "native"


def _steps(
    params, state, keys, cfg: ModelConfig, mode: str, temperature, top_k, top_p, prompt=None
):
    """One new character per key (keys [n, 2]): returns (state, ids [rows, n]). With `prompt`
    [rows, P] (stateful mode, `state` the initial one) the prompt is read first."""
    rows = state[1].shape[0]
    if mode == "stateful" and _kernel(cfg, rows, top_k, top_p):
        scan = partial(_scan, cfg=cfg, mode=mode, top_k=top_k, top_p=top_p)

        def kernel(state):
            return native.generate(
                params,
                cfg,
                *state,
                keys,
                temperature,
                prompt,
                fallback=scan,  # under vmap, where the kernel cannot take the rows
                fits=lambda rows: _kernel(cfg, rows, top_k, top_p),
            )

        def elsewhere(state):
            return scan(params, *state, keys, temperature, prompt)

        return jax.lax.platform_dependent(state, cpu=kernel, default=elsewhere)
    return _scan(params, *state, keys, temperature, prompt, cfg, mode, top_k, top_p)


def _scan(params, state0, state1, keys, temperature, prompt, cfg, mode, top_k, top_p):
    """The lax.scan loop: `_steps` by the model's nn.scan layers, one character a step.
    state0, state1: (carry, last logits) in stateful mode, (window, mask) in window mode."""
    draw = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if mode == "stateful":
        reference = _reference(cfg)

        def body(state, k):
            carry, last = state
            nxt = draw(k, last)
            last, carry = step(params, reference, carry, nxt)
            return (carry, last), nxt

    else:

        def body(state, k):
            window, mask = state
            logits, _ = apply(params, cfg, window, mask=mask, last_only=True)
            nxt = draw(k, logits)
            window = jnp.concatenate([window[:, 1:], nxt[:, None]], axis=1)
            mask = jnp.concatenate([mask[:, 1:], jnp.ones_like(mask[:, :1])], axis=1)
            return (window, mask), nxt

    state = (state0, state1)
    if prompt is not None and prompt.shape[-1] > 0:  # (the kernel's later calls pass none)
        state = _start(params, prompt, cfg, mode, 0)
    state, out = jax.lax.scan(body, state, keys)
    return state, out.T


def _rows(prompt, num_samples):
    prompt = jnp.asarray(prompt, jnp.int32)
    single = prompt.ndim == 1 and num_samples is None
    if prompt.ndim == 1:
        prompt = jnp.broadcast_to(prompt, (num_samples or 1, prompt.shape[0]))
    return prompt, single


def check_options(cfg: ModelConfig, length: int, temperature, top_k, top_p, mode: str) -> None:
    """Refuses out-of-range sampling options with a ValueError before anything is traced.
    Traced values (inside a caller's jit) cannot be read, so they are not checked."""

    def concrete(x):
        if isinstance(x, jax.core.Tracer):
            return None
        return None if x is None else np.asarray(x, np.float64)

    if length < 1:
        raise ValueError(f"length must be at least 1, not {length}")
    if mode not in ("stateful", "window"):
        raise ValueError(f"mode must be 'stateful' or 'window', not {mode!r}")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {cfg.vocab_size}")
    t, p = concrete(temperature), concrete(top_p)
    if t is not None and not (np.isfinite(t) & (t >= 0)).all():
        raise ValueError(f"temperature must be finite and at least 0, not {temperature}")
    if p is not None and not ((p > 0) & (p <= 1)).all():  # NaN fails both
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")


def sample(
    params: dict,
    key: jax.Array,
    prompt: jax.Array,
    *,
    cfg: ModelConfig,
    length: int,
    temperature=1.0,
    top_k: int | None = None,
    top_p=None,
    num_samples: int | None = None,
    mode: str = "stateful",
    seq_length: int = 100,
) -> jax.Array:
    """Checks the options (see `check_options`), then runs the jitted sampler, `_sample`
    (`sample.lower` and `sample.trace` are its own)."""
    check_options(cfg, length, temperature, top_k, top_p, mode)
    return _sample(
        params,
        key,
        prompt,
        cfg=cfg,
        length=length,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
        mode=mode,
        seq_length=seq_length,
    )


@partial(
    jax.jit,
    static_argnames=("cfg", "length", "top_k", "num_samples", "mode", "seq_length"),
)
def _sample(
    params: dict,
    key: jax.Array,
    prompt: jax.Array,
    *,
    cfg: ModelConfig,
    length: int,
    temperature=1.0,
    top_k: int | None = None,
    top_p=None,
    num_samples: int | None = None,
    mode: str = "stateful",
    seq_length: int = 100,
) -> jax.Array:
    """Generates `length` ids after `prompt`.

    prompt: [P] ids, or [N, P] for N prompts at once. With `num_samples` a 1-D prompt is
    continued num_samples times independently and the result is [num_samples, length];
    otherwise the output has the prompt's batch shape: [length] or [N, length].
    mode: `stateful` runs the prompt once, then one cell step per character;
    `window` re-reads the last `seq_length` characters for each new one (the tutorial's
    way, matching models trained on windows). A prompt shorter than the window is left-padded
    with masked positions that leave the LSTM state untouched.
    """
    prompt, single = _rows(prompt, num_samples)
    keys = jax.random.split(key, length)
    rows = prompt.shape[0]
    if mode == "stateful" and _kernel(cfg, rows, top_k, top_p):
        # the CPU kernel reads the prompt too (and the scan, off the CPU)
        state = (init_carry(cfg, rows), jnp.zeros((rows, cfg.vocab_size), jnp.float32))
        _, out = _steps(params, state, keys, cfg, mode, temperature, top_k, top_p, prompt)
    else:
        state = _start(params, prompt, cfg, mode, seq_length)
        _, out = _steps(params, state, keys, cfg, mode, temperature, top_k, top_p)
    return out[0] if single else out


sample.__doc__ = f"{sample.__doc__}\n{_sample.__doc__}"
sample.lower, sample.trace, sample.eval_shape = _sample.lower, _sample.trace, _sample.eval_shape
sample._cache_size = _sample._cache_size  # for tests that a new value does not recompile


@partial(jax.jit, static_argnames=("cfg", "mode", "seq_length"))
def _start_jit(params, prompt, *, cfg, mode, seq_length):
    return _start(params, prompt, cfg, mode, seq_length)


@partial(jax.jit, static_argnames=("cfg", "mode", "top_k"))
def _chunk_jit(params, state, keys, temperature, top_p, *, cfg, mode, top_k):
    return _steps(params, state, keys, cfg, mode, temperature, top_k, top_p)


def sample_stream(
    params: dict,
    key: jax.Array,
    prompt: jax.Array,
    *,
    cfg: ModelConfig,
    length: int,
    temperature=1.0,
    top_k: int | None = None,
    top_p=None,
    num_samples: int | None = None,
    mode: str = "stateful",
    seq_length: int = 100,
    chunk: int = 64,
) -> Iterator[jax.Array]:
    """`sample`, delivered `chunk` characters at a time (each chunk one jitted lax.scan),
    so that text can be shown as it is made. The concatenated chunks equal `sample`'s
    output for the same arguments: the per-character keys are the same."""
    check_options(cfg, length, temperature, top_k, top_p, mode)
    prompt, single = _rows(prompt, num_samples)
    state = _start_jit(params, prompt, cfg=cfg, mode=mode, seq_length=seq_length)
    keys = jax.random.split(key, length)
    for begin in range(0, length, chunk):
        state, ids = _chunk_jit(
            params,
            state,
            keys[begin : begin + chunk],
            temperature,
            top_p,
            cfg=cfg,
            mode=mode,
            top_k=top_k,
        )
        yield ids[0] if single else ids
