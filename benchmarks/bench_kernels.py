"""The training step's recurrence, every way jaxchar can run it on this device, same run:
the fused layer as shipped, its cheap levers (unrolled loops, bfloat16 products) and the
Pallas kernels (float32 and bfloat16 products).

    python benchmarks/bench_kernels.py [--configs small stacked fast] [--reps 10] [--tag T]
    XLA_FLAGS=--xla_gpu_enable_command_buffer=... python benchmarks/bench_kernels.py --tag cmdbuf

Per config, each variant's whole training step (forward, backward, Adam) is timed per call
of `steps_per_call` steps, interleaved (A B C A B C ...) after a warm-up, medians of `--reps`;
the ratio is the shipped variant's (fused, unroll 1, float32) median over each variant's, so
> 1 is faster. The Pallas kernels are timed on NVIDIA GPUs only (elsewhere they would run in
Pallas's interpreter: a test, not a timing). XLA flags such as command buffers for loops
must be set before JAX starts, so they are a second run with the same variants (`--tag`
names its results file). Writes benchmarks/results/kernels[_TAG].json (_gpu on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import common

# name -> model overrides; the first is the baseline the others are compared with
VARIANTS = {
    "fused": {},
    "fused unroll 2": {"unroll": 2},
    "fused unroll 4": {"unroll": 4},
    "fused unroll 8": {"unroll": 8},
    "fused bf16": {"dtype": "bfloat16"},
    "pallas": {"impl": "pallas"},
    "pallas bf16": {"impl": "pallas", "dtype": "bfloat16"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small", "stacked", "fast"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tag", default="", help="a suffix for the results file")
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    args = parser.parse_args()

    import jax
    from bench_train import jaxchar_runner

    from jaxchar.config import load_config, override
    from jaxchar.corpus import load_corpus
    from jaxchar.train import with_vocab

    gpu = jax.default_backend() == "gpu"
    results, rows = {}, []
    for name in args.configs:
        base = override(load_config(name), args.set)
        corpus = load_corpus(common.DATA / "wonderland.txt", base.data)
        base = with_vocab(base, len(corpus.vocab))
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, impl="fused"))
        runners, per_call, compile_s = {}, {}, {}
        for variant, changes in VARIANTS.items():
            if changes.get("impl") == "pallas" and not gpu:
                print(f"[{name}] skipping {variant}: Pallas compiles for GPUs", file=sys.stderr)
                continue
            cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, **changes))
            try:
                fn, k = jaxchar_runner(cfg, corpus.train_ids)
                compile_s[variant] = common.timed(fn)
            except Exception as err:  # a variant that fails to compile here is a finding
                print(f"[{name}] {variant} failed: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            runners[variant], per_call[variant] = fn, k
        times = common.interleave(runners, args.reps, warmup=1)
        entry = {"config": dataclasses.asdict(base)}
        for variant, samples in times.items():
            entry[variant] = {
                **common.stats([s / per_call[variant] for s in samples]),
                "compile_s": compile_s[variant],
            }
        shipped = entry.get("fused", {}).get("median")
        for variant in runners:
            e = entry[variant]
            e["speedup_vs_fused"] = shipped / e["median"] if shipped else None
            rows.append(
                [
                    name,
                    variant,
                    f"{e['median'] * 1e3:.3f}",
                    f"{e['min'] * 1e3:.3f}",
                    f"{e['compile_s']:.1f}",
                    f"{e['speedup_vs_fused']:.2f}x" if shipped else "-",
                ]
            )
        results[name] = entry
    header = ["config", "variant", "median ms/step", "min", "compile s", "vs fused"]
    print(common.table(rows, header))
    payload = {"reps": args.reps, "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results}
    path = common.save("kernels" + (f"_{args.tag}" if args.tag else ""), payload)
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
