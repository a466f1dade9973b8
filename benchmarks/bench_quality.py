"""Time to quality on Alice: wall-clock time until the tutorial's training losses are reached.

    python benchmarks/bench_quality.py --config fast [--budget-s 300]
    python benchmarks/bench_quality.py --config small --budget-s 7800 --stop-at-target

Trains `--config` on ../shared/data/wonderland.txt (or --corpus; lowercased, header stripped,
the last 10% held out so that a validation loss can be reported beside the training loss),
saving metrics every epoch (or every --save-every steps), and records the first time the
training loss reaches the tutorial's figure for that model (small 1.9435; stacked and fast
1.2219 nats/char) and the validation loss then. Stops at the end of the config's schedule,
when the budget runs out, or (with --stop-at-target) once the target is reached.
Writes benchmarks/results/quality_<config>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

TARGETS = {"small": 1.9435, "stacked": 1.2219}
DEFAULT_TARGET = 1.2219


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fast")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--stop-at-target", action="store_true")
    parser.add_argument("--corpus", default="wonderland.txt", help="a file in ../shared/data")
    args = parser.parse_args()

    from jaxchar.cli import resolve_config_path
    from jaxchar.config import load_config, override
    from jaxchar.corpus import load_corpus
    from jaxchar.train import fit, with_vocab

    sets = ["data.val_fraction=0.1", *args.set]
    if args.save_every:
        sets.append(f"train.save_every_steps={args.save_every}")
    cfg = override(load_config(resolve_config_path(args.config)), sets)
    corpus = load_corpus(common.DATA / args.corpus, cfg.data)
    cfg = with_vocab(cfg, len(corpus.vocab))
    target = TARGETS.get(args.config, DEFAULT_TARGET)
    began = time.perf_counter()
    curve, reached = [], {}

    def log(event: dict) -> None:
        if event["event"] != "save":
            return
        point = {k: event[k] for k in ("step", "epoch", "train_loss", "val_loss")}
        point["wall_s"] = time.perf_counter() - began
        curve.append(point)
        print(
            f"{point['wall_s']:7.1f} s  step {point['step']:6d}  train {point['train_loss']:.4f}"
            f"  val {point['val_loss']:.4f}",
            file=sys.stderr,
            flush=True,
        )
        if not reached and point["train_loss"] <= target:
            reached.update(point)
        common.save(f"quality_{args.config}", summary(done=False))

    def summary(done: bool) -> dict:
        """The result so far: written after every evaluation, so that a run stopped before
        its end (hours on a CPU for the tutorial's stacked model) still leaves its curve."""
        return {
            "config": args.config,
            "corpus": args.corpus,
            "sets": sets,
            "target_train_loss": target,
            "budget_s": args.budget_s,
            "stop_at_target": args.stop_at_target,
            "complete": done,
            "reached": reached or None,
            "final": curve[-1],
            "best_val": min(curve, key=lambda p: p["val_loss"]),
            "curve": curve,
        }

    fit(
        cfg,
        corpus.train_ids,
        corpus.val_ids,
        log=log,
        should_stop=lambda: (
            time.perf_counter() - began > args.budget_s or bool(reached and args.stop_at_target)
        ),
        train_spans=corpus.train_spans,
        val_spans=corpus.val_spans,
    )
    result = summary(done=True)
    best_val = result["best_val"]
    path = common.save(f"quality_{args.config}", result)
    final = curve[-1]
    print(
        common.table(
            [
                [
                    args.config,
                    f"{target}",
                    f"{reached['wall_s']:.0f} s (step {reached['step']})"
                    if reached
                    else "not reached",
                    f"{reached['val_loss']:.4f}" if reached else "-",
                    f"{final['train_loss']:.4f}",
                    f"{final['val_loss']:.4f}",
                    f"{best_val['val_loss']:.4f} at {best_val['wall_s']:.0f} s",
                    f"{final['wall_s']:.0f}",
                ]
            ],
            [
                "config",
                "target train",
                "time to target",
                "val then",
                "final train",
                "final val",
                "best val",
                "wall s",
            ],
        )
    )
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
