"""The tutorial's extension ideas, measured: each option against the baseline, same time budget.

    python benchmarks/experiments.py [--budget-s 180] [--only NAME ...]

Every run trains on ../shared/data/wonderland.txt (lowercased, header stripped, the last 10%
held out) for the same wall-clock budget on this machine, then reports the best validation
bits/char, the training bits/char, steps done, and a 300-character sample at temperature 0.8
with its repetition share (the fraction of 20-character substrings of a 2,000-character sample
that occur more than once: the tutorial's main complaint was the same phrase again and
again). Writes docs/experiments.md (keeping its last section, from KEPT on: the quality
candidates measured with bench_quality.py and quality_table.py) and
benchmarks/results/experiments.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
KEPT = "## Quality candidates"  # from here on docs/experiments.md is not regenerated
UNTIL_BUDGET_EPOCHS = 10_000  # for constant learning rates; a decaying schedule keeps its own

# name -> (base config, overrides, what it tests)
EXPERIMENTS: dict[str, tuple[str, list[str], str]] = {
    "baseline": ("small", [], "the tutorial's small model: window, scaled input, 1x256, batch 128"),
    "onehot": ("small", ["model.encoding=onehot"], "one-hot input instead of id / vocab"),
    "embed": ("small", ["model.encoding=embed"], "a learned 64-wide embedding"),
    "no-punctuation": ("small", ["data.remove_punctuation=true"], "punctuation removed"),
    "input-dropout": ("small", ["model.input_dropout=0.2"], "dropout 0.2 on the input"),
    "batch-32": ("small", ["train.batch_size=32"], "batch 32 instead of 128"),
    "stacked": ("stacked", [], "2 x LSTM-256, batch 64 (the tutorial's larger model)"),
    "wide-512": ("small", ["model.hidden=512"], "one LSTM of 512 units"),
    "clip+cosine": (
        "small",
        ["train.clip_norm=1.0", "train.schedule=cosine"],
        "gradient clipping at 1 and cosine decay",
    ),
    "weight-decay": ("small", ["train.weight_decay=0.0001"], "AdamW, weight decay 1e-4"),
    "sequence": (
        "small",
        ["data.objective=sequence", "train.batch_size=32"],
        "many-to-many: every position predicts its next character",
    ),
    "stateful": (
        "small",
        ["data.objective=sequence", "data.stateful=true", "train.batch_size=32"],
        "sequence objective, state carried across batches (stateful LSTM)",
    ),
    "sentences": (
        "small",
        ["data.objective=sentences", "train.batch_size=32"],
        "sentence-padded rows (many-to-many, padding masked out of the loss)",
    ),
    "gru": ("small", ["model.cell=gru"], "GRU cells instead of LSTM (the scan path)"),
    "fast": ("fast", [], "jaxchar's default: embed, 2x256, sequence, cosine, clipping"),
    "fast-gru": ("fast", ["model.cell=gru"], "the fast config with GRU cells"),
}


def repetition_share(text: str, width: int = 20) -> float:
    """Fraction of the width-character substrings that occur more than once."""
    grams = [text[i : i + width] for i in range(len(text) - width + 1)]
    if not grams:
        return 0.0
    counts: dict[str, int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    return sum(1 for g in grams if counts[g] > 1) / len(grams)


def experiment_config(name: str):
    """The config one experiment trains with (vocabulary size not yet set)."""
    from jaxchar.config import load_config, override

    base, sets, _ = EXPERIMENTS[name]
    cfg = override(
        load_config(base),
        [
            "data.val_fraction=0.1",
            "train.eval_batches=40",
            "train.sample_chars=0",
            *sets,
        ],
    )
    extra = ["train.save_every_steps=50"] if cfg.data.objective == "window" else []
    if cfg.train.schedule == "constant":
        # the budget, not the epoch count, ends the run: the many-to-many objectives supervise
        # 25x more characters per step and would otherwise finish 20 epochs in a third of it
        extra.append(f"train.epochs={UNTIL_BUDGET_EPOCHS}")
    return override(cfg, extra)


def run_one(name: str, budget: float) -> dict:
    import jax

    from jaxchar.corpus import load_corpus
    from jaxchar.sampling import sample
    from jaxchar.train import LN2, fit, with_vocab

    base, sets, what = EXPERIMENTS[name]
    cfg = experiment_config(name)
    corpus = load_corpus(common.DATA / "wonderland.txt", cfg.data)
    cfg = with_vocab(cfg, len(corpus.vocab))
    began = time.perf_counter()
    result = fit(
        cfg,
        corpus.train_ids,
        corpus.val_ids,
        should_stop=lambda: time.perf_counter() - began > budget,
        train_spans=corpus.train_spans,
        val_spans=corpus.val_spans,
    )
    wall = time.perf_counter() - began
    best = min(result.history, key=lambda m: m["val_loss"])
    last = result.history[-1]
    mode = "window" if cfg.data.objective == "window" else "stateful"
    prompt = corpus.val_ids[: cfg.data.seq_length]
    kw = dict(cfg=cfg.model, mode=mode, seq_length=cfg.data.seq_length)
    text = corpus.vocab.decode(
        sample(
            result.state.params, jax.random.PRNGKey(0), prompt, length=2000, temperature=0.8, **kw
        )
    )
    greedy = corpus.vocab.decode(
        sample(
            result.state.params, jax.random.PRNGKey(0), prompt, length=2000, temperature=0.0, **kw
        )
    )
    return {
        "name": name,
        "what": what,
        "config": base,
        "sets": sets,
        "steps": int(result.state.step),
        "wall_s": wall,
        "best_val_bpc": best["val_loss"] / LN2,
        "train_bpc": last["train_loss"] / LN2,
        "repetition_t0.8": repetition_share(text),
        "repetition_argmax": repetition_share(greedy),
        "sample": text[:300],
    }


def write_report(rows: list[dict], budget: float) -> Path:
    m = common.machine()
    lines = [
        "# Experiments: the tutorial's extension ideas, measured",
        "",
        f"Produced by `python benchmarks/experiments.py --budget-s {budget:.0f}` on "
        f"{m['cores']} CPU cores ({m['cpu']}), JAX {m['jax']}, {m['date']}.",
        "Every run: Alice (lowercased, Gutenberg header stripped, last 10% held out), the same "
        f"wall-clock budget of {budget:.0f} s including compilation (runs with a constant "
        "learning rate train until the budget ends; those with a decaying one keep their "
        "config's schedule and may end earlier). bits/char: lower is better. Repetition: "
        "share of 20-character substrings of a 2,000-character sample "
        "that occur more than once (argmax and temperature 0.8).",
        "",
        "| run | what | steps | best val bits/char | train bits/char | repetition argmax |"
        " repetition t=0.8 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['what']} | {r['steps']} | {r['best_val_bpc']:.3f} | "
            f"{r['train_bpc']:.3f} | {r['repetition_argmax']:.2f} | {r['repetition_t0.8']:.2f} |"
        )
    lines += ["", "## Samples (temperature 0.8, 300 characters, after the budget)", ""]
    for r in rows:
        lines += [f"**{r['name']}**", "", "```", r["sample"], "```", ""]
    DOCS.mkdir(exist_ok=True)
    path = DOCS / "experiments.md"
    kept = ""  # the quality candidates' section is written by hand from quality_table.py
    if path.is_file() and KEPT in (old := path.read_text(encoding="utf-8")):
        kept = old[old.index(KEPT) :]
    path.write_text("\n".join(lines) + "\n" + kept, encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=180.0)
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS))
    args = parser.parse_args()
    rows = []
    for name in args.only or EXPERIMENTS:
        row = run_one(name, args.budget_s)
        print(
            json.dumps({k: v for k, v in row.items() if k != "sample"}), file=sys.stderr, flush=True
        )
        rows.append(row)
    common.save("experiments", {"budget_s": args.budget_s, "runs": rows})
    print(f"written to {write_report(rows, args.budget_s)}", file=sys.stderr)


if __name__ == "__main__":
    main()
