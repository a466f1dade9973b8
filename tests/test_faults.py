"""Interruption, damaged checkpoints, non-finite losses: nothing saved is lost."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import DATA

from jaxchar.checkpoint import CheckpointError, RunDir, load_checkpoint
from jaxchar.cli import main
from jaxchar.config import Config, override
from jaxchar.corpus import prepare
from jaxchar.train import TrainingError, fit, with_vocab

TINY = [
    "--config",
    "tiny",
    "--set",
    "train.save_every_steps=5",
    "--set",
    # one step a call, as the interrupted runs below use (a signal must find a save soon):
    # resume is exact for the same config, and a different steps_per_call need not give the
    # same float bits (XLA may fuse a step inside the scan of steps differently)
    "train.steps_per_call=1",
    "--set",
    "train.log_every=5",
]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "alice.txt"
    path.write_text((DATA / "wonderland.txt").read_text()[:20000])
    return path


def _train_cmd(text_file, run_dir, *extra):
    return [
        sys.executable,
        "-m",
        "jaxchar",
        "train",
        str(text_file),
        "--run-dir",
        str(run_dir),
        *TINY,
        *extra,
    ]


def _wait_for_save(run_dir: Path, proc, count=1, timeout=120):
    began = time.time()
    while time.time() - began < timeout:
        lines = (
            (run_dir / "metrics.jsonl").read_text().splitlines()
            if (run_dir / "metrics.jsonl").exists()
            else []
        )
        if len(lines) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read()}")
        time.sleep(0.2)
    pytest.fail("no checkpoint appeared in time")


def _log(run: Path) -> list[dict]:
    """metrics.jsonl without timings and without the saves made on interruption."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    drop = ("wall_s", "chars_per_s")
    return [{k: v for k, v in m.items() if k not in drop} for m in lines if "interrupted" not in m]


def _resume_and_compare(text_file, run, straight_run):
    """--resume the run to its end; its params and its metrics.jsonl lines (timings and
    interruption saves aside) must equal the uninterrupted run's."""
    again = [sys.executable, "-m", "jaxchar", "train", str(text_file), "--run-dir", str(run)]
    resumed = subprocess.run([*again, "--resume", "--quiet"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for x, y in zip(
        jax.tree.leaves(_params(run, 30)), jax.tree.leaves(_params(straight_run, 30)), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    assert _log(run) == _log(straight_run)


def _params(run_dir, step):
    return load_checkpoint(run_dir, step=step)[0]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, text_file):
    run = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(_train_cmd(text_file, run, "--max-steps", "30", "--quiet"), check=True)
    return run


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_says_how_to_resume_then_resume_matches(
    signum, tmp_path, text_file, straight_run
):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(text_file, run, "--max-steps", "30"),
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_save(run, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    with RunDir.open(run) as opened:
        steps = opened.steps()
    assert steps and max(steps) < 30
    _resume_and_compare(text_file, run, straight_run)


@pytest.mark.slow  # starts processes
def test_kill_9_loses_only_unsaved_work_and_resume_is_exact(tmp_path, text_file, straight_run):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(text_file, run, "--max-steps", "30", "--quiet"),
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_save(run, proc, count=2)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    with RunDir.open(run) as opened:
        assert opened.steps()  # what was saved is still readable
    _resume_and_compare(text_file, run, straight_run)


def _small_setup(alice_text, *sets):
    cfg = override(
        Config(),
        [
            "model.hidden=16",
            "model.encoding=embed",
            "model.embed_dim=8",
            "data.seq_length=16",
            "train.batch_size=8",
            "data.objective=sequence",
            *sets,
        ],
    )
    corpus = prepare(alice_text[:8000], cfg.data)
    return with_vocab(cfg, len(corpus.vocab)), corpus


def test_damaged_latest_checkpoint_is_skipped_on_resume_and_never_best(alice_text, tmp_path):
    cfg, corpus = _small_setup(
        alice_text, "train.max_steps=15", "train.save_every_steps=5", "train.keep_best=5"
    )
    run = RunDir.create(tmp_path / "run", cfg, corpus.vocab)
    fit(cfg, corpus.train_ids, checkpointer=run)
    run.close()
    # damage step 15: truncate every array file of its params
    damaged = 0
    for f in (tmp_path / "run" / "checkpoints" / "15" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.name != "_METADATA":
            f.write_bytes(f.read_bytes()[:7])
            damaged += 1
    assert damaged
    reopened = RunDir.open(tmp_path / "run")
    state_like = fit(override(cfg, ["train.max_steps=1"]), corpus.train_ids).state
    from jaxchar.train import zero_totals

    restored = reopened.restore_latest({"state": state_like, "totals": zero_totals()})
    assert int(restored["state"].step) == 10  # fell back to the previous good save
    with pytest.raises(CheckpointError, match="checkpoint 15 .* is damaged"):
        reopened.load_params(15)
    reopened.close()


def test_deleted_metadata_is_detected(alice_text, tmp_path, capsys):
    cfg, corpus = _small_setup(alice_text, "train.max_steps=5", "train.save_every_steps=5")
    run = RunDir.create(tmp_path / "run", cfg, corpus.vocab)
    fit(cfg, corpus.train_ids, checkpointer=run)
    run.close()
    for f in (tmp_path / "run" / "checkpoints" / "5").rglob("*"):
        if f.is_file() and "meta" in str(f.relative_to(tmp_path / "run" / "checkpoints" / "5")):
            f.unlink()
    assert main(["generate", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxchar: error:") and "\n" not in err


def test_unknown_format_version_is_refused(alice_text, tmp_path, capsys):
    cfg, corpus = _small_setup(alice_text)
    RunDir.create(tmp_path / "run", cfg, corpus.vocab).close()
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    info["format_version"] = 99
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    assert main(["info", str(tmp_path / "run")]) == 2
    assert "format version 99" in capsys.readouterr().err


def test_nonfinite_loss_stops_and_is_never_saved(alice_text, tmp_path):
    cfg, corpus = _small_setup(
        alice_text, "train.max_steps=10", "train.save_every_steps=5", "train.learning_rate=3e38"
    )
    run = RunDir.create(tmp_path / "run", cfg, corpus.vocab)
    with pytest.raises(TrainingError, match="loss became"):
        fit(cfg, corpus.train_ids, checkpointer=run)
    for step in run.steps():  # whatever was saved before the blow-up is finite
        assert np.isfinite(run.meta(step)["metrics"]["train_loss"])
    run.close()


def test_skip_nonfinite_drops_bad_updates(alice_text):
    cfg, corpus = _small_setup(
        alice_text, "train.max_steps=6", "train.skip_nonfinite=true", "train.steps_per_call=3"
    )
    ids = corpus.train_ids.copy()
    result = fit(cfg, ids)
    assert result.skipped == 0
    # an absurd learning rate blows the weights up; the updates that would turn them
    # into inf/NaN are dropped, so the params stay finite and the run survives
    bad = override(cfg, ["train.learning_rate=3e38"])
    result = fit(bad, ids)
    assert result.skipped >= 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(result.state.params))


def test_unwritable_run_dir_fails_before_training(tmp_path, text_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        main(["train", str(text_file), "--config", "tiny", "--run-dir", str(blocker / "run")]) == 2
    )
    assert "cannot write" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_onehot_vocabulary_limit(tmp_path, capsys):
    path = tmp_path / "wide.txt"
    path.write_text("".join(chr(0x4E00 + i) for i in range(1500)) * 3)
    code = main(
        [
            "train",
            str(path),
            "--config",
            "tiny",
            "--set",
            "model.encoding=onehot",
            "--run-dir",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2 and "too large" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_env_is_not_read_by_the_library():
    src = Path(__file__).resolve().parents[1] / "jaxchar"
    for f in src.glob("*.py"):
        if f.name != "cli.py":
            assert "os.environ" not in f.read_text(), f.name


@pytest.mark.slow  # starts processes
def test_second_interrupt_quits_at_once_and_keeps_saved_work(tmp_path, text_file):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(text_file, run, "--max-steps", "100000"),
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_save(run, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    with RunDir.open(run) as opened:  # what was saved before is intact
        step = opened.best_step()
        assert step is not None
        opened.load_params(step)


def test_half_written_checkpoint_is_ignored(alice_text, tmp_path):
    """What a kill during a save leaves behind: orbax writes each step into a temporary
    folder and renames it when complete, so a killed save is a *.orbax-checkpoint-tmp-*
    folder. It must never count as a checkpoint, and resume continues from the last one."""
    cfg, corpus = _small_setup(alice_text, "train.max_steps=10", "train.save_every_steps=5")
    with RunDir.create(tmp_path / "run", cfg, corpus.vocab) as run:
        fit(cfg, corpus.train_ids, checkpointer=run)
    partial = tmp_path / "run" / "checkpoints" / "15.orbax-checkpoint-tmp-1234567"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "half.bin").write_bytes(b"\x00" * 17)
    longer = override(cfg, ["train.max_steps=20"])
    with RunDir.open(tmp_path / "run") as run:
        assert run.steps() == [5, 10]
        result = fit(longer, corpus.train_ids, checkpointer=run)
        assert int(result.state.step) == 20 and 20 in run.steps() and 15 in run.steps()
    straight = fit(longer, corpus.train_ids)
    for x, y in zip(
        jax.tree.leaves(result.state.params), jax.tree.leaves(straight.state.params), strict=True
    ):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def three_saves(tmp_path_factory, text_file):
    """A tiny run with saves at steps 10, 20 and 30 (keep-best 3: all kept)."""
    run = tmp_path_factory.mktemp("three") / "run"
    args = ["train", str(text_file), "--run-dir", str(run), *TINY[:2], "--max-steps", "30"]
    sets = ["--set", "train.save_every_steps=10", "--set", "train.sample_chars=0", "--quiet"]
    assert main([*args, *sets]) == 0
    return run


def _damage_params(run: Path, step: int) -> None:
    """Truncates the largest data file of the step's params (a disk that filled up)."""
    files = [f for f in (run / "checkpoints" / str(step) / "params").rglob("*") if f.is_file()]
    largest = max(files, key=lambda f: f.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:100])


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_command_passes_over_a_damaged_newest_checkpoint(
    three_saves, text_file, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(three_saves, run)
    _damage_params(run, 30)
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "30      1" in out and "(damaged: its params cannot be read)" in out
    assert [line for line in out.splitlines() if "<- best" in line][0].split()[0] == "20"
    for argv in (
        ["generate", str(run), "--length", "10", "--prompt", "alice"],
        ["evaluate", str(run), str(text_file)],
        ["export", str(run), str(tmp_path / "exported")],
    ):
        assert main(argv) == 0, argv
        err = capsys.readouterr().err
        assert "note: skipped checkpoint 30: it is damaged; using an earlier one" in err, argv
    assert main(["evaluate", str(run), str(text_file), "--step", "30"]) == 2
    assert "checkpoint 30" in capsys.readouterr().err
    # resume: from 20, the damaged 30 written again, then on to 40; no duplicate log lines
    again = ["train", str(text_file), "--run-dir", str(run), "--resume", "--max-steps", "40"]
    assert main([*again, "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "skipped checkpoint 30" in err and "resuming at step 20" in err
    assert "Traceback" not in err and "StepAlreadyExists" not in err
    steps = [m["step"] for m in _lines(run)]
    assert steps == [10, 20, 30, 36, 40]  # 36: the end of the first epoch
    original = {m["step"]: m for m in _lines(three_saves)}
    assert _lines(run)[2]["val_loss"] == original[30]["val_loss"]  # the same training
    with RunDir.open(run) as opened:
        assert opened.read_params(30) is not None and opened.best_step() == 40


@pytest.mark.slow  # starts processes
def test_every_file_emptied_is_damage_not_an_empty_run(three_saves, text_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_saves, run)
    for f in (run / "checkpoints").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    # a real process: orbax's logs and leftover threads must stay off stderr
    cmd = [sys.executable, "-m", "jaxchar"]
    done = subprocess.run([*cmd, "generate", str(run)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("jaxchar: error: every checkpoint in")
    assert "damaged" in done.stderr and "train it first" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line: no absl, no traceback
    info = subprocess.run([*cmd, "info", str(run)], capture_output=True, text=True)
    assert info.returncode == 0 and info.stdout.count("(damaged:") == 3, info.stdout
    assert "ERROR" not in info.stderr and "Traceback" not in info.stderr, info.stderr
    # resuming starts again (the damaged saves replaced) and ends as the first run did
    assert main(["train", str(text_file), "--run-dir", str(run), "--resume", "--quiet"]) == 0
    assert [m["val_loss"] for m in _lines(run)] == [m["val_loss"] for m in _lines(three_saves)]


@pytest.fixture(scope="module")
def other_shape(tmp_path_factory, text_file):
    """A run of another model size (hidden 16, not tiny's 32), saved at step 5."""
    run = tmp_path_factory.mktemp("other") / "run"
    args = ["train", str(text_file), "--run-dir", str(run), *TINY[:2], "--max-steps", "5"]
    sets = ["--set", "model.hidden=16", "--set", "train.sample_chars=0", "--quiet"]
    assert main([*args, *sets]) == 0
    return run


def _plant(foreign: Path, run: Path, step: int, loss: float) -> None:
    """Copies `foreign`'s checkpoint into `run` as if it were run's own (a copy gone wrong),
    with a recorded loss lower than any of run's."""
    shutil.copytree(foreign / "checkpoints" / "5", run / "checkpoints" / str(step))
    for meta in (run / "checkpoints" / str(step) / "meta").rglob("*"):
        try:
            saved = json.loads(meta.read_text())
        except (ValueError, UnicodeDecodeError, IsADirectoryError):
            continue
        if isinstance(saved, dict) and "metrics" in saved:
            saved["metrics"].update(step=step, train_loss=loss, val_loss=loss)
            meta.write_text(json.dumps(saved))


def test_a_checkpoint_of_another_models_shape_is_passed_over_by_every_reader(
    three_saves, other_shape, text_file, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(three_saves, run)
    _plant(other_shape, run, 25, loss=0.01)
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.split()[:1] == ["25"]][0]
    assert "(skipped: its parameters do not fit this run's model" in line and "16" in line
    assert [x for x in out.splitlines() if "<- best" in x][0].split()[0] != "25"
    for argv in (
        ["generate", str(run), "--length", "10", "--prompt", "alice"],
        ["evaluate", str(run), str(text_file)],
        ["export", str(run), str(tmp_path / "exported")],
    ):
        assert main(argv) == 0, argv
        err = capsys.readouterr().err
        assert "note: skipped checkpoint 25: its parameters do not fit" in err, argv
    # the bundle loads back and is the run's own best checkpoint
    from jaxchar.checkpoint import load_export

    params, cfg, _ = load_export(tmp_path / "exported")
    with RunDir.open(run) as opened:
        want, step = opened.load_params()
        assert step != 25
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)
    assert main(["evaluate", str(run), str(text_file), "--step", "25"]) == 2
    assert "checkpoint 25" in capsys.readouterr().err
    # resuming passes over it too, and never deletes it
    again = ["train", str(text_file), "--run-dir", str(run), "--resume", "--max-steps", "40"]
    assert main([*again, "--epochs", "2", "--quiet"]) == 0
    assert (run / "checkpoints" / "25").is_dir()


def test_a_run_whose_only_checkpoint_is_another_models_is_refused_in_one_line(
    three_saves, other_shape, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(three_saves, run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "checkpoints").mkdir()
    _plant(other_shape, run, 5, loss=0.5)
    for argv in (
        ["generate", str(run), "--length", "10"],
        ["export", str(run), str(tmp_path / "exported")],
        ["serve", str(run), "--port", "0"],  # refused before it listens
    ):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "fits this run's model" in err and err.count("\n") == 1, err
    assert not (tmp_path / "exported").exists()


def test_a_save_whose_metrics_line_was_lost_gets_it_back_on_resume(
    three_saves, text_file, tmp_path
):
    # the state a kill -9 leaves between orbax's commit of save 30 and its line in
    # metrics.jsonl: the save is there, the line is not
    run = tmp_path / "run"
    shutil.copytree(three_saves, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    again = ["train", str(text_file), "--run-dir", str(run), "--resume", "--quiet"]
    assert main([*again, "--max-steps", "30"]) == 0
    assert _lines(run) == _lines(three_saves)
