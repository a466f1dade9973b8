"""Each LSTM backend against the JAX path it stands in for, on every shipped config's shapes,
same run: what `model.impl = "auto"` must be shown before it picks a kernel.

    python benchmarks/bench_backends.py [--reps 5] [--load] [--configs fast small ...]
    JAXCHAR_NATIVE=avx512 python benchmarks/bench_backends.py  # the AVX-512 variant on a BF16 CPU

Per config: a training step (forward and backward of the loss, the config's batch and
window) with the C++ recurrences (`native`) against the fused layer's lax.scan loops
(`fused`), and stateful generation of 500 characters at 1 and 64 rows with the C++ loop
against the lax.scan loop; then what auto picks here. `--load` runs a competing CPU-bound
process on every core throughout (a shared machine). Medians of interleaved repetitions
after a warm-up; compile time apart. Writes benchmarks/results/backends_<variant>[_load].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

VOCAB, GEN_LENGTH = 45, 500
ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _config(name: str):
    from jaxchar.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.toml"))
    return cfg, dataclasses.replace(cfg.model, vocab_size=VOCAB)


def train_runner(name: str, impl: str):
    import jax
    import jax.numpy as jnp

    from jaxchar.model import apply, init_params

    cfg, model = _config(name)
    model = dataclasses.replace(model, impl=impl)
    params = init_params(model, jax.random.PRNGKey(0))
    ids = jax.random.randint(
        jax.random.PRNGKey(1), (cfg.train.batch_size, cfg.data.seq_length), 0, VOCAB
    )
    last_only = cfg.data.objective == "window"

    @jax.jit
    def step(params, key):
        def loss(p):
            logits, _ = apply(p, model, ids, train=True, key=key, last_only=last_only)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

        return jax.value_and_grad(loss)(params)

    counter = iter(range(10**9))
    return lambda: jax.block_until_ready(step(params, jax.random.PRNGKey(next(counter))))


def sample_runner(name: str, impl: str, rows: int):
    import jax

    from jaxchar.model import init_params
    from jaxchar.sampling import sample

    _, model = _config(name)
    model = dataclasses.replace(model, impl=impl)
    params = init_params(model, jax.random.PRNGKey(0))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (rows, 100), 0, VOCAB)
    counter = iter(range(10**9))

    def run():
        key = jax.random.PRNGKey(next(counter))
        out = sample(params, key, prompt, cfg=model, length=GEN_LENGTH, temperature=0.8)
        jax.block_until_ready(out)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--load", action="store_true", help="a busy process on every core")
    parser.add_argument("--configs", nargs="+", default=["small", "stacked", "fast", "shakespeare"])
    args = parser.parse_args()

    import jax

    from jaxchar.lstm import native, select

    variant = native.variant()[0]
    if variant is None:
        sys.exit(f"no kernel variant loads here: {native.variant()[1]}")
    load = common.Load(os.cpu_count() or 1) if args.load else None
    results, rows = {}, []
    if load:
        load.__enter__()
    try:
        for name in args.configs:
            cases = [
                ("train step", "ms", train_runner, ("native", "fused"), ()),
                ("sample 1 row", "chars/s", sample_runner, ("native", "scan"), (1,)),
                ("sample 64 rows", "chars/s", sample_runner, ("native", "scan"), (64,)),
            ]
            for case, unit, build, impls, extra in cases:
                runners = {impl: build(name, impl, *extra) for impl in impls}
                compile_s = {impl: common.timed(fn) for impl, fn in runners.items()}
                times = common.interleave(runners, args.reps, warmup=1)
                med = {impl: statistics.median(t) for impl, t in times.items()}
                chars = GEN_LENGTH * (extra[0] if extra else 0)
                kernel, other = impls
                speedup = med[other] / med[kernel]  # > 1: the kernel is faster
                _, model = _config(name)
                purpose = "layer" if case == "train step" else "sample"
                auto = select(
                    model, purpose, platform=jax.default_backend(), rows=extra[0] if extra else 1
                )
                figure = (
                    (lambda s: f"{1000 * s:.1f}")
                    if unit == "ms"
                    else (lambda s, chars=chars: f"{chars / s:,.0f}")
                )
                rows.append(
                    [
                        name,
                        case,
                        f"{figure(med[kernel])} {unit}",
                        f"{figure(med[other])} {unit} ({other})",
                        f"{speedup:.2f}x",
                        auto.backend,
                    ]
                )
                results.setdefault(name, {})[case] = {
                    "kernel": common.stats(times[kernel]),
                    other: common.stats(times[other]),
                    "kernel_speedup": speedup,
                    "compile_s": compile_s,
                    "auto": auto.backend,
                }
    finally:
        if load:
            load.__exit__(None, None, None)
    title = f"variant {variant}" + (", a busy process on every core" if args.load else "")
    print(title)
    print(
        common.table(rows, ["config", "case", "kernel", "JAX path", "kernel speedup", "auto picks"])
    )
    file = f"backends_{variant}" + ("_load" if args.load else "")
    path = common.save(
        file, {"variant": variant, "load": args.load, "reps": args.reps, "results": results}
    )
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
