"""How fast the command line answers before any work: `jaxchar --help` and each command's
--help, against the imports a CLI that loaded its libraries first would pay (jax, flax,
optax, orbax) and against a bare Python start, measured in the same run.

    python benchmarks/bench_cli.py [--reps 7]

Each figure is the median wall time of a fresh process, after one untimed warm-up round
(the page cache holds the files then), runs interleaved.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from common import interleave, save, stats, table

COMMANDS = ("train", "generate", "evaluate", "export", "plot", "info", "env")


def process(*args: str):
    def run() -> None:
        subprocess.run([sys.executable, *args], check=True, capture_output=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    runners = {
        "python (bare start)": process("-c", "pass"),
        "import jax, flax, optax, orbax": process(
            "-c", "import jax, flax.linen, optax, orbax.checkpoint"
        ),
        "jaxchar --help": process("-m", "jaxchar", "--help"),
        "jaxchar --version": process("-m", "jaxchar", "--version"),
    }
    for command in COMMANDS:
        runners[f"jaxchar {command} --help"] = process("-m", "jaxchar", command, "--help")
    times = interleave(runners, args.reps, warmup=1)
    eager = stats(times["import jax, flax, optax, orbax"])["median"]
    rows, results = [], {}
    for name, samples in times.items():
        s = stats(samples)
        results[name] = {**s, "vs_eager_imports": eager / s["median"]}
        rows.append([name, f"{s['median'] * 1000:.0f}", f"{eager / s['median']:.1f}x"])
    print(table(rows, ["command", "median ms", "faster than eager imports"]))
    slowest = max(results[f"jaxchar {c} --help"]["median"] for c in COMMANDS)
    print(f"\nslowest COMMAND --help: {slowest * 1000:.0f} ms")
    path = save("cli", {"reps": args.reps, "results": results, "slowest_help_s": slowest})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
