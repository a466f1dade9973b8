"""Where the time goes: XLA's own per-operation trace of a train step or a sampling step.

    python benchmarks/profile_step.py train [--config small] [--calls 2] [--set key=value]
    python benchmarks/profile_step.py generate [--batch 64] [--length 1000]

Compiles the jitted train call (`train.steps_per_call` steps) or the stateful sampler, runs
it under `jax.profiler` with XLA's per-operation trace events on, maps every event to its
instruction in the compiled program, and prints the time per train step (or per generated
character) by kind of work: matrix products, elementwise fusions (gate math, loss,
optimizer), copies and fills, reductions; then the costliest operations. This is how the
figures on where the step's time goes in docs/benchmarks.md were found; it measures, it does
not compare, so it has no peer (bench_train.py and bench_generate.py do). Writes
benchmarks/results/profile_train_<config>.json or profile_generate_batch<N>.json (with
_gpu on a GPU).

On the CPU, matrix products that XLA hands to Eigen run asynchronously and their time shows
up as "not attributed"; the YNNPACK products that this JAX uses for the recurrent steps are
traced in full. Operations that run at the same time (XLA runs independent ones
concurrently) each count their whole span. On a GPU the kernels' time is taken from the
device's events, matched to operations by their `hlo_op` label, with CUDA command buffers
off (they hide that label), so the GPU step profiled is slightly slower than a normal one.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

MATMUL = "matrix products"
ELEMENTWISE = "elementwise fusions"
MOVES = "copies, fills, slices"
REDUCE = "reductions"
OTHER = "other"
CONTAINERS = {"while", "conditional", "call", "async-start", "async-done"}
IGNORED = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all"}
_MOVE_OPS = {
    "copy",
    "concatenate",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "pad",
    "transpose",
    "broadcast",
    "reshape",
    "iota",
}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_HEAD = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) ")


def _kind(opcodes: set[str], text: str) -> str:
    """The kind of work done by one instruction (or a fusion's body, given its opcodes)."""
    if opcodes & {"dot", "convolution"}:
        return MATMUL
    if "custom-call" in opcodes:
        target = text.lower()
        return MATMUL if any(w in target for w in ("gemm", "cublas", "matmul", "rnn")) else OTHER
    if opcodes & {"reduce", "reduce-window", "sort", "scatter"}:
        return REDUCE
    if opcodes and opcodes <= _MOVE_OPS | IGNORED:
        return MOVES
    return ELEMENTWISE if opcodes - IGNORED else OTHER


def classify(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind of work, for every instruction of a compiled HLO module that
    does work of its own (containers such as while loops are left out: their bodies' events
    are counted instead)."""
    bodies: dict[str, set[str]] = collections.defaultdict(set)
    lines: list[tuple[str, str, str]] = []  # (name, opcode, line)
    current = ""
    for line in hlo_text.splitlines():
        head = _HEAD.match(line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
            continue
        m = _INSTR.match(line)
        if m:
            bodies[current].add(m.group(2))
            lines.append((m.group(1), m.group(2), line))
    kinds = {}
    for name, opcode, line in lines:
        if opcode in CONTAINERS or opcode in IGNORED:
            continue
        if opcode == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", line)
            kinds[name] = _kind(bodies.get(called.group(1), set()) if called else set(), line)
        else:
            kinds[name] = _kind({opcode}, line)
    return kinds


def aggregate(events: list[dict], kinds: dict[str, str], device_only: bool) -> dict:
    """Sums complete ('X') trace events by instruction: {name: [count, microseconds]}.
    device_only keeps the events of accelerator processes (a GPU trace also holds the
    host's launch events under the same names)."""
    pids = None
    if device_only:
        pids = {
            e["pid"]
            for e in events
            if e.get("ph") == "M"
            and e.get("name") == "process_name"
            and re.search(r"/device:(GPU|TPU)", str(e.get("args", {}).get("name", "")))
        }
    per_op: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") != "X" or (pids is not None and e.get("pid") not in pids):
            continue
        name = (e.get("args") or {}).get("hlo_op", e.get("name", ""))
        if name in kinds:
            entry = per_op.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += float(e.get("dur", 0.0))
    return per_op


def _trace_events(directory: str) -> list[dict]:
    files = sorted(Path(directory).rglob("*.trace.json.gz"))
    if not files:
        raise SystemExit("error: jax.profiler wrote no trace; is the profiler available?")
    with gzip.open(files[-1]) as f:
        data = json.loads(f.read())
    return data["traceEvents"] if isinstance(data, dict) else data


def _train_target(args):
    import jax

    from jaxchar.config import load_config, override
    from jaxchar.corpus import load_corpus
    from jaxchar.train import create_state, make_optimizer, run_steps, with_vocab, zero_totals

    cfg = override(load_config(args.config), args.set)
    corpus = load_corpus(common.DATA / "wonderland.txt", cfg.data)
    cfg = with_vocab(cfg, len(corpus.vocab))
    tx = make_optimizer(cfg.train, 10_000)
    state, totals = create_state(cfg, tx, jax.random.PRNGKey(0)), zero_totals()
    ids = jax.device_put(corpus.train_ids)
    k = cfg.train.steps_per_call
    compiled = run_steps.lower(state, totals, ids, 0, 0, cfg=cfg, tx=tx, n=k).compile()
    box = {"state": state, "totals": totals, "first": 0}

    def run():
        box["state"], box["totals"], losses = compiled(
            box["state"], box["totals"], ids, 0, box["first"]
        )
        box["first"] += k
        losses.block_until_ready()

    return compiled.as_text(), run, k, "train step", {"config": args.config, "sets": args.set}


def _generate_target(args):
    import jax
    from bench_generate import HIDDEN, SEQ, VOCAB

    from jaxchar.config import ModelConfig
    from jaxchar.model import init_params
    from jaxchar.sampling import sample

    # the tutorial's small model with random weights, as bench_generate.py measures it
    cfg = ModelConfig(vocab_size=VOCAB, layers=1, hidden=HIDDEN, encoding="scaled")
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (args.batch, SEQ), 0, VOCAB)
    key = jax.random.PRNGKey(2)
    compiled = sample.lower(
        params, key, prompt, cfg=cfg, length=args.length, temperature=0.0, mode="stateful"
    ).compile()

    def run():
        compiled(params, key, prompt, temperature=0.0).block_until_ready()

    what = {"batch": args.batch, "length": args.length, "prompt": SEQ}
    return compiled.as_text(), run, args.length, "character", what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["train", "generate"])
    parser.add_argument("--config", default="small", help="train: a config name or file")
    parser.add_argument("--set", action="append", default=[], help="train: section.key=value")
    parser.add_argument("--calls", type=int, default=2, help="traced calls after a warm-up")
    parser.add_argument("--batch", type=int, default=64, help="generate: independent samples")
    parser.add_argument("--length", type=int, default=1000, help="generate: new characters")
    parser.add_argument("--top", type=int, default=12, help="costliest operations to list")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()

    # XLA's CPU runtime emits one trace event per operation only with the first flag; on a
    # GPU, kernels replayed from a CUDA command buffer lose the operation they belong to
    # (openxla/xprof#3070), so the second turns command buffers off. Both must be set
    # before JAX starts.
    for flag in ("--xla_cpu_enable_xprof_traceme=true", "--xla_gpu_enable_command_buffer="):
        if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    target = _train_target if args.what == "train" else _generate_target
    hlo, run, per_call, unit, setup = target(args)
    kinds = classify(hlo)
    run()  # warm-up: first-touch page faults and thread start-up stay out of the trace
    untraced = []
    for _ in range(args.calls):
        untraced.append(common.timed(run))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            began = time.perf_counter()  # inside: trace start and stop are not the program's
            for _ in range(args.calls):
                run()
            traced_wall = time.perf_counter() - began
        events = _trace_events(tmp)
    per_op = aggregate(events, kinds, device_only=jax.default_backend() != "cpu")
    if not per_op:
        raise SystemExit("error: the trace holds no per-operation events for this program")

    units = args.calls * per_call
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, (_, us) in per_op.items():
        by_kind[kinds[name]] += us
    attributed = sum(by_kind.values())
    wall_us = statistics.median(untraced) / per_call * 1e6  # per unit, without the profiler
    traced_us = traced_wall / units * 1e6
    # a train step takes milliseconds, a character microseconds
    div, u = (1e3, "ms") if args.what == "train" else (1.0, "us")
    rows = [
        [kind, f"{us / units / div:,.2f}", f"{100 * us / attributed:.0f}%"]
        for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])
    ]
    rest = (traced_us - attributed / units) / div
    rows.append(["not attributed (waits, launches, async products)", f"{rest:,.2f}", ""])
    print(
        f"{args.what} ({jax.default_backend()}): {wall_us / div:,.2f} {u} per {unit} without "
        f"the profiler, {traced_us / div:,.2f} {u} with it; {units} {unit}s traced"
    )
    print(common.table(rows, ["kind of work", f"{u} per {unit}", "share of traced ops"]))
    top = sorted(per_op.items(), key=lambda kv: -kv[1][1])[: args.top]
    top_rows = [
        [name, kinds[name], f"{count / units:g}", f"{us / count:,.1f}", f"{us / units / div:,.2f}"]
        for name, (count, us) in top
    ]
    print()
    header = ["operation", "kind", f"runs per {unit}", "us per run", f"{u} per {unit}"]
    print(common.table(top_rows, header))
    if not args.no_save:
        label = Path(args.config).stem if args.what == "train" else f"batch{args.batch}"
        path = common.save(
            f"profile_{args.what}_{label}",
            {
                "setup": setup,
                "unit": unit,
                "units_traced": units,
                "us_per_unit_untraced": wall_us,
                "us_per_unit_traced": traced_us,
                "us_per_unit_by_kind": {k: v / units for k, v in by_kind.items()},
                "top": {name: {"count": c, "us": us, "kind": kinds[name]} for name, (c, us) in top},
            },
        )
        print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
