import dataclasses
import glob
import json
import re
from pathlib import Path

import pytest
from conftest import REPO

from jaxchar.config import Config, ConfigError, from_dict, load_config, override, shipped_dir


def _opening(path: Path) -> list[str]:
    """A config file's opening comment (every line before the first section), its lines
    without the leading '# '."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return lines


def test_every_shipped_config_loads_and_opens_with_its_command():
    paths = sorted(shipped_dir().glob("*.toml"))
    assert {p.stem for p in paths} >= {"small", "stacked", "fast", "tiny"}
    for path in paths:
        cfg = load_config(path)
        assert isinstance(cfg, Config)
        # the opening comment holds the command that runs this very file and says what to
        # expect
        opening = _opening(path)
        commands = [line for line in opening if line.startswith("jaxchar train")]
        assert len(commands) == 1, path
        assert (
            path.stem == "fast"
            or f"--config {path.stem}" in commands[0]
            or (f"--config configs/{path.name}" in commands[0])
        ), commands[0]
        assert any("Expect" in line for line in opening), path


def test_tutorial_configs_match_the_tutorial():
    small, stacked = (
        load_config(shipped_dir() / "small.toml"),
        load_config(shipped_dir() / "stacked.toml"),
    )
    for cfg in (small, stacked):
        assert cfg.data.objective == "window" and cfg.data.seq_length == 100
        assert cfg.data.lowercase and cfg.model.encoding == "scaled"
        assert cfg.model.hidden == 256 and cfg.model.dropout == 0.2
        assert cfg.train.learning_rate == 1e-3
    assert (small.model.layers, small.train.batch_size, small.train.epochs) == (1, 128, 20)
    assert (stacked.model.layers, stacked.train.batch_size, stacked.train.epochs) == (2, 64, 50)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().train.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "values, words",
    [
        ({"train": {"epocs": 3}}, "unknown key train.epocs"),
        ({"trian": {"epochs": 3}}, "unknown section"),
        ({"train": {"epochs": "3"}}, "whole number"),
        ({"train": {"epochs": 2.5}}, "whole number"),
        ({"model": {"dropout": -0.1}}, "dropout"),
        ({"model": {"layers": 0}}, "layers"),
        ({"data": {"lowercase": 1}}, "true or false"),
        ({"data": {"objective": "both"}}, "not one of"),
        ({"model": {"gate_activation": "relu"}}, "model.gate_activation.*not one of"),
        ({"model": {"impl": "cudnn", "dtype": "bfloat16"}}, "cudnn.*float32"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(values, words):
    with pytest.raises(ConfigError, match=words):
        from_dict(values)


def test_ints_widen_to_float_fields():
    assert from_dict({"train": {"learning_rate": 1}}).train.learning_rate == 1.0


def test_override_parses_by_field_type_and_builds_a_new_config():
    base = Config()
    cfg = override(
        base,
        [
            "train.epochs=5",
            "data.lowercase=false",
            "model.encoding=embed",
            "train.learning_rate=2e-3",
        ],
    )
    assert (cfg.train.epochs, cfg.data.lowercase, cfg.model.encoding) == (5, False, "embed")
    assert cfg.train.learning_rate == 2e-3
    assert base.train.epochs == 20  # the original is untouched


@pytest.mark.parametrize(
    "item, words",
    [
        ("train.nope=1", "unknown key"),
        ("train.epochs", "section.key=value"),
        ("epochs=3", "section.key=value"),
        ("train.epochs=many", "bad value"),
        ("x.y=1", "unknown section"),
        ("model.layers=0", "layers"),
    ],
)
def test_override_errors(item, words):
    with pytest.raises(ConfigError, match=words):
        override(Config(), [item])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad.write_text("[model]\nlayers = 0\n")
    with pytest.raises(ConfigError, match="bad.toml.*layers"):
        load_config(bad)


ALLOWED = ("train.seed=", "data.val_fraction=")  # what a recorded run may set on a config


@pytest.mark.parametrize("name", sorted(p.stem for p in shipped_dir().glob("*.toml")))
def test_a_configs_expected_held_out_loss_is_that_of_its_recorded_runs(name):
    """A config whose Expect line promises a held-out loss names the benchmark runs it comes
    from (benchmarks/results/*.json, a glob); the figure is their mean final held-out loss at
    the precision it is written with, and the runs ran this config (the whole config a run
    recorded; for older runs, which recorded only their --set options, no option but the
    seed and the held-out fraction)."""
    text = " ".join(_opening(shipped_dir() / f"{name}.toml"))
    promised = re.search(r"held-out (?:loss )?(?:of |~|about )?(\d\.(\d+))", text)
    if promised is None:
        assert "held-out" not in text, "a held-out figure in a form this test cannot read"
        return
    cited = re.findall(r"benchmarks/results/[\w*?\[\]-]+\.json", text)
    assert cited, f"{name}: the Expect line gives no recorded run for its held-out figure"
    paths = sorted({p for pattern in cited for p in glob.glob(str(REPO / pattern))})
    assert paths, cited
    finals = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        assert run["config"] == name and run["complete"], path
        if "cfg" in run:  # the whole config it ran: the shipped one, less seed and vocabulary
            allowed = [s for s in run["sets"] if s.startswith(ALLOWED)]
            if run.get("sized"):  # train.minutes: the length it chose on its machine
                allowed.append(f"train.max_steps={run['sized']['steps']}")
            want = override(load_config(name), allowed).to_dict()
            got = run["cfg"]
            got["model"]["vocab_size"] = want["model"]["vocab_size"]
            defaults = Config().to_dict()
            for section, fields in want.items():  # a field added since the run: its default
                for key, value in fields.items():
                    if key not in got[section] and value == defaults[section][key]:
                        got[section][key] = value
            assert got == want, f"{path} ran another {name} than the shipped one"
        else:  # older runs recorded only what they set on top of the config
            sets = [s for s in run["sets"] if not s.startswith(ALLOWED)]
            assert not sets, f"{path} ran {name} with {sets}"
        scored = [p["val_loss"] for p in run["curve"] if p.get("val_loss") is not None]
        finals.append(scored[-1])
    figure, places = float(promised.group(1)), len(promised.group(2))
    mean = sum(finals) / len(finals)
    assert abs(mean - figure) <= 0.5 * 10**-places + 1e-9, (name, figure, mean, finals)
