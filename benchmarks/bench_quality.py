"""Time to quality on Alice: wall-clock time until the tutorial's training losses are reached.

    python benchmarks/bench_quality.py --config fast [--budget-s 300]
    python benchmarks/bench_quality.py --config small --budget-s 7800 --stop-at-target

Trains `--config` on ../shared/data/wonderland.txt (or --corpus; lowercased, header stripped,
the last 10% held out so that a validation loss can be reported beside the training loss,
unless `--set data.val_fraction=0`),
saving metrics every epoch (or every --save-every steps), and records the first time the
training loss reaches the tutorial's figure for that model (small 1.9435; stacked and fast
1.2219 nats/char) and the validation loss then. Stops at the end of the config's schedule,
when the budget runs out, or (with --stop-at-target) once the target is reached.
Writes benchmarks/results/quality_<config>.json (quality_<name>.json with --name).

With --run-dir DIR the run keeps checkpoints (and its curve and counted time) in DIR, so a run
of many hours (the stacked model: ~10 h here) can span several sittings: run the same command
again and it continues from the last save, with the same batches and losses as an
uninterrupted run. SIGINT/SIGTERM save and stop; SIGUSR1 pauses the run (SIGCONT continues
it) without counting the paused time, so that other work can use the cores meanwhile. The
time reported ("wall_s") is the running time summed over sittings, pauses left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

TARGETS = {"small": 1.9435, "stacked": 1.2219}
DEFAULT_TARGET = 1.2219
STATE_FILE = "bench_quality.json"  # in --run-dir: the curve and counted time at the last save


class Clock:
    """Running time: this sitting's wall time less its SIGUSR1 pauses, plus earlier
    sittings' time (`offset`)."""

    def __init__(self, offset: float = 0.0):
        self.offset, self.began, self.paused = offset, time.perf_counter(), 0.0

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.began - self.paused

    def pause(self, signum, frame) -> None:
        stopped = time.perf_counter()
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once someone sends SIGCONT
        paused = time.perf_counter() - stopped
        self.paused += paused
        print(f"paused {paused:.0f} s (not counted)", file=sys.stderr)


def fmt(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def open_run(run_dir: Path, cfg, vocab) -> tuple:
    """The run directory, the bench state saved there (None for a new run) and the config
    (a run sized by train.minutes in an earlier sitting keeps the length it chose)."""
    from dataclasses import replace

    from jaxchar.checkpoint import RUN_FILE, RunDir

    if not (run_dir / RUN_FILE).is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            sys.exit(f"{run_dir} holds files but no run: give a new or empty --run-dir")
        return RunDir.create(run_dir, cfg, vocab), None, cfg
    run = RunDir.open(run_dir)
    if run.cfg.train.minutes and not cfg.train.max_steps:
        cfg = replace(cfg, train=replace(cfg.train, max_steps=run.cfg.train.max_steps))
    if run.cfg.to_dict() != cfg.to_dict() or run.vocab != vocab:
        sys.exit(f"{run_dir} holds a run with another config or text: give a new --run-dir")
    state_path = run_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    steps = run.steps()
    if steps and (state is None or state["step"] != steps[-1]):
        print(
            f"note: {run_dir}'s last checkpoint (step {steps[-1]}) is not the one its "
            f"{STATE_FILE} describes; the time before it is counted from there",
            file=sys.stderr,
        )
    return run, state, cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fast")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--stop-at-target", action="store_true")
    parser.add_argument("--corpus", default="wonderland.txt", help="a file in ../shared/data")
    parser.add_argument(
        "--run-dir", help="keep checkpoints here; the same command again continues the run"
    )
    parser.add_argument("--name", help="results file quality_<name>.json (default: the config)")
    args = parser.parse_args()
    name = f"quality_{args.name or args.config}"

    from jaxchar.config import load_config, override
    from jaxchar.corpus import load_corpus
    from jaxchar.run.training import sized_on
    from jaxchar.train import fit, with_vocab

    sets = ["data.val_fraction=0.1", *args.set]
    if args.save_every:
        sets.append(f"train.save_every_steps={args.save_every}")
    cfg = override(load_config(args.config), sets)
    corpus = load_corpus(common.DATA / args.corpus, cfg.data)
    cfg = with_vocab(cfg, len(corpus.vocab))
    target = TARGETS.get(args.config, DEFAULT_TARGET)
    run, state = (None, None)
    if args.run_dir:
        from jaxchar.checkpoint import CheckpointError

        try:
            run, state, cfg = open_run(Path(args.run_dir).absolute(), cfg, corpus.vocab)
        except (CheckpointError, ValueError, KeyError) as err:  # JSON errors are ValueErrors
            sys.exit(f"{args.run_dir}: {err}; give another --run-dir")
    state = state or {"step": 0, "counted_s": 0.0, "curve": [], "reached": {}, "sittings": 0}
    # a stop mid-epoch left a point for a part of an epoch: the next full one replaces it
    curve = [p for p in state["curve"] if not p.get("partial")]
    reached, sittings = state["reached"] or {}, state["sittings"] + 1
    clock = Clock(state["counted_s"])
    if state["step"]:
        print(f"continuing from step {state['step']} ({state['counted_s']:.0f} s)", file=sys.stderr)
    signal.signal(signal.SIGUSR1, clock.pause)
    stop = {"signal": False, "at": None}  # `at`: the running time when the loop was told

    def on_signal(signum, frame) -> None:
        stop["signal"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def should_stop() -> bool:
        now = clock()
        if stop["signal"] or now > args.budget_s or bool(reached and args.stop_at_target):
            stop["at"] = stop["at"] or now  # the stop's own save and evaluation are not counted
            return True
        return False

    # train.minutes: a new run's length is chosen within the counted time, as `jaxchar
    # train` does (a continued run has it from its first sitting)
    sizing = None
    if not state["step"]:
        cfg, sizing = sized_on(cfg, corpus, began=time.perf_counter() - clock())
    if sizing is not None:
        print(sizing.event()["text"], file=sys.stderr)
        if run is not None:
            run.update_config(cfg)
    every, total = cfg.train.save_every_steps, {}

    def log(event: dict) -> None:
        if event["event"] == "start":
            total["steps"] = event["total_steps"]
        if event["event"] == "time_up":
            print(event["text"], file=sys.stderr)
        if event["event"] != "save":
            return
        point = {k: event.get(k) for k in ("step", "epoch", "train_loss", "val_loss")}
        step = event["step"]
        scheduled = (
            event["epoch_done"] or step == total["steps"] or bool(every and step % every == 0)
        )
        point["wall_s"] = clock() if scheduled or stop["at"] is None else stop["at"]
        if not scheduled:
            point["partial"] = True  # a stop mid-epoch: training loss over part of an epoch
        curve.append(point)
        print(
            f"{point['wall_s']:7.1f} s  step {point['step']:6d}  train {point['train_loss']:.4f}"
            f"  val {fmt(point['val_loss'])}",
            file=sys.stderr,
            flush=True,
        )
        if not reached and point["train_loss"] <= target and scheduled:
            reached.update(point)
        if run is not None:
            saved = {"step": point["step"], "counted_s": point["wall_s"], "curve": curve}
            saved.update(reached=reached, sittings=sittings)
            common.write_json(run.path / STATE_FILE, saved)
        common.save(name, summary(done=False))

    def summary(done: bool) -> dict:
        """The result so far: written after every evaluation, so that a run stopped before
        its end (hours on a CPU for the tutorial's stacked model) still leaves its curve."""
        scored = [p for p in curve if p["val_loss"] is not None]
        return {
            "config": args.config,
            "corpus": args.corpus,
            "sets": sets,
            "cfg": cfg.to_dict(),  # what ran, so that a config's Expect line can be checked
            "sized": None if sizing is None else dataclasses.asdict(sizing),
            "target_train_loss": target,
            "budget_s": args.budget_s,
            "stop_at_target": args.stop_at_target,
            "complete": done,
            "sittings": sittings,
            "paused_s_this_sitting": round(clock.paused, 1),
            "reached": reached or None,
            "final": curve[-1],
            "best_val": min(scored, key=lambda p: p["val_loss"]) if scored else None,
            "curve": curve,
        }

    try:
        fitted = fit(
            cfg,
            corpus.train_ids,
            corpus.val_ids,
            checkpointer=run,
            log=log,
            should_stop=should_stop,
            train_spans=corpus.train_spans,
            val_spans=corpus.val_spans,
            # train.minutes keeps its deadline here as in `jaxchar train`: a machine slower
            # than when it was timed stops the run, evaluated, before the minutes are up
            time_limit=sizing,
        )
    finally:
        if run is not None:
            run.close()
    if not curve:
        sys.exit("stopped before the first evaluation: nothing to report")
    result = summary(done=not stop["signal"])
    result["time_up"] = fitted.time_up  # stopped at train.minutes' deadline, short of its steps
    best_val = result["best_val"]
    path = common.save(name, result)
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
                    fmt(reached["val_loss"]) if reached else "-",
                    f"{final['train_loss']:.4f}",
                    fmt(final["val_loss"]),
                    f"{best_val['val_loss']:.4f} at {best_val['wall_s']:.0f} s"
                    if best_val
                    else "-",
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
    if stop["signal"]:
        again = "the same command" + ("" if args.run_dir else " with --run-dir")
        print(f"stopped by a signal: {again} continues the run", file=sys.stderr)


if __name__ == "__main__":
    main()
