"""Builds jaxchar's optional CPU kernels (jaxchar/_native.cc, XLA FFI handlers): stateful
generation, and the LSTM layer's training recurrences.

Everything else is in pyproject.toml. The extension is optional: where it does not build
(no C++ compiler, another platform), jaxchar installs without it and samples and trains with
its lax.scan paths, which are also the references the kernels are tested against.
"""

from pathlib import Path

from setuptools import Extension, setup


def _xla_headers() -> list[str]:
    try:  # jaxlib ships the XLA FFI headers (jax.ffi.include_dir() points at them)
        import jaxlib
    except ImportError:
        return []
    return [str(Path(jaxlib.__file__).parent / "include")]


native = Extension(
    "jaxchar._native",
    sources=["jaxchar/_native.cc"],
    depends=["jaxchar/_lstm_loop.h", "jaxchar/_lstm_train.h"],
    include_dirs=_xla_headers(),
    language="c++",
    # -march=native: the kernel is built where it runs (pip install from source);
    # -fno-wrapv undoes Python's -fwrapv, under which the compiler could not prove the inner
    # loop's addresses contiguous and gathered them one by one (7x slower)
    extra_compile_args=["-std=c++17", "-O3", "-march=native", "-fno-wrapv", "-fvisibility=hidden"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[native])
