"""Sampling: logits filters, one draw, and the jitted generation loop over a decoder.

`sample` is a pure function of (params, key, prompt) plus static settings, so research code
can jit, vmap or embed it. The loop over characters is `lax.scan`; `temperature` and
`top_p` are traced (new values do not recompile), `length`, `top_k` and the config are
static. Temperature 0 means argmax, as in the tutorial; `top_k` 0 and `top_p` 1 mean off,
as in the config, the CLI and the server (None is taken to mean the same).

The loop drives a decoder (jaxchar.decoders: `Stateful` reads the prompt once, then one
cell step per character; `Window` re-reads the last window), as beam search and the serving
engine do. The stateful loop runs as a generation kernel where jaxchar.lstm.backends
chooses one (the C++ loop on CPUs, the Pallas loop on NVIDIA GPUs; the same ids for the
same keys) and as the lax.scan below everywhere else.
`sample_logits` is the one draw: `sample`, the engine (per-row settings) and tests with a
fake logits function all use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxchar.config import ModelConfig
from jaxchar.decoders import MODES, Decoder, Stateful, decoder
from jaxchar.lstm import generation, native, pallas, select
from jaxchar.model import for_inference

NEG = -1e30  # stands for -inf without creating NaNs in softmax


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of each row [..., vocab]; the rest become -inf."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG, logits)


def top_p_filter(logits: jax.Array, p) -> jax.Array:
    """Keeps the smallest set of most likely ids whose probability reaches p (nucleus)."""
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each id
    kept = before < p  # the first id is always kept
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, NEG, logits)


def static_off(top_k, top_p):
    """(top_k, top_p) with a filter that is off where it is known before tracing (top_k 0,
    a Python top_p of 1, or None) as None: no filter is traced for it."""
    if top_k is None or (isinstance(top_k, int) and top_k == 0):
        top_k = None
    if top_p is None or (isinstance(top_p, int | float) and top_p == 1):
        top_p = None
    return top_k, top_p


def sample_logits(
    key: jax.Array, logits: jax.Array, temperature=1.0, top_k=None, top_p=None
) -> jax.Array:
    """One id per row of logits [..., vocab]: argmax when temperature is 0, else a draw
    from softmax(logits / temperature) restricted by top-k, then top-p.

    Each setting is one value for every row or one per row (an array of the rows' shape,
    as the serving engine passes them): `temperature` and `top_p` may be traced; `top_k` is
    a static int (0: off) or an int array of the rows' shape (0: off there); top_p 1 keeps
    every id."""
    top_k, top_p = static_off(top_k, top_p)
    logits = logits.astype(jnp.float32)
    t = jnp.asarray(temperature, jnp.float32)

    def per_row(x):  # a setting as [..., 1], to broadcast over the vocabulary
        return jnp.asarray(x)[..., None]

    def draw():
        scaled = logits / jnp.maximum(per_row(t), 1e-6)
        if isinstance(top_k, int):
            scaled = top_k_filter(scaled, top_k)
        elif top_k is not None:  # per row, traced: the k-th largest by a sort
            k = jnp.broadcast_to(per_row(top_k), (*logits.shape[:-1], 1))
            ordered = jnp.sort(scaled, axis=-1)[..., ::-1]
            kth = jnp.take_along_axis(ordered, jnp.clip(k, 1, logits.shape[-1]) - 1, axis=-1)
            scaled = jnp.where((k > 0) & (scaled < kth), NEG, scaled)
        if top_p is not None:
            p = per_row(top_p)
            scaled = jnp.where(p < 1, top_p_filter(scaled, p), scaled)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    if t.ndim:  # per-row temperatures: both, then each row's
        return jnp.where(t > 0, draw(), greedy())
    # a cond, not a where: at temperature 0 the random draw (most of a step's cost at batch
    # 64, measured in benchmarks/bench_generate.py) is skipped, while temperature stays traced
    return jax.lax.cond(t > 0, draw, greedy)


def _kernel(cfg: ModelConfig, rows: int, top_k, top_p) -> str | None:
    """The kernel that runs the stateful loop of `rows` rows ("native": C++ on CPUs;
    "pallas": NVIDIA GPUs, interpreted on CPUs), or None (jaxchar.lstm.backends's choice)."""
    filtered = top_k is not None or top_p is not None
    choice = select(cfg, "sample", platform=jax.default_backend(), rows=rows, filtered=filtered)
    return choice.kernel


def _steps(params, state, keys, dec: Decoder, temperature, top_k, top_p, prompt=None):
    """One new character per key (keys [n, 2]): returns (state, ids [rows, n]). With `prompt`
    [rows, P] (stateful, `state` the empty one) the prompt is read first."""
    cfg, rows = dec.cfg, state[1].shape[0]
    kernel = _kernel(cfg, rows, top_k, top_p) if isinstance(dec, Stateful) else None
    if kernel is None:
        return _scan(params, state, keys, temperature, prompt, dec, top_k, top_p)

    def scan(params, carry, logits, keys, temperature, prompt):
        return _scan(params, (carry, logits), keys, temperature, prompt, dec, top_k, top_p)

    def run(generate):
        def call(state):
            return generate(
                params,
                cfg,
                *state,
                keys,
                temperature,
                prompt,
                fallback=scan,  # under vmap, where the kernel cannot take the rows
                fits=lambda rows: _kernel(cfg, rows, top_k, top_p) == kernel,
            )

        return call

    def pallas_loop(interpret: bool):
        return partial(
            generation.generate, partial(pallas.sampling.generate_call, interpret=interpret)
        )

    if kernel == "native":
        branches = {"cpu": run(native.generate)}
    else:  # compiled for NVIDIA GPUs, interpreted on CPUs (forced there, for tests)
        branches = {"cuda": run(pallas_loop(False)), "cpu": run(pallas_loop(True))}

    def elsewhere(state):
        return scan(params, *state, keys, temperature, prompt)

    return jax.lax.platform_dependent(state, **branches, default=elsewhere)


def _scan(params, state, keys, temperature, prompt, dec: Decoder, top_k, top_p):
    """The lax.scan loop over the decoder, one character a step."""
    draw = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    def body(state, k):
        nxt = draw(k, dec.logits(params, state))
        return dec.advance(params, state, nxt), nxt

    if prompt is not None and prompt.shape[-1] > 0:  # (the kernel's later calls pass none)
        state = dec.start(params, prompt)
    state, out = jax.lax.scan(body, state, keys)
    return state, out.T


@partial(jax.jit, static_argnames=("dec", "length", "top_k"))
def decode(
    params,
    key: jax.Array,
    prompt: jax.Array,
    *,
    dec,
    length: int,
    temperature=1.0,
    top_k=None,
    top_p=None,
) -> jax.Array:
    """ids [rows, length] drawn after prompt [rows, P] by any decoder `dec` (an object with
    `start`, `logits` and `advance`, as jaxchar.decoders has): the loop `sample` runs,
    with the same per-character keys, open to a decoder of one's own (a fake one whose
    logits are known tests this loop apart from any model)."""
    keys = jax.random.split(key, length)
    state = dec.start(params, jnp.asarray(prompt, jnp.int32))
    return _scan(params, state, keys, temperature, None, dec, top_k, top_p)[1]


def rows_of(prompt, num_samples: int | None = None) -> tuple[jax.Array, bool]:
    """prompt [P] or [N, P] as [rows, P] int32 (a 1-D prompt repeated num_samples times),
    and whether the caller gave one prompt and no num_samples (then it gets [length])."""
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
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if top_k is not None and not 0 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be between 0 (off) and the vocabulary size {cfg.vocab_size}")
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
    top_k: int = 0,
    top_p=1.0,
    num_samples: int | None = None,
    mode: str = "stateful",
    seq_length: int = 100,
) -> jax.Array:
    """Checks the options (see `check_options`), then runs the jitted sampler, `_sample`
    (`sample.lower` and `sample.trace` are its own: they take None for an unused filter)."""
    check_options(cfg, length, temperature, top_k, top_p, mode)
    top_k, top_p = static_off(top_k, top_p)
    return _sample(
        params,
        key,
        prompt,
        cfg=for_inference(cfg),  # configs that differ only in dropout share the program
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
    prompt, single = rows_of(prompt, num_samples)
    keys = jax.random.split(key, length)
    rows, dec = prompt.shape[0], decoder(cfg, mode, seq_length)
    if isinstance(dec, Stateful) and _kernel(cfg, rows, top_k, top_p):
        # the kernel reads the prompt too (and the scan, where the kernel does not run)
        _, out = _steps(params, dec.empty(rows), keys, dec, temperature, top_k, top_p, prompt)
    else:
        state = dec.start(params, prompt)
        _, out = _steps(params, state, keys, dec, temperature, top_k, top_p)
    return out[0] if single else out


sample.__doc__ = f"{sample.__doc__}\n{_sample.__doc__}"
sample.lower, sample.trace, sample.eval_shape = _sample.lower, _sample.trace, _sample.eval_shape
sample._cache_size = _sample._cache_size  # for tests that a new value does not recompile


@partial(jax.jit, static_argnames=("dec",))
def start(params, prompt, mask=None, *, dec: Decoder):
    """`dec.start`, jitted: the state after prompt [rows, P] (`mask` False on padding)."""
    return dec.start(params, prompt, mask)


@partial(jax.jit, static_argnames=("dec", "top_k"))
def _chunk_jit(params, state, keys, temperature, top_p, *, dec, top_k):
    return _steps(params, state, keys, dec, temperature, top_k, top_p)


def sample_stream(
    params: dict,
    key: jax.Array,
    prompt: jax.Array,
    *,
    cfg: ModelConfig,
    length: int,
    temperature=1.0,
    top_k: int = 0,
    top_p=1.0,
    num_samples: int | None = None,
    mode: str = "stateful",
    seq_length: int = 100,
    chunk: int = 64,
) -> Iterator[jax.Array]:
    """`sample`, delivered `chunk` characters at a time (each chunk one jitted lax.scan),
    so that text can be shown as it is made. The concatenated chunks equal `sample`'s
    output for the same arguments: the per-character keys are the same."""
    check_options(cfg, length, temperature, top_k, top_p, mode)
    top_k, top_p = static_off(top_k, top_p)
    prompt, single = rows_of(prompt, num_samples)
    dec = decoder(cfg, mode, seq_length)
    state = start(params, prompt, dec=dec)
    keys = jax.random.split(key, length)
    for begin in range(0, length, chunk):
        state, ids = _chunk_jit(
            params, state, keys[begin : begin + chunk], temperature, top_p, dec=dec, top_k=top_k
        )
        yield ids[0] if single else ids
