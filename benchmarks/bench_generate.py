"""Generation speed: characters per second for 1,000 new characters, same run, same model.

    python benchmarks/bench_generate.py [--length 1000] [--reps 3] [--batches 1 64]
                                        [--dtype float32|bfloat16]
                                        [--peers tutorial torch native] [--load]
                                        [--pallas]

(a) the tutorial's method: Keras `predict` on the whole 100-character window for each new
    character; (b) jaxchar window mode (the same computation, jitted as one lax.scan);
(c) jaxchar stateful mode (prompt once, then one cell step per character; on a CPU, up to
64 rows, that is jaxchar's C++ kernel, jaxchar/csrc/native.cc, where it was built, and the
lax.scan it replaces is timed beside it with model.impl = "scan"); (d) a PyTorch
stateful loop (nn.LSTM with its hidden state, one step per character, no_grad); and
(e) the kernel's loop stand-alone (benchmarks/native_loop.cc, built here with g++
where there is one), with no JAX or XLA around it: what the JAX call adds to (c). All run
the tutorial's small model (LSTM-256, scaled input, 45 characters) with random weights:
speed does not depend on the weights. Batch 1 and batch 64 independent samples; compile
time reported apart. On a GPU the PyTorch loop runs on CUDA, and `--pallas` adds jaxchar's
Pallas sampling kernel (model.impl = "pallas", jaxchar/lstm/pallas/sampling.py). Writes
benchmarks/results/generate.json (generate_gpu.json on a GPU).

`--load` runs a competing CPU-bound process on every core throughout (results in
generate_load.json): jaxchar's default path there must be no slower than its lax.scan.

With `--dtype bfloat16` every tool runs its products in bfloat16 on float32 weights:
jaxchar with model.dtype = "bfloat16", PyTorch under `torch.autocast`, Keras with the
`mixed_bfloat16` policy (results in generate_bfloat16.json).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

VOCAB, HIDDEN, SEQ = 45, 256, 100


def jaxchar_runner(mode: str, batch: int, length: int, dtype: str, impl: str = "auto"):
    import jax

    from jaxchar.config import ModelConfig
    from jaxchar.model import init_params
    from jaxchar.sampling import sample

    cfg = ModelConfig(
        vocab_size=VOCAB, layers=1, hidden=HIDDEN, encoding="scaled", dtype=dtype, impl=impl
    )
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (batch, SEQ), 0, VOCAB)
    counter = iter(range(10**9))

    def run():
        key = jax.random.PRNGKey(next(counter))
        out = sample(
            params, key, prompt, cfg=cfg, length=length, temperature=0.0, mode=mode, seq_length=SEQ
        )
        out.block_until_ready()

    return run


def torch_runner(batch: int, length: int, dtype: str):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    device = common.torch_device()
    lstm = torch.nn.LSTM(1, HIDDEN, batch_first=True).to(device)
    head = torch.nn.Linear(HIDDEN, VOCAB).to(device)
    prompt = torch.randint(0, VOCAB, (batch, SEQ)).to(device)
    half = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    @torch.no_grad()
    @half
    def run():
        out, state = lstm((prompt.float() / VOCAB).unsqueeze(-1))
        nxt = head(out[:, -1]).argmax(-1)
        chars = []
        for _ in range(length):
            chars.append(nxt)
            out, state = lstm((nxt.float() / VOCAB).view(batch, 1, 1), state)
            nxt = head(out[:, -1]).argmax(-1)
        torch.stack(chars, 1).cpu().numpy()

    return run


HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE_SOURCE = os.path.join(HERE, "native_loop.cc")
KERNEL_HEADERS = os.path.join(HERE, os.pardir, "jaxchar", "csrc")  # lstm_loop.h, jaxchar's loop


def build_native(directory: str) -> str:
    """Compiles benchmarks/native_loop.cc into `directory`; ImportError where it cannot."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise ImportError(f"no g++ to build {NATIVE_SOURCE}")
    binary = os.path.join(directory, "native_loop")
    flags = ["-O3", "-march=native", "-std=c++20", "-pthread", f"-I{KERNEL_HEADERS}"]
    if subprocess.run([compiler, *flags, NATIVE_SOURCE, "-o", binary]).returncode != 0:
        raise ImportError(f"{compiler} could not build {NATIVE_SOURCE}")
    return binary


def native_threads() -> int:
    """A power of two no larger than the cores (at most 16): the loop splits 256 units."""
    return 1 << min((os.cpu_count() or 1).bit_length() - 1, 4)


def native_runner(length: int, batch: int):
    """benchmarks/native_loop.cc as a child process that generates `length` characters for
    `batch` rows per line it reads: one build, then a pipe round trip and a wake-up of its
    threads around each run (~0.2 ms, measured with a 1-character run)."""
    binary = build_native(tempfile.mkdtemp(prefix="jaxchar-bench-"))
    command = [binary, str(native_threads()), str(length), str(batch)]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run():
        child.stdin.write("run\n")
        child.stdin.flush()
        if not child.stdout.readline().startswith("ok"):
            raise RuntimeError(f"{NATIVE_SOURCE} stopped answering")

    return run


def keras_runner(batch: int, length: int, dtype: str):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
    model = keras.Sequential(
        [
            keras.Input((SEQ, 1)),
            keras.layers.LSTM(HIDDEN),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(VOCAB, activation="softmax"),
        ]
    )
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, VOCAB, (batch, SEQ)).tolist()

    def run():
        window = [list(p) for p in pattern]
        for _ in range(length):  # the tutorial's loop, batched over rows
            x = np.reshape(window, (batch, SEQ, 1)) / float(VOCAB)
            prediction = model.predict(x, verbose=0)
            index = np.argmax(prediction, axis=-1)
            for row, i in zip(window, index, strict=True):
                row.append(int(i))
                del row[0]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument(
        "--tutorial-length",
        type=int,
        default=200,
        help="characters for the (slow) tutorial method; rates are per char",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--peers",
        nargs="*",
        choices=["tutorial", "torch", "native"],
        default=["tutorial", "torch", "native"],
        help="the peers to time beside jaxchar; --peers alone times jaxchar only",
    )
    parser.add_argument(
        "--load", action="store_true", help="a competing CPU-bound process on every core"
    )
    parser.add_argument(
        "--no-window", action="store_true", help="leave out jaxchar's (slow) window mode"
    )
    parser.add_argument(
        "--pallas",
        action="store_true",
        help="also time the Pallas sampling kernel (for GPUs; interpreted and slow on a CPU)",
    )
    args = parser.parse_args()

    load = common.Load(os.cpu_count() or 1) if args.load else contextlib.nullcontext()
    with load:
        results, rows = run_all(args)
    print(
        common.table(rows, ["batch", "method", "chars/s", "compile s", "vs tutorial", "vs torch"])
    )
    name = "generate" if args.dtype == "float32" else f"generate_{args.dtype}"
    name += "_load" if args.load else ""
    summary = {"length": args.length, "reps": args.reps, "dtype": args.dtype, "results": results}
    summary["load"] = args.load
    path = common.save(name, summary)
    print(f"written to {path}", file=sys.stderr)


def run_all(args) -> tuple[dict, list]:
    results, rows = {}, []
    for batch in args.batches:
        dt = args.dtype
        makers = [  # (name, builder, its arguments, characters per run)
            ("jaxchar window", jaxchar_runner, ("window", batch, args.length, dt), args.length),
            ("jaxchar stateful", jaxchar_runner, ("stateful", batch, args.length, dt), args.length),
        ][1 if args.no_window else 0 :]
        if dt == "float32":  # the kernel's own baseline: the same, by lax.scan
            scan = ("stateful", batch, args.length, dt, "scan")
            makers.append(("jaxchar stateful, lax.scan", jaxchar_runner, scan, args.length))
        if args.pallas:  # the Pallas sampling loop, forced (auto picks it nowhere yet)
            kernel = ("stateful", batch, args.length, dt, "pallas")
            makers.append(("jaxchar stateful, Pallas kernel", jaxchar_runner, kernel, args.length))
        if "tutorial" in args.peers:
            n = args.tutorial_length
            makers.insert(0, ("tutorial (keras predict)", keras_runner, (batch, n, dt), n))
        if "native" in args.peers and dt == "float32":  # no JAX around it
            n = args.length
            makers.append(("kernel loop stand-alone", native_runner, (n, batch), n))
        if "torch" in args.peers:
            makers.append(
                ("torch stateful loop", torch_runner, (batch, args.length, dt), args.length)
            )
        runners, lengths, compile_s = {}, {}, {}
        for name, build, build_args, n in makers:
            try:
                fn = build(*build_args)
            except ImportError as err:
                print(f"skipping {name}: not installed ({err})", file=sys.stderr)
                continue
            compile_s[name] = common.timed(fn)
            runners[name], lengths[name] = fn, n
        times = common.interleave(runners, args.reps, warmup=1)
        entry = {}
        for name, samples in times.items():
            med = statistics.median(samples)
            entry[name] = {
                **common.stats(samples),
                "chars": lengths[name] * batch,
                "chars_per_s": lengths[name] * batch / med,
                "compile_s": compile_s[name],
            }
        base = entry.get("tutorial (keras predict)", {}).get("chars_per_s")
        torch_rate = entry.get("torch stateful loop", {}).get("chars_per_s")
        for name, e in entry.items():
            e["vs_tutorial"] = e["chars_per_s"] / base if base else None
            e["vs_torch"] = e["chars_per_s"] / torch_rate if torch_rate else None
            rows.append(
                [
                    batch,
                    name,
                    f"{e['chars_per_s']:,.0f}",
                    f"{e['compile_s']:.2f}",
                    f"{e['vs_tutorial']:.0f}x" if base else "-",
                    f"{e['vs_torch']:.2f}x" if torch_rate else "-",
                ]
            )
        results[str(batch)] = entry
    return results, rows


if __name__ == "__main__":
    main()
