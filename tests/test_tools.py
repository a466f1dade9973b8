"""Progress, metrics log, samples while training, streaming, interactive, export, evaluate,
plot."""

import contextlib
import io
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, shipped_configs

from jaxchar.checkpoint import load_checkpoint, load_export
from jaxchar.cli import main
from jaxchar.model import apply
from jaxchar.sampling import sample, sample_stream

SHIPPED = shipped_configs()  # the default in the quick loop; all in the whole suite


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "alice.txt"
    path.write_text((DATA / "wonderland.txt").read_text()[:25000])
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_file):
    """A tiny run trained through the CLI (in-process), with its stderr (not a TTY)."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(
            [
                "train",
                str(text_file),
                "--config",
                "tiny",
                "--run-dir",
                str(run),
                "--set",
                "train.sample_chars=30",
                "--tensorboard",
            ]
        )
    assert code == 0, err.getvalue()
    return run, err.getvalue()


def test_progress_is_plain_lines_when_not_a_terminal(run):
    _, err = run
    lines = err.splitlines()
    assert any(line.startswith("epoch 1 step 10/40 loss") and "chars/s" in line for line in lines)
    assert "\r" not in err  # no progress-bar redraws in a log file


def test_metrics_log_schema(run):
    path, _ = run
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40]
    for r in rows:
        for key in (
            "step",
            "epoch",
            "train_loss",
            "train_bpc",
            "val_loss",
            "val_bpc",
            "lr",
            "chars_per_s",
            "wall_s",
        ):
            assert key in r, key
        assert abs(r["train_bpc"] - r["train_loss"] / np.log(2)) < 1e-9
        assert r["chars_per_s"] > 0 and r["wall_s"] > 0


def test_tensorboard_event_file_holds_the_metrics(run):
    path, _ = run
    events = list((path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    for tag in (b"train_loss", b"val_loss", b"val_bpc", b"lr"):
        assert tag in data


def test_samples_while_training_are_shown_and_saved(run):
    path, err = run
    saved = (path / "samples.txt").read_text()
    assert saved.count("[temperature 0.2]") == 2 and "--- step 40" in saved
    assert "[temperature 1.0]" in err


def test_streamed_equals_batched_for_the_same_seed(run):
    params, cfg, vocab = load_checkpoint(run[0])
    prompt = jnp.asarray(vocab.encode("alice "))
    kw = dict(cfg=cfg.model, length=45, temperature=0.9, top_p=0.95)
    whole = sample(params, jax.random.PRNGKey(5), prompt, **kw)
    parts = list(sample_stream(params, jax.random.PRNGKey(5), prompt, chunk=16, **kw))
    assert [p.shape[0] for p in parts] == [16, 16, 13]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    window = dict(kw, mode="window", seq_length=cfg.data.seq_length)
    np.testing.assert_array_equal(
        np.concatenate(
            list(sample_stream(params, jax.random.PRNGKey(1), prompt, chunk=7, **window))
        ),
        sample(params, jax.random.PRNGKey(1), prompt, **window),
    )


def test_generate_output_file_matches_stdout(run, tmp_path, capsys):
    args = [
        "generate",
        str(run[0]),
        "--prompt",
        "alice",
        "--length",
        "50",
        "--seed",
        "2",
        "--temperature",
        "0.7",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert main([*args, "--output", str(tmp_path / "out.txt")]) == 0
    assert (tmp_path / "out.txt").read_text() == printed
    assert capsys.readouterr().out == ""


def test_interactive_mode_through_stdin(run, monkeypatch, capsys):
    script = "alice was\n:temp 0.5\n:len 20\n:seed 3\n:bogus\nthe \n:quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    argv = ["generate", str(run[0]), "--interactive", "--length", "30", "--temperature", "0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert [len(line) for line in out.splitlines()] == [30, 20]
    assert "unknown command :bogus" in err and "temperature 0.5, length 20, seed 3" in err
    # the second prompt's text is what a plain generate gives for the same settings
    plain = ["generate", str(run[0]), "--prompt", "the ", "--length", "20", "--seed", "3"]
    assert main([*plain, "--temperature", "0.5", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [out.splitlines()[1]]


def test_export_round_trip_gives_the_same_logits(run, tmp_path):
    assert main(["export", str(run[0]), str(tmp_path / "exp")]) == 0
    params, cfg, vocab = load_checkpoint(run[0])
    params2, cfg2, vocab2 = load_export(tmp_path / "exp")
    assert cfg2 == cfg and vocab2 == vocab
    ids = jnp.asarray(vocab.encode("alice was beginning"))[None]
    np.testing.assert_array_equal(
        apply(params, cfg.model, ids)[0], apply(params2, cfg2.model, ids)[0]
    )
    assert main(["export", str(run[0]), str(tmp_path / "exp")]) == 2  # never overwrites


def test_evaluate_reports_loss_and_bits(run, text_file, capsys):
    assert main(["evaluate", str(run[0]), str(text_file)]) == 0
    out = capsys.readouterr().out
    nats = float(out.split(": ")[1].split(" nats")[0])
    bits = float(out.split(", ")[1].split(" bits")[0])
    assert 0.5 < nats < 5 and abs(bits - nats / np.log(2)) < 1e-3


def test_plot_writes_a_png(run, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "loss.png"
    assert main(["plot", str(run[0]), str(run[0]), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_bench_measures_a_config_and_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--config", "tiny", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tiny" in table and "train chars/s" in table
    record = json.loads(out.read_text())
    assert record["platform"] == "cpu" and record["quick"] is True and record["jax"]
    tiny = record["configs"]["tiny"]
    figures = [tiny["train"][k] for k in ("compile_s", "step_ms", "chars_per_s", "tflop_per_s")] + [
        tiny[g]["chars_per_s"] for g in ("generate_1", "generate_64")
    ]
    assert all(np.isfinite(x) and x > 0 for x in figures), tiny
    assert tiny["generate_64"]["rows"] == 64 and tiny["train"]["backend"]
    assert tiny["train"]["xla_flops_per_step"] > 0 and tiny["train"]["xla_bytes_per_step"] > 0


def test_bench_applies_set_to_every_config(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--config", "tiny", "--set", "model.impl=scan"]
    assert main([*args, "--json", str(out), "--quiet"]) == 0
    assert "with model.impl=scan" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["changes"] == ["model.impl=scan"]
    assert record["configs"]["tiny"]["train"]["backend"] == "scan"


def test_bench_by_default_leaves_the_gpu_sized_configs_to_gpus(capsys):
    # on this CPU: every shipped config but shakespeare_gpu (seconds a step here), and a
    # line that says so
    from jaxchar.cli.bench import _default_names
    from jaxchar.config import shipped_names

    names = _default_names(quiet=False)
    assert "shakespeare_gpu" in shipped_names() and "shakespeare_gpu" not in names
    assert set(names) == set(shipped_names()) - {"shakespeare_gpu"}
    assert "shakespeare_gpu" in capsys.readouterr().err


@pytest.mark.parametrize("name", SHIPPED)
def test_xla_counts_the_flops_the_bench_assumes(name):
    """XLA's cost analysis of a shipped config's train step (unrolled, so that every
    timestep counts) agrees with the matrix-product count that bench's FLOP/s rests on: a
    few percent more, for the gates, the loss and Adam."""
    from jaxchar.bench import VOCAB, train_flops_per_step, xla_cost
    from jaxchar.config import load_config
    from jaxchar.train import with_vocab

    cfg = with_vocab(load_config(name), VOCAB)
    cost, products = xla_cost(cfg), train_flops_per_step(cfg)
    assert products <= cost["xla_flops_per_step"] <= 1.1 * products
    # at least the parameters and the batch's activations pass through memory
    assert cost["xla_bytes_per_step"] > 4 * cfg.train.batch_size * cfg.data.seq_length


def test_the_flop_count_against_counting_by_hand():
    from jaxchar.bench import train_flops_per_step
    from jaxchar.config import load_config, override
    from jaxchar.train import with_vocab

    # the tutorial's small model: 1 x LSTM-256 over 100 scaled features, batch 128, the
    # head at the last position only
    small = with_vocab(load_config("small"), 45)
    lstm = 2 * (1 + 256) * 1024  # per row and position
    head = 2 * 256 * 45  # per row, once
    assert train_flops_per_step(small) == 3 * (128 * 100 * lstm + 128 * head)
    # many-to-many: the head at every position
    seq = override(small, ["data.objective=sequence"])
    assert train_flops_per_step(seq) == 3 * 128 * 100 * (lstm + head)


LOAD_EXPORT = """
import json, sys
import jax, numpy as np
from jax import export

out = sys.argv[1]
meta = json.load(open(f"{out}/sampler.json"))
sampler = export.deserialize(bytearray(open(f"{out}/sampler.bin", "rb").read()))
arrays = np.load(f"{out}/params.npz")
params = [arrays[name] for name in meta["params"]]
prompt = np.array(json.loads(sys.argv[2]), np.int32)
key = np.asarray(jax.random.key_data(jax.random.PRNGKey(7)))
ids = sampler.call(params, key, prompt, np.float32(0.8), np.float32(0.9))
assert "jaxchar" not in sys.modules and "flax" not in sys.modules, "more than jax and numpy"
print(json.dumps({"ids": np.asarray(ids).tolist(), "platforms": list(sampler.platforms)}))
"""


@pytest.mark.slow  # starts a process
def test_a_stablehlo_export_samples_without_jaxchar(tiny_run, tmp_path):
    out = tmp_path / "sampler"
    argv = ["export", str(tiny_run), str(out), "--format", "stablehlo", "--length", "40"]
    assert main([*argv, "--rows", "2", "--prompt-length", "6", "--quiet"]) == 0
    assert "export.deserialize" in (out / "README.md").read_text()
    params, cfg, vocab = load_checkpoint(tiny_run)
    prompt = np.stack([vocab.encode("alice "), vocab.encode("the qu")]).astype(np.int32)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_EXPORT, str(out), json.dumps(prompt.tolist())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["platforms"] == ["cpu", "cuda", "tpu"]
    want = sample(
        params,
        jax.random.PRNGKey(7),
        jnp.asarray(prompt),
        cfg=cfg.model,
        length=40,
        temperature=0.8,
        top_p=0.9,
        mode="stateful",
        seq_length=cfg.data.seq_length,
    )
    np.testing.assert_array_equal(np.asarray(result["ids"]), np.asarray(want))
