"""A markdown table of held-out loss against wall time for candidates run by bench_quality.py
over several seeds: the numbers that docs/experiments.md's "Quality candidates" cite.

    python benchmarks/quality_table.py fast fast_ema0.99 [--minutes 1 2 4] [--seeds 0 1 2]
                                       [--results benchmarks/results] [--plot FILE.png --ymax 1.6]

Each name is a candidate; its runs are benchmarks/results/quality_<name>_seed<N>.json (written
by `bench_quality.py --name <name>_seed<N> --set train.seed=<N> ...`). For every candidate the
table gives the held-out loss (nats/char) last recorded by each time (the run's curve: one
point per save), the final and the best, as the mean over seeds with the spread (min-max),
and the difference of the means from the first candidate's. With --plot, also a PNG of
held-out loss against wall time: every seed's curve, one colour per candidate (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def runs(name: str, seeds: list[int], results: Path = RESULTS) -> list[dict]:
    found = []
    for seed in seeds:
        path = results / f"quality_{name}_seed{seed}.json"
        if not path.is_file():
            sys.exit(f"error: {path} is missing: run bench_quality.py --name {name}_seed{seed}")
        found.append(json.loads(path.read_text()))
    return found


def scored(run: dict) -> list[dict]:
    """The curve's points that have a held-out loss (a run cut by its budget ends with a
    training-only point, "partial")."""
    return [p for p in run["curve"] if p.get("val_loss") is not None]


def by_time(run: dict, seconds: float) -> float | None:
    """The held-out loss last recorded at or before `seconds` of training (None: none yet)."""
    seen = [p["val_loss"] for p in scored(run) if p["wall_s"] <= seconds]
    return seen[-1] if seen else None


def final(run: dict) -> float:
    """The run's final held-out loss: its last evaluated point if it stopped before scoring."""
    value = run["final"]["val_loss"]
    return scored(run)[-1]["val_loss"] if value is None else value


def cell(values: list[float | None]) -> tuple[str, float | None]:
    if any(v is None for v in values):
        return "-", None
    mean = statistics.fmean(values)
    return f"{mean:.4f} ({min(values):.4f}-{max(values):.4f})", mean


def table(names: list[str], seeds: list[int], minutes: list[float], results: Path = RESULTS) -> str:
    heads = [f"{m:g} min" for m in minutes] + ["final", "best", "final vs first"]
    lines = ["| candidate | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    first = None
    for name in names:
        rs = runs(name, seeds, results)
        cells = [cell([by_time(r, 60 * m) for r in rs])[0] for m in minutes]
        last, mean = cell([final(r) for r in rs])
        best, _ = cell([r["best_val"]["val_loss"] for r in rs])
        first = mean if first is None else first
        delta = f"{mean - first:+.4f}"
        lines.append(f"| {name} | " + " | ".join([*cells, last, best, delta]) + " |")
    return "\n".join(lines)


def plot(
    names: list[str],
    seeds: list[int],
    path: Path,
    results: Path = RESULTS,
    ymax: float | None = None,
) -> None:
    """Held-out loss against minutes of training, each seed's curve, one colour a candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, name in enumerate(names):
        for j, run in enumerate(runs(name, seeds, results)):
            points = scored(run)
            ax.plot(
                [p["wall_s"] / 60 for p in points],
                [p["val_loss"] for p in points],
                color=f"C{i}",
                marker=".",
                alpha=0.8,
                label=name if j == 0 else None,
            )
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("held-out loss (nats/char)")
    if ymax is not None:  # the end of the curves, where candidates differ
        ax.set_ylim(top=ymax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 4])
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the runs' files are")
    parser.add_argument("--plot", type=Path, help="also write this PNG of the curves")
    parser.add_argument("--ymax", type=float, help="the plot's highest loss shown")
    args = parser.parse_args()
    print(table(args.names, args.seeds, args.minutes, args.results))
    if args.plot:
        plot(args.names, args.seeds, args.plot, args.results, args.ymax)


if __name__ == "__main__":
    main()
