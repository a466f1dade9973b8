"""jaxchar.run: everything the CLI does is one library call, and gives the same result."""

import json
import shutil

import jax
import numpy as np
import pytest

import jaxchar
from jaxchar.cli import main
from jaxchar.config import ConfigError, load_config, override
from jaxchar.corpus import encode_text, read_text
from jaxchar.run import Run, train_run
from jaxchar.sampling import sample
from jaxchar.train import evaluate


@pytest.mark.parametrize("which", ["window_run", "fast_run"])
def test_python_and_cli_generate_the_same_text(which, request, capsys):
    """A window-trained run (the tutorial's small config) samples in window mode both ways;
    the default config's run in stateful mode."""
    path = request.getfixturevalue(which)
    argv = ["generate", str(path), "--prompt", "alice was ", "--length", "40", "--seed", "3"]
    assert main([*argv, "--temperature", "0.7", "--quiet"]) == 0
    printed = capsys.readouterr().out
    with Run.open(path) as run:
        texts = run.generate("alice was ", seed=3, length=40, temperature=0.7)
        streamed = "".join(run.stream("alice was ", seed=3, length=40, temperature=0.7))
        mode = run.options().mode
        params, _ = run.params()
        cfg = run.cfg
    assert mode == ("window" if which == "window_run" else "stateful")
    assert printed == texts[0] + "\n" and streamed == texts[0] and len(texts[0]) == 40
    # and both are jaxchar.sample with the run's settings, by hand
    ids = sample(
        params,
        jax.random.PRNGKey(3),
        run.vocab.encode("alice was "),
        cfg=cfg.model,
        length=40,
        temperature=0.7,
        mode=mode,
        seq_length=cfg.data.seq_length,
    )
    assert run.vocab.decode(ids) == texts[0]


def test_several_samples_and_the_default_prompt(tiny_run, capsys):
    with Run.open(tiny_run) as run:
        texts = run.generate(seed=5, num_samples=3, length=25)
        prompt = run.default_prompt(5)
    assert len(texts) == 3 and all(len(t) == 25 for t in texts)
    assert len(prompt) == run.cfg.data.seq_length  # a window of the recorded training text
    assert prompt in read_text(json.loads((tiny_run / "corpus.json").read_text())["path"]).lower()
    assert (
        main(["generate", str(tiny_run), "--seed", "5", "--num-samples", "3", "--length", "25"])
        == 0
    )
    out = capsys.readouterr().out
    assert all(text in out for text in texts)


def test_options_come_from_the_config_and_are_checked(tiny_run):
    with Run.open(tiny_run) as run:
        assert run.options() == jaxchar.SampleConfig(
            **{**run.cfg.sample.__dict__, "mode": "stateful"}
        )
        assert run.options(temperature=0.5, length=7).temperature == 0.5
        assert run.options(top_k=0).top_k == 0  # off, as in the config and the server
        for bad in ({"top_k": -1}, {"top_k": len(run.vocab) + 1}, {"temperature": float("nan")}):
            with pytest.raises(ConfigError):
                run.options(**bad)
        with pytest.raises(ConfigError, match="empty"):
            run.encode_prompt("")


def test_evaluate_matches_the_pure_function_and_the_cli(tiny_run, alice_text, tmp_path, capsys):
    text = alice_text[30000:34000]
    (tmp_path / "held.txt").write_text(text)
    with Run.open(tiny_run) as run:
        result = run.evaluate(text)
        from_file = run.evaluate(file=tmp_path / "held.txt")
        params, step = run.params()
        ids, spans = encode_text(text, run.cfg.data, run.vocab)
        direct = evaluate(params, run.cfg, ids, spans)
    assert (
        result == from_file and result.step == step and 0.85 * len(ids) < result.chars <= len(ids)
    )
    assert result.loss == pytest.approx(direct, rel=1e-6) and 0 < result.bpc < 8
    assert main(["evaluate", str(tiny_run), str(tmp_path / "held.txt")]) == 0
    assert f"{result.loss:.4f} nats/char" in capsys.readouterr().out


def test_train_from_python_then_resume_with_more_steps(alice_slice, tmp_path):
    cfg = override(load_config("tiny"), ["train.max_steps=10", "train.save_every_steps=5"])
    events = []
    first = train_run(alice_slice, tmp_path / "run", cfg, log=events.append)
    assert first.best_step in (5, 10) and not first.interrupted
    kinds = {e["event"] for e in events}
    assert {"corpus", "backend", "start", "save", "samples"} <= kinds
    assert (tmp_path / "run" / "samples.txt").read_text().count("--- step") == 2
    more = []
    again = train_run(
        alice_slice, tmp_path / "run", resume=True, changes=["train.max_steps=15"], log=more.append
    )
    assert int(again.result.state.step) == 15
    notes = [e["text"] for e in more if e["event"] == "note"]
    assert notes == ["resuming with train.max_steps = 15 (the run had 10)"]
    # the stored config says 15 now: a later resume does not stop at 10
    assert (
        json.loads((tmp_path / "run" / "run.json").read_text())["config"]["train"]["max_steps"]
        == 15
    )
    with pytest.raises(ConfigError, match="only train.epochs, train.max_steps"):
        train_run(alice_slice, tmp_path / "run", resume=True, changes=["train.batch_size=7"])


def test_resume_accepts_the_runs_own_options_and_refuses_other_values(
    tiny_run, alice_slice, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    base = ["train", str(alice_slice), "--run-dir", str(run), "--resume"]
    for extra, said in (
        (["--batch-size", "7"], "train.batch_size: the run has 16, this asks 7"),
        (["--config", "small"], "model.hidden: the run has 32, this asks 256"),
        (["--set", "model.hidden=8"], "model.hidden: the run has 32, this asks 8"),
        (["--seed", "3"], "train.seed: the run has 0, this asks 3"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jaxchar: error: a resumed run keeps its config"), err
        assert said in err and "\n" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing changed
    # up-arrow and --resume: the command that made the run (tests/conftest.py's tiny_run)
    again = ["--config", "tiny", "--set", "train.max_steps=20", "--set", "train.sample_chars=30"]
    assert main([*base, *again, "--seed", "0", "--quiet"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # it was done
    # and with more steps, the one change a resume may make
    more = ["--config", "tiny", "--set", "train.sample_chars=30", "--max-steps", "25"]
    assert main([*base, *more, "--quiet"]) == 0
    assert "25" in [p.name for p in (run / "checkpoints").iterdir()]


def test_a_run_sized_by_minutes_stores_its_length_and_resumes_with_it(
    alice_slice, tmp_path, capsys, monkeypatch
):
    """`jaxchar train --minutes M`: the steps that fit are chosen before the run directory
    is written, and stored in its config; the same command with --resume keeps that length
    (no second timing, nothing more to do), and a budget too small for one step is
    refused in one line with nothing written."""
    monkeypatch.setattr("jaxchar.train.SIZING_MIN_S", 0.05)  # what is timed is not checked
    run = tmp_path / "run"
    cmd = ["train", str(alice_slice), "--run-dir", str(run), "--config", "tiny"]
    cmd += ["--minutes", "5", "--max-steps", "12", "--set", "train.sample_chars=0"]
    assert main(cmd) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("train.minutes = 5:")]
    assert len(said) == 1 and "(train.max_steps = 12)" in said[0], err  # 12 caps 5 minutes
    stored = json.loads((run / "run.json").read_text())["config"]["train"]
    assert stored["minutes"] == 5 and stored["max_steps"] == 12
    assert main([*cmd, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "train.minutes" not in err and "resuming at step 12 of 12" in err, err
    # a restated budget with no length given means the length the run chose
    assert main([*cmd, "--resume", "--set", "train.max_steps=0"]) == 0
    err = capsys.readouterr().err
    assert "train.minutes" not in err and "resuming at step 12 of 12" in err, err
    # without a cap the time decides: 0.0005 minutes (less than the timing) leave no step
    small = tmp_path / "small"
    refused = ["train", str(alice_slice), "--run-dir", str(small), "--config", "tiny"]
    assert main([*refused, "--minutes", "0.0005", "--max-steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("jaxchar: error: train.minutes = 0.0005 leaves no time") and "\n" not in err
    )
    assert not small.exists()


def test_package_names_load_on_first_use():
    """`import jaxchar` is cheap (the CLI's --help needs no JAX); the names still work."""
    import subprocess
    import sys

    code = (
        "import sys, jaxchar; assert 'jax' not in sys.modules, 'jax imported'; "
        "jaxchar.Run; jaxchar.sample; assert 'jax' in sys.modules; "
        "from jaxchar.cli import build_parser; "
        "print({'Run', 'train_run', 'sample'} <= set(jaxchar.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
    import importlib
    import types

    for module in ("checkpoint", "config", "corpus", "data", "model", "run", "sampling", "train"):
        importlib.import_module(f"jaxchar.{module}")  # a submodule must not hide a name
    for name in jaxchar.__all__:
        assert not isinstance(getattr(jaxchar, name), types.ModuleType), name


def test_evaluate_on_the_held_out_text_gives_trainings_validation_loss(tiny_run, tmp_path, capsys):
    """`jaxchar evaluate RUN FILE` on the held-out text reproduces the val loss that
    training logged for that checkpoint, and says how many characters it scored."""
    from jaxchar.corpus import prepare

    with Run.open(tiny_run) as run:
        d = run.cfg.data
        path = json.loads((tiny_run / "corpus.json").read_text())["path"]
        held_out = prepare(read_text(path, d.encoding, d.errors), d).val_ids
        logged = run.metrics(run.best_step())
    text = run.vocab.decode(held_out)
    (tmp_path / "held.txt").write_text(text)
    assert main(["evaluate", str(tiny_run), str(tmp_path / "held.txt")]) == 0
    out = capsys.readouterr().out
    assert f"{logged['val_loss']:.4f} nats/char" in out
    assert f"({logged['val_chars']} characters scored" in out
    assert logged["val_text_chars"] == len(held_out)


def test_evaluate_with_a_bounded_context_against_a_loop_of_fresh_chunks(tiny_run, alice_text):
    """--context N: every character but the first scored once (the text's tail too), from
    a fresh state at most N characters back; the reference reads each chunk as a row of its
    own and scores it with a numpy log-softmax."""
    from jaxchar.model import apply

    text, context = alice_text[40000:43013].lower(), 25  # 3,012 targets: a partial last chunk
    with Run.open(tiny_run) as run:
        got = run.evaluate(text, context=context)
        params, _ = run.params()
        ids, _ = encode_text(text, run.cfg.data, run.vocab)
        cfg = run.cfg
    assert (len(ids) - 1) % context and (len(ids) - 1) // context > cfg.train.batch_size
    # the whole chunks as rows of one call (rows do not interact), the partial last one alone
    whole = (len(ids) - 1) // context
    chunks = [
        np.asarray(ids[a : a + context + 1], np.int32) for a in range(0, whole * context, context)
    ]
    last = np.asarray(ids[whole * context :], np.int32)
    total = 0.0
    for rows in (np.stack(chunks), last[None]):
        logits, _ = apply(params, cfg.model, rows[:, :-1])  # each row from a fresh (zero) state
        z = np.asarray(logits, np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))  # a numpy log-softmax
        total -= float(np.take_along_axis(logp, rows[:, 1:, None], axis=2).sum())
    assert got.chars == len(ids) - 1  # every character but the first
    assert got.loss == pytest.approx(total / (len(ids) - 1), rel=1e-4)
    assert got.loss > run.evaluate(text).loss  # less context, a higher loss


def test_the_held_out_score_depends_on_eval_rows_not_on_the_batch_size(tiny_run, alice_text):
    """train.eval_rows fixes how many in-order streams the held-out text is cut into, so
    that runs of different batch sizes are scored alike; 0 means the batch size (as before
    the option existed). Windows are each read from a fresh state: their rows change
    nothing."""
    from jaxchar.train import score

    text = alice_text[40000:46000].lower()
    with Run.open(tiny_run) as run:
        params, _ = run.params()
        ids, _ = encode_text(text, run.cfg.data, run.vocab)
        cfg = run.cfg

    def scored(*sets, objective="sequence"):
        c = override(cfg, [f"data.objective={objective}", *sets])
        return score(params, c, ids).loss

    eight = scored("train.batch_size=8")
    assert scored("train.batch_size=3", "train.eval_rows=8") == eight
    assert scored("train.batch_size=64", "train.eval_rows=8") == eight
    assert scored("train.batch_size=8", "train.eval_rows=2") != eight  # fewer fresh starts
    windows = scored("train.batch_size=8", objective="window")
    again = scored("train.batch_size=8", "train.eval_rows=5", objective="window")
    assert again == pytest.approx(windows, rel=1e-6)
    with pytest.raises(ConfigError, match="eval_rows"):
        override(cfg, ["train.eval_rows=-1"])
