"""Loading jaxchar's C++ kernels (jaxchar/csrc/) for this CPU, and what this CPU has.

setup.py compiles the sources once per instruction set (VARIANTS, best first); `variant()`
imports the best one that this CPU's flags allow, or none: on other architectures, on CPUs
without AVX-512 (only variants that `auto` may choose are built: an AVX2 build measured
slower than the JAX paths, docs/benchmarks.md), where nothing was built, and when the
environment variable JAXCHAR_NATIVE is 0. Two deployment settings (like XLA_FLAGS) are read
once, on first use, and are the only switches outside the config: JAXCHAR_NATIVE=0 keeps the
shared library from being loaded at all, and JAXCHAR_CPU_AS=avx2 (or avx512) makes the
loader see only that instruction set's flags, so that one machine can show what a smaller
CPU runs (CI reruns the backend tests that way).
"""

from __future__ import annotations

import functools
import importlib
import os
import platform

import jax

# variant -> the CPU flags (as /proc/cpuinfo names them) its -march needs; best first
VARIANTS = {
    "avx512bf16": (
        "avx2",
        "fma",
        "bmi2",
        "avx512f",
        "avx512bw",
        "avx512dq",
        "avx512vl",
        "avx512cd",
        "avx512_bf16",
    ),
    "avx512": ("avx2", "fma", "bmi2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"),
}
# what JAXCHAR_CPU_AS may name: the flags of a CPU kind that has no built variant
CPU_KINDS = {**VARIANTS, "avx2": ("avx2", "fma", "bmi2")}


def _real_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags, from /proc/cpuinfo (empty where there is none);
    with JAXCHAR_CPU_AS=KIND only those of that kind (CPU_KINDS) that this CPU also has, so
    an AVX-512 machine can behave as an AVX2-only one. x86 flags that no kind names (sse,
    ...) are kept; only the vector extensions are masked."""
    flags = _real_flags()
    kind = os.environ.get("JAXCHAR_CPU_AS", "").strip().lower()
    if not kind:
        return flags
    if kind not in CPU_KINDS:
        raise ValueError(f"JAXCHAR_CPU_AS={kind!r}: name one of {', '.join(CPU_KINDS)}")
    masked = {f for needs in CPU_KINDS.values() for f in needs} - set(CPU_KINDS[kind])
    return flags - masked - {"avx512_vnni", "avx512vbmi", "amx_bf16", "avx512ifma"}


@functools.cache
def cpu_model() -> str | None:
    """The CPU's model name, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def variant() -> tuple[str | None, str]:
    """(the loaded variant's name or None, why): imports the best built variant this CPU
    can run and registers its FFI targets with XLA. JAXCHAR_NATIVE=0 loads none; naming a
    variant (JAXCHAR_NATIVE=avx512) loads that one if this CPU can run it (benchmarks)."""
    wish = os.environ.get("JAXCHAR_NATIVE", "").strip().lower()
    if wish in ("0", "false", "no", "off"):
        return None, "turned off by JAXCHAR_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"no kernels for {platform.machine()} (x86-64 only)"
    flags, built = cpu_flags(), []
    for name, needs in VARIANTS.items():
        if wish in VARIANTS and name != wish:
            continue
        try:
            module = importlib.import_module(f"jaxchar.lstm._native_{name}")
        except ImportError:
            continue
        built.append(name)
        if not set(needs) <= flags:
            continue
        targets = module.targets()  # empty where the CPU lacks what the build used
        if not targets:
            continue
        for target, capsule in targets.items():
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
        chosen = "named by JAXCHAR_NATIVE" if wish == name else "the best this CPU runs"
        return name, chosen
    if not built:
        return None, "the C++ extension is not built (no C++ compiler at install time?)"
    return None, f"this CPU lacks the instructions of the built variants ({', '.join(built)})"


def available() -> bool:
    """Whether a kernel variant is loaded for this CPU."""
    return variant()[0] is not None


def bf16() -> bool:
    """Whether the loaded variant multiplies in bfloat16 (a CPU with AVX512-BF16)."""
    return variant()[0] == "avx512bf16"


def _require() -> None:
    if not available():
        raise RuntimeError(f"jaxchar's C++ kernels cannot run: {variant()[1]}")


def threads_for(hidden: int) -> int:
    """How many threads split the units: a power of two up to the cores this process may
    use (at most 8), each with a multiple of 16 units."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = 1
    while 2 * threads <= min(cores or 1, 8) and hidden % (32 * threads) == 0:
        threads *= 2
    return threads
