import json
import subprocess
import sys

import pytest
from conftest import REPO

from jaxchar.cli import build_parser, main
from jaxchar.config import load_config, override


@pytest.fixture
def small_text(alice_slice):
    return alice_slice


@pytest.fixture
def trained(tiny_run):
    """The shared tiny run (read-only)."""
    return tiny_run


def test_train_prints_the_tutorial_summary_and_saves(tmp_path, small_text, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(small_text),
                "--config",
                "tiny",
                "--run-dir",
                str(run),
                "--max-steps",
                "20",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    for words in ("Total Characters:", "Total Vocab:", "Total Patterns:", "saved step 20"):
        assert words in err
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["train"]["max_steps"] == 20 and info["format_version"] == 1


def test_generate_prints_only_text_on_stdout(trained, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(trained),
                "--length",
                "60",
                "--prompt",
                "Alice was ",
                "--temperature",
                "0.8",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert len(out) == 61 and "seed" in err  # 60 characters and a newline
    assert (
        main(
            [
                "generate",
                str(trained),
                "--length",
                "60",
                "--prompt",
                "alice was ",
                "--temperature",
                "0.8",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == out  # deterministic for a seed (prompt lowercased)


def test_generate_default_seed_and_several_samples(trained, capsys):
    capsys.readouterr()
    assert main(["generate", str(trained), "--length", "20", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("===== sample") == 2


def test_several_samples_are_made_in_pieces_and_equal_one_batch(trained, capsys, monkeypatch):
    # a long batched sample is made piece by piece (memory of a piece, Ctrl-C between
    # pieces), never as one call for the whole length, and prints what one batch makes
    import jaxchar.run.reading
    from jaxchar.run import Run

    def no_whole_batch(*args, **kwargs):
        raise AssertionError("the whole length was made in one call")

    monkeypatch.setattr(jaxchar.run.reading, "sample", no_whole_batch)
    argv = ["generate", str(trained), "--length", "300", "--num-samples", "3", "--seed", "4"]
    capsys.readouterr()
    assert main([*argv, "--prompt", "alice", "--temperature", "1"]) == 0
    out = capsys.readouterr().out
    monkeypatch.undo()
    with Run.open(trained) as run:
        texts = run.generate("alice", seed=4, length=300, num_samples=3, temperature=1.0)
    want = "".join(f"===== sample {i + 1} of 3 =====\n{t}\n" for i, t in enumerate(texts))
    assert out == want


def test_generate_dtype_sets_the_products_type_of_the_sampler(trained, capsys, monkeypatch):
    import jaxchar.run.reading

    seen, stream = [], jaxchar.run.reading.sample_stream

    def recording(*args, cfg, **kwargs):
        seen.append(cfg.dtype)
        return stream(*args, cfg=cfg, **kwargs)

    monkeypatch.setattr(jaxchar.run.reading, "sample_stream", recording)
    for extra in ([], ["--dtype", "bfloat16"]):
        assert main(["generate", str(trained), "--length", "30", "--prompt", "alice", *extra]) == 0
        assert len(capsys.readouterr().out) == 31
    assert seen == ["float32", "bfloat16"]  # the run was trained in float32


def test_info_lists_checkpoints(trained, capsys):
    capsys.readouterr()
    assert main(["info", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "best, used by generate" in out and "vocabulary" in out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--temperature", "-1"], "temperature"),
        (["--temperature", "nan"], "finite"),
        (["--temperature", "inf"], "finite"),
        (["--top-p", "nan"], "top_p"),
        (["--prompt-file", "no-such-prompt.txt"], "no-such-prompt.txt does not exist"),
        (["--top-k", "-1"], "top_k"),
        (["--top-k", "999"], "top_k"),
        (["--seed", "-5"], "--seed must be an integer from 0 to 2**63 - 1"),
        (["--seed", str(2**64)], "--seed must be an integer from 0 to 2**63 - 1"),
        (["--stop", "."], "--stop ends a beam search hypothesis"),
        (["--length-penalty", "1"], "--length-penalty ranks beam search"),
        (["--output", "/tmp"], "is a directory"),
        (["--output", "/no/such/folder/out.txt"], "does not exist"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-p", "0"], "top_p"),
        (["--length", "0"], "length"),
        (["--prompt", "ALICE ~~"], "'~'"),
        (["--step", "999999"], "no checkpoint at step"),
    ],
)
def test_generate_bad_input(trained, capsys, args, words):
    assert main(["generate", str(trained), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxchar: error:") and words in err and "\n" not in err
    assert "alice, shakespeare" not in err  # the corpus hint belongs to corpora only


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "{run}", "--prompt", "a", "--prompt-file", "p.txt"],
        ["train", "{small}", "--run-dir", "{run}", "--resume", "--overwrite"],
    ],
    ids=["prompt-and-prompt-file", "resume-and-overwrite"],
)
def test_conflicting_options_are_refused(trained, small_text, capsys, argv):
    argv = [a.format(run=trained, small=small_text) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


PIPED = """
import sys
from jaxchar.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # starts processes
def test_a_closed_stdout_ends_the_command_quietly(trained):
    # `jaxchar generate RUN | head -c 5`: the reader goes away while the text streams; no
    # error, no traceback
    import subprocess
    import sys

    cmd = [sys.executable, "-c", PIPED, "generate", str(trained), "--length", "100000"]
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writer.stdout.read(5)
    writer.stdout.close()  # as `head` does once it has what it wants
    err = writer.stderr.read().decode()
    assert writer.wait(timeout=300) == 0 and "error" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, words",
    [
        (["missing.txt"], "does not exist"),
        (["{tmp}"], "directory"),
        (["{small}", "--set", "train.nope=1"], "unknown key"),
        (["{small}", "--batch-size", "0"], "batch_size"),
        (["{small}", "--config", "nonexistent"], "no config file"),
        (["{small}", "--set", "model.dropout=-0.5"], "dropout"),
        (["{small}", "--set", "model.gate_activation=hard"], "gate_activation"),
        (["{small}", "--seq-length", "40000"], "seq_length"),
    ],
)
def test_train_bad_input(tmp_path, small_text, capsys, args, words):
    args = [a.format(tmp=tmp_path, small=small_text) for a in args]
    code = main(
        [
            "train",
            *args,
            "--config" if "--config" not in args else "--quiet",
            *(["tiny"] if "--config" not in args else []),
            "--run-dir",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxchar: error:") and words in err and "\n" not in err


def test_existing_run_is_not_overwritten(trained, small_text, capsys):
    before = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert main(["train", str(small_text), "--config", "tiny", "--run-dir", str(trained)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == before


def test_not_a_run_dir(tmp_path, capsys):
    assert main(["generate", str(tmp_path)]) == 2
    assert "not a jaxchar run" in capsys.readouterr().err


def test_print_config(capsys):
    assert (
        main(["train", "alice", "--config", "small", "--set", "train.epochs=3", "--print-config"])
        == 0
    )
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["batch_size"] == 128


COMMANDS = ["train", "generate", "evaluate", "export", "plot", "info", "env", "bench"]


@pytest.mark.parametrize("sub", [[], *([c] for c in COMMANDS)])
def test_help_describes_every_option_with_its_real_default(sub, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*sub, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: jaxchar")
    assert "(default: None)" not in out and "(default: False)" not in out
    # every option and positional argument has a description: in argparse's help, an
    # entry with none is a line of its own followed by the next entry at the same indent
    parser = build_parser()
    actions = (
        parser._actions
        if not sub
        else parser._subparsers._group_actions[0].choices[sub[0]]._actions
    )
    for action in actions:
        if action.dest != "help":
            assert action.help, f"{sub} {action.option_strings or action.dest}: no help"
    if sub == ["train"]:
        for name in ("small", "stacked", "fast", "tiny", "shakespeare"):
            assert name in out  # the shipped configs are named where they are chosen
        assert "default: from the config" in out and "--run-dir" in out
    if sub == ["generate"]:
        assert "from the run's config" in out and "(default: 0)" not in out.split("--seed")[0]
        assert ":seed S" in out


def test_help_answers_without_importing_jax():
    code = "import sys; from jaxchar.cli import main\ntry: main(['train', '--help'])\n"
    code += "except SystemExit: pass\nassert 'jax' not in sys.modules, sorted(sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_gru_on_padded_sentences_trains_evaluates_and_generates(tmp_path, small_text, capsys):
    run = tmp_path / "gru"
    args = ["train", str(small_text), "--config", "tiny", "--run-dir", str(run)]
    sets = ["--set", "model.cell=gru", "--set", "data.objective=sentences"]
    assert main([*args, *sets, "--max-steps", "10", "--quiet"]) == 0
    assert main(["evaluate", str(run), str(small_text)]) == 0
    out = capsys.readouterr().out
    assert "nats/char" in out and "bits/char" in out
    assert main(["generate", str(run), "--length", "40", "--prompt", "alice "]) == 0
    got = capsys.readouterr()
    assert len(got.out.rstrip("\n")) == 40 and "stateful mode" in got.err


def test_a_forced_backend_this_machine_lacks_is_refused_before_the_run_exists(
    tmp_path, small_text, capsys
):
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN can run here")
    run = tmp_path / "cudnn"
    args = ["train", str(small_text), "--config", "tiny", "--run-dir", str(run)]
    assert main([*args, "--set", "model.impl=cudnn", "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cudnn" in err and "NVIDIA GPU" in err
    assert not run.exists()  # refused before anything was written


def test_a_run_trained_on_a_backend_missing_here_generates_with_auto(tmp_path, small_text, capsys):
    # a run trained with cuDNN on a GPU, generated from on a CPU: same parameters, auto here
    import json

    run = tmp_path / "moved"
    args = ["train", str(small_text), "--config", "tiny", "--run-dir", str(run)]
    assert main([*args, "--max-steps", "4"]) == 0
    capsys.readouterr()
    info = json.loads((run / "run.json").read_text())
    info["config"]["model"]["impl"] = "cudnn"
    (run / "run.json").write_text(json.dumps(info))
    assert main(["generate", str(run), "--length", "20", "--prompt", "alice "]) == 0
    got = capsys.readouterr()
    assert len(got.out.rstrip("\n")) == 20 and "read with model.impl = 'auto'" in got.err


def test_hard_sigmoid_gates_are_kept_in_the_checkpoint(tmp_path, small_text, capsys):
    import jaxchar

    run = tmp_path / "hard"
    args = ["train", str(small_text), "--config", "tiny", "--run-dir", str(run)]
    sets = ["--set", "model.gate_activation=hard_sigmoid"]
    assert main([*args, *sets, "--max-steps", "4"]) == 0
    capsys.readouterr()
    _, cfg, _ = jaxchar.load_checkpoint(run)
    assert cfg.model.gate_activation == "hard_sigmoid"
    assert main(["generate", str(run), "--length", "20", "--prompt", "alice "]) == 0
    assert len(capsys.readouterr().out.rstrip("\n")) == 20


def test_a_run_written_with_the_old_default_impl_generates_the_same_text(
    tmp_path, small_text, capsys
):
    # runs written before `auto` store model.impl = "fused" (then the default): they load,
    # and generate the very text a run read with `auto` generates
    import json

    run = tmp_path / "old"
    args = ["train", str(small_text), "--config", "tiny", "--run-dir", str(run)]
    assert main([*args, "--max-steps", "4", "--set", "model.hidden=64"]) == 0
    gen = ["generate", str(run), "--length", "60", "--prompt", "alice ", "--seed", "3"]
    capsys.readouterr()
    texts = []
    for impl in ("auto", "fused", "scan"):
        info = json.loads((run / "run.json").read_text())
        info["config"]["model"]["impl"] = impl
        (run / "run.json").write_text(json.dumps(info))
        for temperature in ("0", "0.9"):
            assert main([*gen, "--temperature", temperature]) == 0
            texts.append(capsys.readouterr().out)
    assert texts[0::2] == [texts[0]] * 3 and texts[1::2] == [texts[1]] * 3
    assert len(texts[1].strip()) == 60


def test_a_source_file_mentioning_gutenberg_markers_is_trained_on_whole(tmp_path, capsys):
    # jaxchar's own corpus.py once held these lines, and was cut to 1 character
    code = (REPO / "jaxchar" / "corpus.py").read_text()
    code = 'START, END = "*** START OF", "*** END OF"\n' + code
    (tmp_path / "code.py").write_text(code)
    args = [
        "train",
        str(tmp_path / "code.py"),
        "--config",
        "tiny",
        "--run-dir",
        str(tmp_path / "r"),
    ]
    assert main([*args, "--max-steps", "1", "--set", "train.sample_chars=0"]) == 0
    err = capsys.readouterr().err
    assert f"Total Characters: {len(code.lower())}" in err and "Gutenberg" not in err


def test_one_meaning_of_top_k_0_and_of_seeds_everywhere(trained, capsys):
    # --top-k 0 is "off", as in the config and the server: the same text as no top-k
    base = ["generate", str(trained), "--length", "20", "--prompt", "alice", "--seed", "3"]
    capsys.readouterr()
    assert main([*base, "--top-k", "0", "--temperature", "1"]) == 0
    off = capsys.readouterr().out
    assert main([*base, "--temperature", "1"]) == 0
    assert capsys.readouterr().out == off
    from jaxchar.config import ConfigError
    from jaxchar.run import Run

    with Run.open(trained) as run:
        for bad in (-1, 2**63, 1.5, True):
            with pytest.raises(ConfigError, match="seed must be an integer from 0 to 2"):
                run.generate("alice", seed=bad, length=3)
        assert run.generate("alice", seed=2**63 - 1, length=3)  # the largest is accepted
    with pytest.raises(ConfigError, match="train.seed"):
        override(load_config("tiny"), ["train.seed=-1"])


def test_a_prompt_with_newlines_is_echoed_on_one_line(trained, capsys):
    capsys.readouterr()
    args = ["generate", str(trained), "--length", "5", "--prompt", "alice\nwas\n"]
    assert main(args) == 0
    err = capsys.readouterr().err
    (echo,) = [line for line in err.splitlines() if "checkpoint step" in line]
    assert '"alice\\nwas\\n"' in echo
