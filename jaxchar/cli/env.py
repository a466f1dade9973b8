"""`jaxchar env`: this machine and the backend each config runs (jaxchar.lstm.backends)."""

from __future__ import annotations

import argparse
import dataclasses

from jaxchar.cli.common import add_common
from jaxchar.config import load_config, shipped_names


def run(args: argparse.Namespace) -> int:
    """What this machine has, and which backend each config runs for training and sampling."""
    import jax

    from jaxchar.lstm.backends import choices, machine

    for name, value in machine().items():
        print(f"{name + ':':<22}{value}")
    for name in args.config or shipped_names():
        cfg = load_config(name)
        model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 64)
        print(f"\nconfig {name} (impl = {model.impl}, {model.layers} x {model.hidden}):")
        for purpose, choice in choices(model, jax.default_backend()).items():
            print(f"  {purpose + ':':<22}{choice.backend:<7} {choice.reason}")
    return 0


def add_parser(sub) -> None:
    en = sub.add_parser(
        "env",
        help="show this machine (devices, CPU instruction sets, C++ kernels) and the backend "
        "each config runs",
        description="This machine's JAX devices, CPU instruction sets and C++ kernels, and "
        "the LSTM backend each config runs for training and sampling.",
    )
    en.add_argument(
        "--config",
        action="append",
        help="a config name or TOML file, repeatable (default: every shipped one)",
    )
    add_common(en)
    en.set_defaults(func=run)
