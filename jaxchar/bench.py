"""`jaxchar bench`: what this machine's default device does with jaxchar alone.

For each config: the train step's compile time, then its time per step (the median of
several dispatches after a warm-up), training characters/s and the achieved FLOP/s from the
model's FLOP count; stateful generation characters/s at 1 and 64 rows; the device, JAX
version and the backends chosen. Synthetic ids stand in for a corpus (the work per step
does not depend on the text). The side-by-side comparisons with PyTorch and Keras live in
benchmarks/; this is the figure a user takes on their own hardware, first on an accelerator.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxchar import data
from jaxchar.config import Config, load_config, override
from jaxchar.lstm.backends import select
from jaxchar.sampling import sample
from jaxchar.train import create_state, make_optimizer, run_steps, with_vocab, zero_totals
from jaxchar.version import __version__

VOCAB = 64  # a book's vocabulary is 40-100 characters


def train_flops_per_step(cfg: Config) -> float:
    """Matrix-product FLOPs of one training step (forward and backward, about 3x the
    forward's): the LSTM products at every position, the head where the loss reads, and an
    embedding's gradient."""
    m, d = cfg.model, cfg.data
    rows, steps = cfg.train.batch_size, d.seq_length
    features = {"embed": m.embed_dim, "onehot": m.vocab_size, "scaled": 1}[m.encoding]
    lstm = 0.0
    for layer in range(m.layers):
        width = features if layer == 0 else m.hidden
        lstm += 2.0 * (width + m.hidden) * 4 * m.hidden  # input and recurrent products
    scored = 1 if data.objective(cfg).last_only else steps
    forward = rows * steps * lstm + rows * scored * 2.0 * m.hidden * m.vocab_size
    # an embedding's gradient is one product too, one_hot(ids)^T @ g (jaxchar.model.Embed)
    embed = rows * steps * 2.0 * m.vocab_size * m.embed_dim if m.encoding == "embed" else 0.0
    return 3.0 * forward + embed


def xla_cost(cfg: Config) -> dict[str, float]:
    """XLA's own count of one training step's FLOPs and bytes accessed (its cost analysis of
    the lowered program, before fusion). XLA counts a loop's body once, whatever its trip
    count, and cannot see inside the C++ kernels: so the step is analysed on the nn.scan
    layer fully unrolled over the window, one step per call. The count covers every
    operation, not only the matrix products; the bytes are an upper bound (every operation's
    operands and results, as if nothing were fused)."""
    model = dataclasses.replace(cfg.model, impl="scan", unroll=cfg.data.seq_length)
    train = dataclasses.replace(cfg.train, steps_per_call=1)
    cfg = dataclasses.replace(cfg, model=model, train=train)
    tx = make_optimizer(cfg.train, 10)
    # on the CPU backend, which every JAX has: the GPU and TPU plugins analyse only compiled
    # programs, and the count does not depend on where the program runs
    on_cpu = jax.sharding.make_single_device_sharding(jax.devices("cpu")[0])

    def shape(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_cpu)

    state = jax.eval_shape(lambda: create_state(cfg, tx, jax.random.PRNGKey(1)))
    totals = jax.eval_shape(zero_totals)
    spans = _spans(cfg)
    args = jax.tree.map(shape, (state, totals, jax.ShapeDtypeStruct((200_000,), jnp.uint8)))
    spans = None if spans is None else shape(spans)
    lowered = run_steps.lower(*args, 0, 0, spans, cfg=cfg, tx=tx, n=1)
    cost = lowered.cost_analysis() or {}
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return {
        "xla_flops_per_step": float(cost.get("flops", float("nan"))),
        "xla_bytes_per_step": float(cost.get("bytes accessed", float("nan"))),
    }


def _spans(cfg: Config) -> jax.Array | None:
    """Sentence spans of about 3/4 of seq_length over the synthetic ids, where the
    objective trains on sentences."""
    if not data.objective(cfg).needs_spans:
        return None
    length = max(2, 3 * cfg.data.seq_length // 4)
    starts = jnp.arange(0, 190_000, length + 1)
    return jnp.stack([starts, starts + length], axis=1).astype(jnp.int32)


def _median_time(fn: Callable[[], object], reps: int) -> float:
    jax.block_until_ready(fn())  # warm-up: compiled, caches filled
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure_training(cfg: Config, reps: int) -> dict:
    obj = data.objective(cfg)
    n = cfg.train.steps_per_call
    tx = make_optimizer(cfg.train, 10 * n)
    ids = jax.random.randint(jax.random.PRNGKey(0), (200_000,), 0, VOCAB).astype(jnp.uint8)
    spans = _spans(cfg)
    state = create_state(cfg, tx, jax.random.PRNGKey(1))
    totals = zero_totals()
    began = time.perf_counter()
    compiled = run_steps.lower(state, totals, ids, 0, 0, spans, cfg=cfg, tx=tx, n=n).compile()
    compile_s = time.perf_counter() - began
    box = {"state": state, "totals": totals}

    def call():  # the state is donated: each call continues from the last
        box["state"], box["totals"], losses = compiled(
            box["state"], box["totals"], ids, 0, 0, spans
        )
        return losses

    per_step = _median_time(call, reps) / n
    flops = train_flops_per_step(cfg)
    return {
        "compile_s": compile_s,
        "step_ms": per_step * 1e3,
        "chars_per_s": obj.chars_per_step / per_step,
        "tflop_per_s": flops / per_step / 1e12,
        "flops_per_step": flops,
        "backend": select(cfg.model, "layer", platform=jax.default_backend()).backend,
        **xla_cost(cfg),
    }


def measure_generation(cfg: Config, rows: int, length: int, reps: int) -> dict:
    model = cfg.model
    state = create_state(cfg, make_optimizer(cfg.train, 10), jax.random.PRNGKey(1))
    prompt = jnp.arange(8) % VOCAB

    def call():
        return sample(
            state.params,
            jax.random.PRNGKey(2),
            prompt,
            cfg=model,
            length=length,
            temperature=0.8,
            num_samples=rows,
        )

    seconds = _median_time(call, reps)
    choice = select(model, "sample", platform=jax.default_backend(), rows=rows)
    return {"chars_per_s": rows * length / seconds, "rows": rows, "backend": choice.backend}


def bench(
    names: list[str],
    quick: bool = False,
    log: Callable[[str], None] = print,
    changes: list[str] | None = None,
    save: Callable[[dict], None] | None = None,
) -> dict:
    """Measures each config (a shipped name or a TOML path), with `changes`
    (`section.key=value`, as `--set`) applied to each; returns the JSON record, and hands
    it to `save` after each config (so that a run cut short keeps what it measured)."""
    reps, length = (3, 100) if quick else (10, 500)
    device = jax.devices()[0]
    record = {
        "jaxchar": __version__,
        "jax": jax.__version__,
        "platform": jax.default_backend(),
        "device": str(getattr(device, "device_kind", device)),
        "devices": jax.device_count(),
        "quick": quick,
        "changes": list(changes or []),
        "configs": {},
    }
    for name in names:
        cfg = with_vocab(override(load_config(name), list(changes or [])), VOCAB)
        if quick:  # fewer steps per dispatch: the same step, a shorter measurement
            cfg = dataclasses.replace(
                cfg,
                train=dataclasses.replace(
                    cfg.train, steps_per_call=min(cfg.train.steps_per_call, 5)
                ),
            )
        log(f"measuring {name} ...")
        record["configs"][name] = {
            "train": measure_training(cfg, reps),
            "generate_1": measure_generation(cfg, 1, length, reps),
            "generate_64": measure_generation(cfg, 64, length, reps),
        }
        if save:
            save(record)
    return record


def table(record: dict) -> str:
    header = [
        "config",
        "compile s",
        "ms/step",
        "train chars/s",
        "TFLOP/s",
        "gen 1 chars/s",
        "gen 64 chars/s",
        "backends",
    ]
    rows = [header]
    for name, r in record["configs"].items():
        t, g1, g64 = r["train"], r["generate_1"], r["generate_64"]
        rows.append(
            [
                name,
                f"{t['compile_s']:.1f}",
                f"{t['step_ms']:.2f}",
                f"{t['chars_per_s']:,.0f}",
                f"{t['tflop_per_s']:.3f}",
                f"{g1['chars_per_s']:,.0f}",
                f"{g64['chars_per_s']:,.0f}",
                f"{t['backend']}/{g1['backend']}/{g64['backend']}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = (
        f"jaxchar {record['jaxchar']}, JAX {record['jax']}, {record['platform']} "
        f"({record['device']} x {record['devices']})"
    )
    if record.get("changes"):
        title += ", with " + " ".join(record["changes"])
    return "\n".join([title, *lines])
