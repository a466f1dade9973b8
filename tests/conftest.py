import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling small programs, and most of that is LLVM
# optimizing the CPU code of elementwise fusions. This turns off LLVM's optimization only
# (XLA's own HLO passes, fusion included, still run, and matrix products still call Eigen's
# compiled kernels): the same programs, compiled about twice as fast and run a little
# slower. The quick loop measured 448 s without it and 280 s with it (2-core AVX2 EPYC). The
# workers and every process a test starts inherit it; the benchmarks, run by hand, do not.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


# XLA's CPU backend emits fusions through MLIR "fusion emitters" by default; its older
# element-wise LLVM emitters compile the same fusions faster. The same HLO programs, code
# generated differently, so float bits can differ between two programs that happened to
# agree under the default (steps_per_call 1 and 5 once did; see test_faults.py). The quick
# loop measured 343 s with the default and 240 s without it (2-core AVX2 EPYC, jax 0.10.2).
# Appended, so a caller's own XLA_FLAGS stay and can say otherwise. XLA aborts the process
# on a flag it does not know, and jaxlib 0.11.1 dropped this one (0.11.0 still has it): set
# only where the installed XLA has it.
def _jaxlib_before(*release: int) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("jaxlib").split(".")[: len(release)]
    except PackageNotFoundError:
        return False
    return tuple(int("".join(c for c in n if c.isdigit()) or 0) for n in parts) < release


if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "") and _jaxlib_before(
    0, 11, 1
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false"
    ).strip()
# One thread per process for XLA's matrix products: the suite runs one worker per core, and
# each worker's products spread over every core fought the other worker's compiles and
# products for them. The whole suite measured 524 s with Eigen's threads and 381 s without
# (2-core AVX2 EPYC, empty cache; every file faster): the same programs, their products run
# on one thread.
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()


REPO = Path(__file__).resolve().parents[1]
# XLA's persistent compilation cache for the tests, kept between sessions in pytest's own
# cache folder (`pytest --cache-clear` empties it): the xdist workers and every process a
# test starts share it (they inherit the environment, and the workers inherit it from the
# controlling process, which imports this file first), and a second session loads the
# programs the first one compiled. Most of the suite's time is compiling; the quick loop
# measured 191-227 s with an empty cache and 122-140 s with a warm one (2-core AVX2 EPYC). JAX
# keys each entry by the program, the jax/jaxlib versions, the flags and the CPU, so a
# change anywhere compiles afresh. A session that finds it over _CACHE_LIMIT empties it.
_CACHE_LIMIT = 512 * 2**20


def _share_compilations() -> Path | None:
    """Returns the cache folder, or None where the caller set their own (left alone)."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return None
    folder = REPO / ".pytest_cache" / "d" / "jax-xla"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return folder


_CACHE = _share_compilations()


def pytest_sessionfinish(session):
    if _CACHE is None or hasattr(session.config, "workerinput"):  # the controller only
        return
    size = sum(f.stat().st_size for f in _CACHE.rglob("*") if f.is_file())
    if size > _CACHE_LIMIT:
        shutil.rmtree(_CACHE, ignore_errors=True)


def shipped_configs(distinct_models: bool = False) -> list:
    """Every shipped config's name, as pytest parameters: the default config's runs in the
    quick loop (`-m "not slow"`), the others' are marked slow and run in the whole suite.
    With `distinct_models`, for tests that run a config's model on a few rows of its own:
    a config whose model and sequences (layers, sizes, encoding, gates, sequence length,
    objective; dropout aside) are an earlier one's is left out, the default kept first."""
    import dataclasses

    from jaxchar.config import DEFAULT_CONFIG, load_config

    names = sorted(p.stem for p in (REPO / "configs").glob("*.toml"))
    names.sort(key=lambda n: n != DEFAULT_CONFIG)  # stable: the default first
    seen, kept = set(), []
    for name in names:
        cfg = load_config(REPO / "configs" / f"{name}.toml")
        model = dataclasses.replace(cfg.model, dropout=0.0, input_dropout=0.0)
        shape = (model, cfg.data.seq_length, cfg.data.objective)
        if distinct_models and shape in seen:
            continue
        seen.add(shape)
        kept.append(name)
    return [
        n if n == DEFAULT_CONFIG else pytest.param(n, marks=pytest.mark.slow, id=n)
        for n in sorted(kept)
    ]


# the package's own copies of alice and shakespeare (test_corpus checks them against the
# sha256 that ../shared/data/README.md records); SHARED holds the other test corpora
DATA = REPO / "jaxchar" / "corpora"
SHARED = Path(os.environ.get("JAXCHAR_DATA") or REPO.parent / "shared" / "data")
ALICE = DATA / "wonderland.txt"


@pytest.fixture(scope="session")
def alice_text() -> str:
    return ALICE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def alice_slice(tmp_path_factory, alice_text) -> Path:
    """The first 30,000 characters of Alice as a file: the corpus of the shared runs."""
    path = tmp_path_factory.mktemp("corpus") / "alice_slice.txt"
    path.write_text(alice_text[:30000], encoding="utf-8")
    return path


def train_run(root: Path, corpus: Path, config: str, *sets: str) -> Path:
    """A run of a shipped config trained in-process through jaxchar.run.train_run."""
    from jaxchar.config import load_config, override
    from jaxchar.run import train_run

    run = root / config
    train_run(corpus, run, override(load_config(config), list(sets)))
    return run


# Shared runs, trained once per test session: the first worker that needs one trains it
# in a folder all the session's workers see, under a lock; the others wait for it and read
# it. Tests read them and never change them (a test that damages or resumes a run copies it
# first, with shutil.copytree).


def _session_folder(tmp_path_factory) -> Path:
    """A folder of this session's that every xdist worker sees (each worker's basetemp is
    popen-gwN inside the controller's), or this process's basetemp without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _shared_run(tmp_path_factory, alice_slice: Path, name: str, config: str, *sets: str) -> Path:
    try:
        import fcntl
    except ImportError:  # no POSIX locks: one run per worker
        return train_run(tmp_path_factory.mktemp(name), alice_slice, config, *sets)
    root = _session_folder(tmp_path_factory) / "shared-runs" / name
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = root / "done"
        if not done.exists():  # a worker whose training failed leaves no mark: it is tried again
            shutil.copy(alice_slice, root / alice_slice.name)
            train_run(root, root / alice_slice.name, config, *sets)
            done.touch()
    return root / config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, alice_slice) -> Path:
    """The tiny config (sequence objective), 20 steps, one save; samples while training."""
    sets = ("train.max_steps=20", "train.sample_chars=30")
    return _shared_run(tmp_path_factory, alice_slice, "tiny_run", "tiny", *sets)


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory, alice_slice) -> Path:
    """The default config's shapes (2 x LSTM-384, 100 characters, batch 4), 4 steps."""
    sets = ("train.max_steps=4", "train.save_every_steps=2", "train.steps_per_call=2")
    return _shared_run(
        tmp_path_factory, alice_slice, "fast_run", "fast", *sets, "train.sample_chars=0"
    )


@pytest.fixture(scope="session")
def window_run(tmp_path_factory, alice_slice) -> Path:
    """The tutorial's small config (window objective, LSTM-256, batch 128), 2 steps."""
    sets = ("train.max_steps=2", "train.sample_chars=0")
    return _shared_run(tmp_path_factory, alice_slice, "window_run", "small", *sets)


# The files that take longest, first (the whole suite's per-file times on 2 cores, summed
# over their tests, 2026-12-07: test_install 101 s, test_benchmarks 74, test_faults 66,
# test_backends 60, the Pallas files 39-50, then 10-38 each; the rest under 5; the C++
# kernels' files, skipped on AVX2 CPUs, 17-25 s in the quick loop on AVX-512 ones). xdist hands
# out whole files (--dist loadfile) in this order (--no-loadscope-reorder: by default it
# reorders them by their number of tests, which once put test_install last and left one
# worker idle for its last 100 s); a file left off the list goes after them all.
_LONGEST_FIRST = [
    "test_install.py",
    "test_benchmarks.py",
    "test_faults.py",
    "test_backends.py",
    "test_pallas.py",
    "test_pallas_sampling.py",
    "test_pallas_tpu.py",
    "test_native.py",
    "test_train.py",
    "test_serve.py",
    "test_model.py",
    "test_native_layer.py",
    "test_distributed.py",
    "test_tools.py",
    "test_cli.py",
    "test_lowering.py",
    "test_run.py",
    "test_data.py",
    "test_decoders.py",
    "test_beam.py",
    "test_sampling.py",
    "test_readme.py",
    "test_fuzz.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def lstm_layer_args(hidden: int, batch: int, steps: int, seed: int = 0):
    """A layer's arguments for the kernels' tests (w_h, gx, c0, h0, (d_hs, d_c, d_h)):
    weights strong enough that the gates leave their linear middle (scaled down as the
    width grows), biases spread over both clips of a hard sigmoid, a non-zero start state."""
    import jax
    import jax.numpy as jnp

    k = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    w_h = 0.3 * jax.random.normal(next(k), (hidden, 4 * hidden)) / max(1.0, hidden / 32) ** 0.5
    gx = jax.random.normal(next(k), (steps, batch, 4 * hidden)) + jnp.tile(
        jnp.linspace(-5.0, 5.0, hidden), 4
    )
    c0 = jax.random.normal(next(k), (batch, hidden))
    h0 = 0.5 * jax.random.normal(next(k), (batch, hidden))
    grads = [jax.random.normal(next(k), s) for s in ((steps, batch, hidden), c0.shape, c0.shape)]
    return w_h, gx, c0, h0, grads


def assert_recurrences_match_the_scan(forward, backward, args, *, kind, dtype, tol, **kw):
    """A kernel's forward and backward recurrences (`forward(gx, w_h, c0, h0, ...)`,
    `backward(w_h, acts, cs, c0, d_hs, d_c, d_h, ...)`, jitted, `kw` passed on) against the
    fused layer's lax.scan loops on the same arguments (lstm_layer_args), within `tol`."""
    import jax
    import numpy as np

    from jaxchar.lstm import fused

    w_h, gx, c0, h0, (d_hs, d_c, d_h) = args
    kw = dict(gate_activation=kind, dtype=dtype, **kw)
    want = fused._scan_forward(w_h, gx, c0, h0, None, None, dtype, kind)
    got = jax.jit(lambda *a: forward(*a, **kw))(gx, w_h, c0, h0)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, **tol)
    (_, _, _), (acts, cs) = want
    want_b = fused._scan_backward(w_h, acts, cs, c0, d_hs, d_c, d_h, dtype, kind)
    got_b = jax.jit(lambda *a: backward(*a, **kw))(w_h, acts, cs, c0, d_hs, d_c, d_h)
    for g, w in zip(got_b, want_b, strict=True):
        np.testing.assert_allclose(g, w, **tol)


def lowered_for_a_hopper_gpu(exported, *args) -> str:
    """The MLIR text of `exported(*args)` (a jax.export.export(..., platforms=["cuda"])),
    lowered from this CPU as for an H100. Pallas's Triton lowering reads the GPU's compute
    capability: jax 0.10 assumes 9.0 where no GPU is attached, jax 0.11 and later ask for
    an abstract device (anything but the export itself under that mesh needs a real one)."""
    import jax

    if not hasattr(jax.sharding, "AbstractDevice"):
        return exported(*args).mlir_module()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return exported(*args).mlir_module()
