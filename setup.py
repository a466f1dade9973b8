"""Builds jaxchar's optional CPU kernels (jaxchar/csrc/native.cc, XLA FFI handlers): stateful
generation, and the LSTM layer's training recurrences.

Everything else is in pyproject.toml. The sources are compiled once per x86-64 instruction
set (VARIANTS), never for the build machine's own CPU (no -march=native), so that a wheel
runs on any x86-64 machine: at run time jaxchar.lstm.native imports the best variant this
CPU's flags allow, and jaxchar.lstm.select decides whether a kernel is worth running. The
extension is optional: where no variant builds (no C++ compiler, another architecture)
jaxchar installs without it, runs on its JAX paths, and `jaxchar info` says so.
"""

import platform
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

# name -> compiler flags; x86-64-v4 is AVX-512 F/BW/DQ/VL/CD. Only variants that `auto` may
# choose are built: an x86-64-v3 (AVX2) build measured 0.05-0.19x the JAX paths
# (docs/benchmarks.md), so AVX2-only CPUs run the JAX paths and compile nothing for them.
VARIANTS = {
    "avx512bf16": ["-march=x86-64-v4", "-mavx512bf16"],
    "avx512": ["-march=x86-64-v4"],
}


def _xla_headers() -> list[str]:
    try:  # jaxlib ships the XLA FFI headers (jax.ffi.include_dir() points at them)
        import jaxlib
    except ImportError:
        return []
    return [str(Path(jaxlib.__file__).parent / "include")]


def _extensions() -> list[Extension]:
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        return []  # the kernels are written for x86-64's vector units
    return [
        Extension(
            f"jaxchar.lstm._native_{name}",
            sources=["jaxchar/csrc/native.cc"],
            depends=["jaxchar/csrc/lstm_loop.h", "jaxchar/csrc/lstm_train.h"],
            include_dirs=_xla_headers(),
            define_macros=[("JAXCHAR_VARIANT", name)],
            language="c++",
            # -fno-wrapv undoes Python's -fwrapv, under which the compiler could not prove the
            # inner loop's addresses contiguous and gathered them one by one (7x slower);
            # C++20 for std::atomic wait (the barrier's sleep)
            extra_compile_args=[
                "-std=c++20",
                "-O3",
                *flags,
                "-mtune=generic",
                "-fno-wrapv",
                "-fvisibility=hidden",
            ],
            extra_link_args=["-pthread"],
            optional=True,
        )
        for name, flags in VARIANTS.items()
    ]


class BuildWithConfigs(build_py):
    """Also copies the top-level configs/*.toml into the built package (jaxchar/configs/),
    so that a wheel or a non-editable install finds the shipped configs by name."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "jaxchar" / "configs"
        target.mkdir(parents=True, exist_ok=True)
        for config in sorted(Path(__file__).resolve().parent.joinpath("configs").glob("*.toml")):
            shutil.copy(config, target / config.name)


setup(ext_modules=_extensions(), cmdclass={"build_py": BuildWithConfigs})
