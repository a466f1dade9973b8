"""Training throughput: jaxchar against PyTorch nn.LSTM and Keras 3 (JAX backend), same run.

    python benchmarks/bench_train.py [--configs small stacked fast] [--reps 20]

Each config's shapes (batch, seq_length 100, hidden, layers, input encoding, objective) are
given to every tool; runs are interleaved (jaxchar, torch, keras, jaxchar, ...) after warm-up
and compile time is reported apart. jaxchar is timed per call of `steps_per_call` fused steps
and reported per step. A peer that is not installed is skipped and said so. The matrix-
multiply peak is measured in the same run at the recurrence's shapes ([batch, hidden] x
[hidden, 4 hidden] inside a jitted loop), and each tool's achieved FLOP/s is given as a share
of it. The epoch column is the median step times the config's steps per epoch on Alice
(1,129 for `small`, as in the tutorial).

With `--set model.dtype=bfloat16` every tool runs its products in bfloat16 with float32
weights: PyTorch under `torch.autocast`, Keras with the `mixed_bfloat16` policy, and the peak
is measured for bfloat16 products (results in train_bfloat16.json).

On a GPU the PyTorch peer runs on CUDA (cuDNN's nn.LSTM; `--peers torch torch-half` adds it
under float16 autocast, where cuDNN's persistent algorithm can apply) and jaxchar runs three
times: with the config's layer (`fused`), with `model.impl = "cudnn"` and with the Pallas
kernels (`model.impl = "pallas"`). Writes benchmarks/results/train.json
(train_gpu.json on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def model_flops(cfg, batch: int) -> float:
    """Multiply-add FLOPs of one train step (forward + backward ~ 3x forward)."""
    m, d = cfg.model, cfg.data
    t, h = d.seq_length, m.hidden
    in_dim = {"scaled": 1, "onehot": m.vocab_size, "embed": m.embed_dim}[m.encoding]
    fwd = 0.0
    for layer in range(m.layers):
        width = in_dim if layer == 0 else h
        fwd += 2 * batch * t * 4 * h * (h + width)
    outputs = batch if d.objective == "window" else batch * t
    fwd += 2 * outputs * h * m.vocab_size
    return 3 * fwd


def matmul_peak(
    batch: int, hidden: int, dtype: str = "float32", steps: int = 100, reps: int = 5
) -> float:
    """FLOP/s of the recurrence's product shape in a jitted scan (a data dependency per step),
    with the operands in `dtype` and a float32 result."""
    import jax
    import jax.numpy as jnp

    from jaxchar.lstm import matmul

    w = jax.random.normal(jax.random.PRNGKey(0), (hidden, 4 * hidden)).astype(dtype) * 0.01
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, hidden))

    @jax.jit
    def loop(x):
        def body(x, _):
            return jnp.tanh(matmul(x, w, dtype)[:, :hidden]), None

        return jax.lax.scan(body, x, None, length=steps)[0]

    loop(x).block_until_ready()
    best = min(common.timed(lambda: loop(x).block_until_ready()) for _ in range(reps))
    return 2 * batch * hidden * 4 * hidden * steps / best


def jaxchar_cudnn_runner(cfg, ids: np.ndarray):
    from jaxchar.lstm import cudnn

    if not cudnn.available() or cfg.model.impl == "cudnn":
        raise ImportError(
            "cuDNN needs an NVIDIA GPU"
            if not cudnn.available()
            else "the config already uses cudnn"
        )
    model = dataclasses.replace(cfg.model, impl="cudnn")
    return jaxchar_runner(dataclasses.replace(cfg, model=model), ids)


def jaxchar_runner(cfg, ids: np.ndarray):
    import jax

    from jaxchar.train import create_state, make_optimizer, run_steps, zero_totals

    tx = make_optimizer(cfg.train, 10_000)
    state = create_state(cfg, tx, jax.random.PRNGKey(0))
    totals = zero_totals()
    device_ids = jax.device_put(ids)
    k = cfg.train.steps_per_call
    box = {"state": state, "totals": totals, "step": 0}

    def run():
        box["state"], box["totals"], losses = run_steps(
            box["state"], box["totals"], device_ids, 0, box["step"] % 500, cfg=cfg, tx=tx, n=k
        )
        box["step"] += k
        losses.block_until_ready()

    return run, k


def jaxchar_pallas_runner(cfg, ids: np.ndarray):
    """jaxchar with the Pallas training kernels (model.impl = "pallas"), on NVIDIA GPUs only:
    elsewhere they run in Pallas's interpreter, which is for tests, not timings."""
    import jax

    if jax.default_backend() != "gpu" or cfg.model.impl == "pallas":
        raise ImportError(
            "the Pallas kernels compile for NVIDIA GPUs only"
            if jax.default_backend() != "gpu"
            else "the config already uses pallas"
        )
    model = dataclasses.replace(cfg.model, impl="pallas")
    return jaxchar_runner(dataclasses.replace(cfg, model=model), ids)


def torch_half_runner(cfg, ids: np.ndarray):
    """PyTorch under float16 autocast on CUDA, where cuDNN may pick its persistent LSTM
    algorithm (PyTorch asks for it only in half precision, for eligible shapes): PyTorch's
    fastest LSTM, timed beside the float32 one."""
    import torch

    if not torch.cuda.is_available():
        raise ImportError("float16 autocast is timed on CUDA only")
    return torch_runner(cfg, ids, half=torch.float16)


def torch_runner(cfg, ids: np.ndarray, half=None):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    device = common.torch_device()
    m, d, b = cfg.model, cfg.data, cfg.train.batch_size
    v, t = m.vocab_size, d.seq_length

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(v, m.embed_dim) if m.encoding == "embed" else None
            in_dim = {"scaled": 1, "onehot": v, "embed": m.embed_dim}[m.encoding]
            self.lstm = torch.nn.LSTM(
                in_dim,
                m.hidden,
                m.layers,
                batch_first=True,
                dropout=m.dropout if m.layers > 1 else 0.0,
            )
            self.drop = torch.nn.Dropout(m.dropout)
            self.head = torch.nn.Linear(m.hidden, v)

        def forward(self, x):
            if self.embed is not None:
                x = self.embed(x)
            elif m.encoding == "onehot":
                x = torch.nn.functional.one_hot(x, v).float()
            else:
                x = (x.float() / v).unsqueeze(-1)
            out, _ = self.lstm(x)
            if d.objective == "window":
                out = out[:, -1]
            return self.head(self.drop(out))

    net = Net().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    # bfloat16 products on float32 weights, as jaxchar's model.dtype = "bfloat16" (or the
    # `half` type asked for)
    enabled = half is not None or m.dtype == "bfloat16"
    half = torch.autocast(device, dtype=half or torch.bfloat16, enabled=enabled)
    rng = np.random.default_rng(0)

    def batch():
        offs = rng.integers(0, len(ids) - t - 1, b)
        chunk = np.stack([ids[o : o + t + 1] for o in offs]).astype(np.int64)
        x = torch.from_numpy(chunk[:, :-1])
        y = torch.from_numpy(chunk[:, -1] if d.objective == "window" else chunk[:, 1:])
        return x.to(device), y.to(device)

    def run():
        x, y = batch()
        opt.zero_grad()
        with half:
            logits = net(x).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, v), y.reshape(-1))
        loss.backward()
        opt.step()
        loss.item()

    return run, 1


def keras_runner(cfg, ids: np.ndarray):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    m, d, b = cfg.model, cfg.data, cfg.train.batch_size
    v, t = m.vocab_size, d.seq_length
    window = d.objective == "window"
    # bfloat16 products on float32 weights, as jaxchar's model.dtype = "bfloat16"
    keras.config.set_dtype_policy("mixed_bfloat16" if m.dtype == "bfloat16" else "float32")
    layers = [keras.Input((t,) if m.encoding == "embed" else (t, 1))]
    if m.encoding == "embed":
        layers.append(keras.layers.Embedding(v, m.embed_dim))
    for layer in range(m.layers):
        last = layer == m.layers - 1
        layers += [
            keras.layers.LSTM(m.hidden, return_sequences=not (last and window)),
            keras.layers.Dropout(m.dropout),
        ]
    layers.append(keras.layers.Dense(v, activation="softmax"))
    model = keras.Sequential(layers)
    # the tutorial's compile line; the sequence objective uses integer targets
    loss = "categorical_crossentropy" if window else "sparse_categorical_crossentropy"
    model.compile(loss=loss, optimizer="adam")
    rng = np.random.default_rng(0)

    def run():
        offs = rng.integers(0, len(ids) - t - 1, b)
        chunk = np.stack([ids[o : o + t + 1] for o in offs])
        if m.encoding == "embed":
            x = chunk[:, :-1].astype(np.int32)
        else:  # the tutorial: reshape to [samples, time, 1] and divide by the vocabulary size
            x = (chunk[:, :-1] / float(v)).reshape(b, t, 1).astype(np.float32)
        # the tutorial's one-hot targets for windows; integer targets for sequences
        y = keras.utils.to_categorical(chunk[:, -1], v) if window else chunk[:, 1:].astype(np.int32)
        model.train_on_batch(x, y)

    return run, 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small", "stacked", "fast"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--peers",
        nargs="*",
        default=["torch", "keras"],
        help="peer tools; --peers alone times jaxchar only",
    )
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    parser.add_argument(
        "--load", action="store_true", help="a competing CPU-bound process on every core"
    )
    args = parser.parse_args()
    with common.Load(os.cpu_count() or 1) if args.load else contextlib.nullcontext():
        run_all(args)


def _fused_runner(cfg, ids):
    """jaxchar with the fused layer's lax.scan loops: the JAX path the C++ recurrences
    stand in for, timed beside the default."""
    model = dataclasses.replace(cfg.model, impl="fused")
    return jaxchar_runner(dataclasses.replace(cfg, model=model), ids)


def run_all(args) -> None:
    from jaxchar.config import load_config, override
    from jaxchar.corpus import load_corpus
    from jaxchar.train import Plan, with_vocab

    results, rows = {}, []
    for name in args.configs:
        cfg = override(load_config(name), args.set)
        corpus = load_corpus(common.DATA / "wonderland.txt", cfg.data)
        cfg = with_vocab(cfg, len(corpus.vocab))
        b = cfg.train.batch_size
        flops = model_flops(cfg, b)
        chars = b * (1 if cfg.data.objective == "window" else cfg.data.seq_length)
        peak = matmul_peak(b, cfg.model.hidden, cfg.model.dtype)
        makers = {
            "jaxchar": jaxchar_runner,
            "jaxchar cudnn": jaxchar_cudnn_runner,
            "jaxchar fused": _fused_runner,
            "jaxchar pallas": jaxchar_pallas_runner,
            "torch": torch_runner,
            "torch-half": torch_half_runner,
            "keras": keras_runner,
        }
        spe = Plan.of(cfg, len(corpus.train_ids)).steps_per_epoch
        runners, per_call, compile_s = {}, {}, {}
        for tool in ["jaxchar", "jaxchar cudnn", "jaxchar fused", "jaxchar pallas", *args.peers]:
            try:
                fn, k = makers[tool](cfg, corpus.train_ids)
            except ImportError as err:
                print(f"[{name}] skipping {tool}: not available ({err})", file=sys.stderr)
                continue
            compile_s[tool] = common.timed(fn)  # first call: tracing and compilation
            runners[tool], per_call[tool] = fn, k
        times = common.interleave(runners, args.reps, warmup=1)
        entry = {
            "config": dataclasses.asdict(cfg),
            "model_flops": flops,
            "peak_flops": peak,
            "steps_per_epoch": spe,
        }
        for tool, samples in times.items():
            per_step = [s / per_call[tool] for s in samples]
            st = common.stats(per_step)
            st.update(
                compile_s=compile_s[tool],
                chars_per_s=chars / st["median"],
                flops_per_s=flops / st["median"],
                share_of_peak=flops / st["median"] / peak,
                steps_per_call=per_call[tool],
                epoch_s=st["median"] * spe,
            )
            entry[tool] = st
        jax_med = entry["jaxchar"]["median"]
        for tool in runners:
            entry[tool]["speedup_jaxchar_vs"] = entry[tool]["median"] / jax_med
            e = entry[tool]
            rows.append(
                [
                    name,
                    tool,
                    f"{e['median'] * 1e3:.1f}",
                    f"{e['min'] * 1e3:.1f}",
                    f"{e['max'] * 1e3:.1f}",
                    f"{e['chars_per_s']:,.0f}",
                    f"{e['epoch_s']:,.1f}",
                    f"{e['share_of_peak'] * 100:.0f}%",
                    f"{e['compile_s']:.1f}",
                    f"{e['speedup_jaxchar_vs']:.2f}x",
                ]
            )
        results[name] = entry
        print(
            f"[{name}] matmul peak at [{b},{cfg.model.hidden}]x[{cfg.model.hidden},"
            f"{4 * cfg.model.hidden}]: {peak / 1e9:.0f} GFLOP/s",
            file=sys.stderr,
        )
    header = [
        "config",
        "tool",
        "median ms",
        "min",
        "max",
        "chars/s",
        "epoch s",
        "of peak",
        "compile s",
        "jaxchar speedup",
    ]
    print(common.table(rows, header))
    half = any(r["config"]["model"]["dtype"] == "bfloat16" for r in results.values())
    name = ("train_bfloat16" if half else "train") + ("_load" if args.load else "")
    path = common.save(name, {"reps": args.reps, "load": args.load, "results": results})
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
