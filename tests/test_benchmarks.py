"""The benchmarks' own inputs: what they measure must be the work they claim to measure."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from jaxchar.config import DataConfig
from jaxchar.corpus import load_corpus

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_memory  # noqa: E402


def test_memory_corpus_is_loaded_whole(tmp_path):
    # 2 MB spans Shakespeare and a copy of Alice; a Gutenberg header left inside the
    # concatenation made the loader keep only Alice's first copy (144k characters)
    path = bench_memory.build_corpus(2, tmp_path)
    size = path.stat().st_size
    assert size == 2 * bench_memory.MB
    assert load_corpus(path, DataConfig()).total_chars == size


import profile_step  # noqa: E402

# a compiled module in XLA's text form, cut down: a while loop whose body has a product
# fusion, a gate fusion and an in-place update, plus a copy outside the loop
HLO = """HloModule m

%fused_dot (p0: f32[8,4], p1: f32[4,16]) -> f32[8,16] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_gates (p0.1: f32[8,16]) -> f32[8,16] {
  %p0.1 = f32[8,16]{1,0} parameter(0)
  %tanh.1 = f32[8,16]{1,0} tanh(%p0.1)
  ROOT %multiply.1 = f32[8,16]{1,0} multiply(%tanh.1, %p0.1)
}

%fused_update (p0.2: f32[3,8,16], p1.2: f32[8,16], p2.2: s32[]) -> f32[3,8,16] {
  %p0.2 = f32[3,8,16]{2,1,0} parameter(0)
  %p1.2 = f32[8,16]{1,0} parameter(1)
  %bitcast.1 = f32[1,8,16]{2,1,0} bitcast(%p1.2)
  %p2.2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  ROOT %u.1 = f32[3,8,16]{2,1,0} dynamic-update-slice(%p0.2, %bitcast.1, %p2.2, %c0, %c0)
}

%body (arg: (s32[], f32[8,4], f32[3,8,16])) -> (s32[], f32[8,4], f32[3,8,16]) {
  %arg = (s32[], f32[8,4]{1,0}, f32[3,8,16]{2,1,0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%arg), index=0
  %ynn_fusion = f32[8,16]{1,0} fusion(%gte.1, %w), kind=kCustom, calls=%fused_dot
  %tanh_multiply_fusion = f32[8,16]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_gates
  %dus_fusion = f32[3,8,16]{2,1,0} fusion(%gte.2, %gates, %gte.0), kind=kLoop, calls=%fused_update
  ROOT %tuple.1 = (s32[], f32[8,4]{1,0}, f32[3,8,16]{2,1,0}) tuple(%gte.0, %gte.1, %dus_fusion)
}

ENTRY %main (x: f32[8,4]) -> f32[3,8,16] {
  %x = f32[8,4]{1,0} parameter(0)
  %copy.3 = f32[8,4]{1,0} copy(%x)
  %while.1 = (s32[], f32[8,4]{1,0}, f32[3,8,16]{2,1,0}) while(%init), condition=%cond, body=%body
  %custom-call.2 = f32[8,16]{1,0} custom-call(%x), custom_call_target="__cublas$gemm"
  ROOT %gte.9 = f32[3,8,16]{2,1,0} get-tuple-element(%while.1), index=2
}
"""


def test_profile_classifies_operations_by_their_bodies():
    kinds = profile_step.classify(HLO)
    assert kinds["ynn_fusion"] == profile_step.MATMUL  # a fusion is what it calls
    assert kinds["tanh_multiply_fusion"] == profile_step.ELEMENTWISE
    assert kinds["dus_fusion"] == profile_step.MOVES
    assert kinds["copy.3"] == profile_step.MOVES
    assert kinds["custom-call.2"] == profile_step.MATMUL  # cuBLAS on a GPU
    # a loop's own event spans its body's events: counting it too would count twice
    assert "while.1" not in kinds and "tuple.1" not in kinds and "gte.9" not in kinds


def test_profile_sums_events_per_operation_and_keeps_device_events_on_accelerators():
    kinds = profile_step.classify(HLO)
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "name": "ynn_fusion", "pid": 1, "dur": 5.0},
        {"ph": "X", "name": "ynn_fusion", "pid": 1, "dur": 7.0},
        {"ph": "X", "name": "while.1", "pid": 1, "dur": 100.0},
        {"ph": "X", "name": "$python frame", "pid": 1, "dur": 100.0},
        {"ph": "X", "name": "sm90_kernel", "pid": 2, "dur": 3.0, "args": {"hlo_op": "ynn_fusion"}},
    ]
    assert profile_step.aggregate(events, kinds, device_only=False) == {"ynn_fusion": [3, 15.0]}
    assert profile_step.aggregate(events, kinds, device_only=True) == {"ynn_fusion": [1, 3.0]}


@pytest.mark.slow  # starts processes
def test_profile_runs_on_a_real_train_step():
    # the events XLA writes must match the compiled program's instruction names, or every
    # row of the table would be empty
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/profile_step.py"), "train", "--config", "tiny"]
        + ["--calls", "1", "--no-save"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = dict(re.findall(r"^\s*(matrix products|elementwise fusions)\s+([\d,.]+)", out, re.M))
    assert set(rows) == {"matrix products", "elementwise fusions"}, out
    assert all(float(ms.replace(",", "")) > 0 for ms in rows.values()), out


def _bench(script, out, *args):
    """Runs benchmarks/<script>.py with its results written under `out`."""
    return subprocess.run(
        [sys.executable, str(REPO / f"benchmarks/{script}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAXCHAR_BENCH_RESULTS": str(out)},
    )


@pytest.mark.slow  # starts processes
def test_train_benchmark_in_bfloat16_writes_its_own_results_file(tmp_path):
    # a bfloat16 run must not replace the float32 figures, and its peak is a bf16 product's
    args = "--configs tiny --reps 1 --peers --set model.dtype=bfloat16"
    done = _bench("bench_train", tmp_path, *args.split())
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["train_bfloat16.json"]
    result = json.loads((tmp_path / "train_bfloat16.json").read_text())
    tiny = result["results"]["tiny"]
    assert tiny["config"]["model"]["dtype"] == "bfloat16"
    assert set(tiny) & {"jaxchar", "torch", "keras"} == {"jaxchar"}
    assert tiny["peak_flops"] > 0 and tiny["jaxchar"]["share_of_peak"] > 0


@pytest.mark.slow  # starts processes
def test_generate_benchmark_in_bfloat16_writes_its_own_results_file(tmp_path):
    args = "--dtype bfloat16 --length 3 --reps 1 --batches 2 --peers"
    done = _bench("bench_generate", tmp_path, *args.split())
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["generate_bfloat16.json"]
    result = json.loads((tmp_path / "generate_bfloat16.json").read_text())
    assert result["dtype"] == "bfloat16"
    rates = result["results"]["2"]
    assert set(rates) == {"jaxchar window", "jaxchar stateful"}
    assert all(r["chars"] == 6 and r["chars_per_s"] > 0 for r in rates.values())


def _bench_quality(out, *args):
    return _bench("bench_quality", out, "--config", "tiny", *args)


def _quality(out, *args, name="tiny"):
    sets = ["--set", "train.max_steps=4", "--set", "train.steps_per_call=1", "--save-every", "2"]
    done = _bench_quality(out, *sets, *args)
    assert done.returncode == 0, done.stderr
    return json.loads((out / f"quality_{name}.json").read_text()), done.stderr


@pytest.mark.slow  # starts processes
def test_quality_on_the_whole_text_as_the_tutorial_did(tmp_path):
    # no held-out text: no validation loss anywhere, the table says so, and --name keeps
    # the result beside the held-out run's instead of replacing it
    sets = ["--set", "data.val_fraction=0", "--name", "tiny_whole", "--budget-s", "600"]
    result, _ = _quality(tmp_path, *sets, name="tiny_whole")
    assert [p.name for p in tmp_path.iterdir()] == ["quality_tiny_whole.json"]
    assert "data.val_fraction=0" in result["sets"] and result["complete"] is True
    assert [p["step"] for p in result["curve"]] == [2, 4]
    assert all(p["val_loss"] is None and p["train_loss"] > 0 for p in result["curve"])
    assert result["best_val"] is None


@pytest.mark.slow  # starts processes
def test_quality_run_sized_by_minutes_records_what_the_sizing_measured(tmp_path):
    done = _bench_quality(tmp_path, "--set", "train.minutes=0.15", "--budget-s", "120")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "quality_tiny.json").read_text())
    sized = result["sized"]
    assert sized["minutes"] == 0.15 and sized["steps"] > 0 and sized["step_s"] > 0
    assert "train.minutes = 0.15" in done.stderr and result["complete"] is True
    assert result["final"]["step"] <= sized["steps"]
    # fit keeps the sizing's deadline (time_up: it stopped there, short of its steps)
    assert result["time_up"] is (result["final"]["step"] < sized["steps"])


@pytest.mark.slow  # starts processes
def test_quality_run_writes_its_curve_as_it_goes_and_continues_where_it_stopped(tmp_path):
    # the result file is rewritten after every evaluation (a run of hours can be stopped and
    # still leave its curve); the last write marks it complete
    whole, _ = _quality(tmp_path / "whole", "--budget-s", "600")
    assert [p.name for p in (tmp_path / "whole").iterdir()] == ["quality_tiny.json"]
    assert whole["complete"] is True and whole["sittings"] == 1
    assert [p["step"] for p in whole["curve"]] == [2, 4]
    assert whole["final"] == whole["curve"][-1]
    assert whole["best_val"] == min(whole["curve"], key=lambda p: p["val_loss"])

    # with --run-dir, a run stopped mid-way (here by its budget, after one step: a point
    # for part of an interval) continues from its checkpoint when run again, with the
    # losses of the uninterrupted run and its time counted on
    run_dir = tmp_path / "run"
    first, _ = _quality(tmp_path / "parts", "--run-dir", str(run_dir), "--budget-s", "0")
    assert [(p["step"], p.get("partial")) for p in first["curve"]] == [(1, True)]
    second, log = _quality(tmp_path / "parts", "--run-dir", str(run_dir), "--budget-s", "600")
    assert "continuing from step 1" in log
    assert second["complete"] is True and second["sittings"] == 2
    assert [p["step"] for p in second["curve"]] == [2, 4]  # the partial point is replaced
    for a, b in zip(second["curve"], whole["curve"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    assert second["curve"][0]["wall_s"] >= first["curve"][0]["wall_s"]
    # a run directory is kept for one config
    other = _bench_quality(tmp_path / "other", "--run-dir", str(run_dir), "--budget-s", "0")
    assert other.returncode != 0 and "another config" in other.stderr
    assert "Traceback" not in other.stderr
    # a folder that is not a run is left alone
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    not_a_run = _bench_quality(
        tmp_path / "x", "--run-dir", str(tmp_path / "mine"), "--budget-s", "0"
    )
    assert not_a_run.returncode != 0 and "holds files but no run" in not_a_run.stderr
    assert len(not_a_run.stderr.strip().splitlines()) == 1, not_a_run.stderr
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


import experiments  # noqa: E402


def test_experiments_run_until_the_budget_unless_their_schedule_decays():
    # a constant learning rate trains until the budget ends (the many-to-many runs once
    # stopped after their 20 epochs, a third of the way in); a decaying schedule keeps its
    # own length, since more epochs would stretch the decay
    for name in ("baseline", "sequence", "stateful", "sentences"):
        cfg = experiments.experiment_config(name)
        assert cfg.train.schedule == "constant"
        assert cfg.train.epochs == experiments.UNTIL_BUDGET_EPOCHS, name
    for name in ("clip+cosine", "fast"):
        cfg = experiments.experiment_config(name)
        assert cfg.train.schedule == "cosine"
        assert cfg.train.epochs < 100, name
    # the options under test reach the config
    assert experiments.experiment_config("sequence").data.objective == "sequence"
    assert experiments.experiment_config("gru").model.cell == "gru"


def test_repetition_share_against_counting_by_hand():
    assert experiments.repetition_share("abcdefgh", width=3) == 0.0
    # "abab": grams "ab", "ba", "ab" -> the two "ab" repeat
    assert experiments.repetition_share("abab", width=2) == 2 / 3
    assert experiments.repetition_share("aaaa", width=2) == 1.0
    assert experiments.repetition_share("ab", width=5) == 0.0


import bench_generate  # noqa: E402


@pytest.fixture(scope="module")
def stand_alone_loop(tmp_path_factory):
    """benchmarks/native_loop.cc built once, and a model whose weights it reads: one layer
    of 256 units with random biases and a stronger input (at init, with zero biases,
    character 0 leaves the state at zero for ever; with these the run goes through several
    characters before it settles)."""
    import shutil

    import jax

    from jaxchar.config import ModelConfig
    from jaxchar.model import init_params

    if shutil.which("g++") is None:
        pytest.skip("no g++ to build benchmarks/native_loop.cc")
    folder = tmp_path_factory.mktemp("native_loop")
    binary = bench_generate.build_native(str(folder))  # with a compiler it must build
    cfg = ModelConfig(vocab_size=45, layers=1, hidden=256, encoding="scaled")
    params = init_params(cfg, jax.random.PRNGKey(1))
    keys = jax.random.split(jax.random.PRNGKey(11))
    layer = params["lstm_0"]
    layer = {
        **layer,
        "bias": jax.random.normal(keys[0], (1024,)),
        "input_kernel": 3 * layer["input_kernel"],
    }
    head = {**params["head"], "bias": 0.1 * jax.random.normal(keys[1], (45,))}
    params = {"lstm_0": layer, "head": head}
    return binary, cfg, params


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("threads, rows", [(1, 1), (2, 1), (2, 3)])
def test_stand_alone_loop_computes_what_jaxchar_computes(stand_alone_loop, tmp_path, threads, rows):
    # the stand-alone loop measures what JAX adds to jaxchar's stateful mode only if it does
    # the same work: given jaxchar's weights it must pick jaxchar's ids, with its logits
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxchar.model import apply
    from jaxchar.sampling import sample

    binary, cfg, params = stand_alone_loop
    layer = params["lstm_0"]
    parts = [
        layer["cell"]["recurrent_kernel"],
        layer["input_kernel"],
        layer["bias"],
        params["head"]["kernel"],
        params["head"]["bias"],
    ]
    weights = tmp_path / "weights.f32"
    weights.write_bytes(b"".join(np.asarray(p, "<f4").tobytes() for p in parts))
    length = 200
    command = [binary, str(threads), str(length), str(rows), str(weights)]
    done = subprocess.run(command, input="ids\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    tokens = done.stdout.split()  # "ids" ID ... "logits" LOGIT ...
    at = tokens.index("logits")
    ids = [int(i) for i in tokens[1:at]]

    expected = sample(
        params, jax.random.PRNGKey(0), jnp.array([0]), cfg=cfg, length=length, temperature=0.0
    )
    assert ids == np.asarray(expected).tolist()
    assert len(set(ids)) > 1  # the state moves: not a run stuck on one character
    logits, _ = apply(params, cfg, jnp.asarray([[0, *ids]]))  # [1, length + 1, vocab]
    got = np.array([float(v) for v in tokens[at + 1 :]])
    np.testing.assert_allclose(got, np.asarray(logits[0, -1]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # starts a server twice
def test_serve_benchmark_measures_short_requests_beside_long_prompts(tmp_path, fast_run):
    args = "--clients 1 --reps 1 --requests 1 --long-clients 1 --long-prompt 300 --length 16"
    done = _bench("bench_serve", tmp_path, *args.split(), "--run", fast_run)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "serve.json").read_text())
    long = result["results"]["long prompts"]
    assert long["long_clients"] == 1 and long["long_prompt"] == 300
    assert long["long_requests"][0] >= 1  # a long prompt was answered meanwhile
    for k in ("alone_p99_s", "beside_long_p99_s"):
        assert 0 < long[k] < 60
    assert set(result["results"]) == {"long prompts", "batching on (64 rows)", "batching off"}
    assert list(result["engine_alone_by_impl"]) == ["auto"]  # --engine-impls' default


def test_the_experiments_report_keeps_the_quality_candidates_section(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "DOCS", tmp_path)
    row = {
        "name": "baseline",
        "what": "the tutorial's model",
        "steps": 10,
        "best_val_bpc": 4.0,
        "train_bpc": 4.1,
        "repetition_argmax": 1.0,
        "repetition_t0.8": 0.0,
        "sample": "alice",
    }
    path = experiments.write_report([row], 60)
    assert experiments.KEPT not in path.read_text()
    hand = f"{experiments.KEPT}\n\n| candidate | final |\n| ema | 1.39 |\n"
    path.write_text(path.read_text() + hand)
    experiments.write_report([dict(row, steps=20)], 60)
    text = path.read_text()
    assert text.endswith(hand) and "| baseline | the tutorial's model | 20 |" in text
    assert text.count(experiments.KEPT) == 1


def _quality_table(*args) -> subprocess.CompletedProcess:
    script = REPO / "benchmarks" / "quality_table.py"
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True
    )


def test_the_quality_table_gives_each_candidates_mean_and_spread_over_seeds(tmp_path):
    # two candidates x two seeds, with curves whose points fall either side of each minute
    def run(points, final, best):
        curve = [{"wall_s": s, "val_loss": v} for s, v in points]
        return {"curve": curve, "final": {"val_loss": final}, "best_val": {"val_loss": best}}

    files = {
        "base_seed0": run([(50, 2.0), (110, 1.6)], 1.5, 1.45),
        "base_seed1": run([(70, 2.2), (100, 1.8)], 1.7, 1.65),
        "new_seed0": run([(30, 1.9), (90, 1.5)], 1.4, 1.35),
        "new_seed1": run([(40, 2.1), (130, 1.7)], 1.6, 1.55),
    }
    for name, value in files.items():
        (tmp_path / f"quality_{name}.json").write_text(json.dumps(value))
    args = ["base", "new", "--seeds", "0", "1", "--minutes", "1", "2", "--results", tmp_path]
    args += ["--plot", tmp_path / "curves.png"]
    done = _quality_table(*args)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "| candidate | 1 min | 2 min | final | best | final vs first |"
    # base at 1 min: seed 1 has no point yet (its first is at 70 s); new at 2 min: seed 1's
    # second point (130 s) is not in yet, so its first (2.1) counts
    assert lines[2] == (
        "| base | - | 1.7000 (1.6000-1.8000) | 1.6000 (1.5000-1.7000) "
        "| 1.5500 (1.4500-1.6500) | +0.0000 |"
    )
    assert lines[3] == (
        "| new | 2.0000 (1.9000-2.1000) | 1.8000 (1.5000-2.1000) | 1.5000 (1.4000-1.6000) "
        "| 1.4500 (1.3500-1.5500) | -0.1000 |"
    )
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a run its budget cut before its last evaluation ends with a training-only point: its
    # final held-out loss is the last one it scored, and the minutes after it keep that one
    cut = run([(50, 2.0), (100, 1.7)], None, 1.7)
    cut["curve"].append({"wall_s": 115, "val_loss": None, "partial": True})
    (tmp_path / "quality_cut_seed0.json").write_text(json.dumps(cut))
    args = ["cut", "base", "--seeds", "0", "--minutes", "2", "--results", tmp_path]
    done = _quality_table(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2:] == [
        "| cut | 1.7000 (1.7000-1.7000) | 1.7000 (1.7000-1.7000) "
        "| 1.7000 (1.7000-1.7000) | +0.0000 |",
        "| base | 1.6000 (1.6000-1.6000) | 1.5000 (1.5000-1.5000) "
        "| 1.4500 (1.4500-1.4500) | -0.2000 |",
    ]
    missing = _quality_table("other")
    assert missing.returncode != 0 and "quality_other_seed0.json is missing" in missing.stderr
