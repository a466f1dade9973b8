"""Shared benchmark helpers: interleaved timing, medians, a results file, machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(
    os.environ.get("JAXCHAR_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)
_SHARED = Path(__file__).resolve().parents[2] / "shared/data"
_EMBEDDED = Path(__file__).resolve().parents[1] / "jaxchar/corpora"  # Alice, tiny Shakespeare
# the corpora: $JAXCHAR_DATA, else the project's shared folder, else the copies the package ships
DATA = Path(os.environ.get("JAXCHAR_DATA") or (_SHARED if _SHARED.is_dir() else _EMBEDDED))


def cpu_model() -> str:
    """The CPU's name, its widest vector extensions and its per-core L2, e.g. "AMD EPYC
    (avx512f avx512_bf16, L2 1024K)": ratios between tools move with these (bfloat16
    products, whether the recurrent kernel fits the L2), so results files name them."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
        l2 = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
    except OSError:  # not Linux: the platform's name is what there is
        return name
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    return f"{name} ({' '.join(f for f in wanted if f in flags)}, L2 {l2})"


def machine() -> dict:
    import jax

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def torch_device() -> str:
    """CUDA when both JAX and PyTorch see a GPU, so that a peer runs where jaxchar does."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def interleave(runners: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict:
    """Times each runner `reps` times, A B C A B C ..., after `warmup` untimed rounds
    (compilation happens there). Returns {name: [seconds, ...]}."""
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, fn in runners.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    return times


def stats(samples: list[float]) -> dict:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def save(name: str, payload: dict) -> Path:
    """Writes results/<name>.json, or <name>_gpu.json (_tpu) when JAX runs on an
    accelerator, so that accelerator figures never replace the CPU ones."""
    import jax

    backend = jax.default_backend()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}.json" if backend == "cpu" else f"{name}_{backend}.json")
    write_json(path, {"machine": machine(), **payload})
    return path


def write_json(path: Path, payload: dict) -> None:
    """Replaces `path` whole (through a temporary file): never a half-written file."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)


def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Load:
    """A competing CPU-bound process on every core while the block runs (`with Load(n):`),
    as on a shared cloud VM or a laptop running a training job beside a sampler. Each one
    spins in pure Python; they end with the block (and are killed if it raises)."""

    def __init__(self, processes: int):
        self.processes = processes
        self.children: list = []

    def __enter__(self):
        import subprocess
        import sys

        spin = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass"
        self.children = [
            subprocess.Popen([sys.executable, "-c", spin]) for _ in range(self.processes)
        ]
        time.sleep(0.5)  # let the scheduler see them
        return self

    def __exit__(self, *exc):
        for child in self.children:
            child.kill()
            child.wait()
