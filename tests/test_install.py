"""jaxchar as users install it: `python -m build` makes an sdist and builds the wheel from
that sdist (so the wheel's kernels are the sdist's build); the wheel is installed
non-editably into a fresh virtual environment and run from outside the source tree (its
kernels loaded, every shipped config found by name, a few training steps, generations,
`jaxchar env`); and the sdist installed where no C++ compiler works runs on the JAX paths
and says so.

Slow (a venv, the dependencies from pip's cache or the index, three kernel builds): marked
`slow`; the README's test command runs it. pip installs without compiling every module's
bytecode (`--no-compile`: 30 s -> 12 s here); Python compiles what the commands import."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def _run(args, cwd, env=None, timeout=900):
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The sdist and the wheel built from it, from a copy of the tracked tree."""
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "jaxchar"
    files = _run(["git", "ls-files"], REPO).split()
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], src)
    sdist = next(out.glob("jaxchar-*.tar.gz"))
    wheel = next(out.glob("jaxchar-*.whl"))
    return sdist, wheel


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    path = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", path], path.parent)
    return path


def _env(venv: Path, **extra) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "JAXCHAR_DATA"
    }
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
        # no data folder and an empty cache: alice and shakespeare come from the package
        JAXCHAR_CACHE=str(venv / "empty-cache"),
        JAX_PLATFORMS="cpu",
        **extra,
    )
    return env


def test_the_sdist_carries_configs_and_every_kernel_source(dists):
    import tarfile

    with tarfile.open(dists[0]) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames()}
    for config in (REPO / "configs").glob("*.toml"):
        assert f"configs/{config.name}" in names
    for source in (REPO / "jaxchar" / "csrc").iterdir():
        assert f"jaxchar/csrc/{source.name}" in names


def test_the_wheel_trains_and_generates_with_every_shipped_config(dists, venv, tmp_path):
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile"]
    _run([*pip, dists[1]], tmp_path, _env(venv), timeout=1800)
    env = _env(venv)
    jaxchar = venv / "bin" / "jaxchar"
    out = _run([jaxchar, "env"], tmp_path, env)
    assert "C++ kernels:" in out and "config fast" in out
    if _x86_with_avx512():  # the wheel's kernels load from the installed package
        assert "C++ kernels:          avx512" in out, out
    elif _x86_with_avx2():  # built, but no variant for this CPU kind
        assert "lacks the instructions" in out, out
    version = _run([jaxchar, "--version"], tmp_path, env).strip()
    for config in sorted(p.stem for p in (REPO / "configs").glob("*.toml")):
        run = tmp_path / config
        # one step of each config; no held-out text (the held-out score's own tests are
        # elsewhere): a validation pass compiles and runs a second program per config
        sets = ["--set", "train.batch_size=4", "--set", "train.steps_per_call=1"]
        sets += ["--val-fraction", "0"]
        args = ["train", "alice", "--config", config, "--run-dir", run, "--max-steps", "1"]
        _run([jaxchar, *args, *sets, "--set", "train.sample_chars=0", "--quiet"], tmp_path, env)
        assert (run / "run.json").is_file()
    for config in ("fast", "small"):  # stateful and window generation
        text = _run(
            [jaxchar, "generate", tmp_path / config, "--length", "30", "--quiet"], tmp_path, env
        )
        assert len(text.strip("\n")) >= 30
    info = _run([jaxchar, "info", tmp_path / "fast"], tmp_path, env)
    assert f"written by {version}" in info


def _x86_with_avx2() -> bool:
    from jaxchar.lstm import native

    return set(native.CPU_KINDS["avx2"]) <= native.cpu_flags()


def _x86_with_avx512() -> bool:
    from jaxchar.lstm import native

    return set(native.VARIANTS["avx512"]) <= native.cpu_flags()


def _reinstall_sdist(dists, venv, tmp_path, env):
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile"]
    _run([*pip, "setuptools>=70.1"], tmp_path, _env(venv))  # the build backend, in the venv
    reinstall = [*pip, "--force-reinstall", "--no-deps", "--no-build-isolation", dists[0]]
    _run(reinstall, tmp_path, env, timeout=1800)


def test_the_sdist_without_a_compiler_runs_on_the_jax_paths(dists, venv, tmp_path):
    # no working C++ compiler: the kernels' build fails, the install does not
    fake = tmp_path / "nocc"
    fake.mkdir()
    for name in ("gcc", "g++", "cc", "c++"):
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
        (fake / name).chmod(0o755)
    env = _env(venv, CC=str(fake / "gcc"), CXX=str(fake / "g++"))
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    _reinstall_sdist(dists, venv, tmp_path, env)
    jaxchar = venv / "bin" / "jaxchar"
    out = _run([jaxchar, "env", "--config", "fast"], tmp_path, _env(venv))
    assert "not built" in out and "native" not in out.split("config fast")[1]
    run = tmp_path / "run"
    args = ["train", "alice", "--config", "tiny", "--run-dir", run, "--max-steps", "2"]
    out = _run([jaxchar, *args], tmp_path, _env(venv))
    assert "backend: fused" in out
    assert _run([jaxchar, "generate", run, "--length", "20", "--quiet"], tmp_path, _env(venv))
