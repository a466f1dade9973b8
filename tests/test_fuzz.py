"""Bounded fuzz of the argument and config parsers: no input may end in a traceback."""

import contextlib
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxchar.cli import build_parser
from jaxchar.config import ConfigError, from_dict, override

KEYS = [
    "train.epochs",
    "train.batch_size",
    "model.dropout",
    "model.layers",
    "data.lowercase",
    "data.objective",
    "sample.top_p",
    "train.nope",
    "nosection.x",
    "model",
    "",
]
VALUES = st.one_of(
    st.integers(-5, 10**6), st.floats(allow_nan=True), st.booleans(), st.text(max_size=8)
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_set_assignments_either_build_a_config_or_raise_config_error(pairs):
    items = [f"{k}={v}" for k, v in pairs]
    try:
        override(from_dict({}), items)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)


toml_values = st.recursive(
    st.one_of(
        st.integers(-10, 10**9), st.floats(allow_nan=False), st.booleans(), st.text(max_size=6)
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["data", "model", "train", "sample", "other"]),
        st.dictionaries(
            st.sampled_from(
                [
                    "epochs",
                    "layers",
                    "dropout",
                    "lowercase",
                    "top_k",
                    "seq_length",
                    "objective",
                    "x",
                ]
            ),
            toml_values,
            max_size=3,
        )
        | toml_values,
        max_size=4,
    )
)
def test_any_toml_shaped_data_builds_or_raises_config_error(values):
    try:
        from_dict(values)
    except ConfigError as err:
        assert str(err)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_random_text_as_toml(text):
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    with contextlib.suppress(ConfigError):  # refusing is fine; anything else is a bug
        from_dict(values)


WORDS = [
    "train",
    "generate",
    "info",
    "--epochs",
    "-1",
    "x",
    "--set",
    "a=b",
    "--top-k",
    "0",
    "--temperature",
    "nan",
    "--length",
    "--resume",
    "--mode",
    "sideways",
    "--",
    "3",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(WORDS) | st.text(max_size=5), max_size=6))
def test_argument_parser_never_raises_anything_but_a_clean_exit(argv):
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as err:  # argparse's usage error (2) or --help (0)
        assert err.code in (0, 2)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "/nonexistent/run"],
        ["info", "/nonexistent/run"],
        ["train", "/nonexistent.txt", "--run-dir", "/tmp/x"],
        ["generate", "/nonexistent/run", "--temperature", "nan"],
    ],
)
def test_cli_refusals_are_one_line(argv, capsys):
    from jaxchar.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxchar: error:") and "\n" not in err and "Traceback" not in err
