"""Peak resident memory of training against corpus size: jaxchar vs the tutorial's approach.

    python benchmarks/bench_memory.py [--sizes 1 10 100] [--steps 3]
    python benchmarks/bench_memory.py --sampling [--rows 64] [--lengths 200 20000]

`--sampling` measures generation instead: peak RSS of one stateful sample of each length at
64 rows with the fast config's shapes, by the default backend (the C++ kernel on CPUs that
choose it) and by the lax.scan loop, each in a fresh process; the growth from the shortest
to the longest length must stay within a few tens of MB (the noise is drawn per kernel
call, O(rows x vocab), not [length, rows, vocab] up front). Writes memory_sampling.json.

Corpora of 1, 10 and 100 MB are built by concatenating the files in ../shared/data. Each
measurement runs in a fresh process (peak RSS from getrusage): jaxchar loads the corpus and
trains the tutorial's small model for a few steps (window objective, batch 128); the peer is
the tutorial's own data preparation (Python lists of 100-character windows, then a float
array [patterns, 100, 1] and one-hot targets), run at 1 MB and, where it cannot fit, given
by its arithmetic. Writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

MB = 1 << 20


def build_corpus(size_mb: int, folder: Path) -> Path:
    """size_mb of text from the shared corpora, repeated. Alice's Gutenberg header and
    footer are removed first: left in, the loader would keep only the first copy's body."""
    from jaxchar.corpus import strip_gutenberg

    path = folder / f"corpus_{size_mb}mb.txt"
    sources = [common.DATA / "tinyshakespeare.txt", common.DATA / "wonderland.txt"]
    pieces = [strip_gutenberg(p.read_text(encoding="utf-8"))[0] for p in sources]
    with open(path, "w", encoding="utf-8") as f:
        written, i = 0, 0
        while written < size_mb * MB:
            piece = pieces[i % len(pieces)][: size_mb * MB - written]
            f.write(piece)
            written += len(piece)
            i += 1
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_jaxchar(path: str, steps: int) -> dict:
    from jaxchar.config import load_config, override
    from jaxchar.corpus import load_corpus
    from jaxchar.train import fit, with_vocab

    baseline = peak_rss_mb()
    cfg = override(load_config("small"), [f"train.max_steps={steps}"])
    corpus = load_corpus(path, cfg.data)
    cfg = with_vocab(cfg, len(corpus.vocab))
    if corpus.total_chars < 0.99 * os.path.getsize(path):
        raise SystemExit(f"only {corpus.total_chars} of {os.path.getsize(path)} bytes loaded")
    fit(cfg, corpus.train_ids)
    return {"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "chars": corpus.total_chars}


def child_tutorial(path: str) -> dict:
    import numpy as np

    baseline = peak_rss_mb()
    raw = open(path, encoding="utf-8").read().lower()  # noqa: SIM115 - as the tutorial does
    chars = sorted(set(raw))
    char_to_int = {c: i for i, c in enumerate(chars)}
    seq_length, data_x, data_y = 100, [], []
    for i in range(len(raw) - seq_length):
        data_x.append([char_to_int[c] for c in raw[i : i + seq_length]])
        data_y.append(char_to_int[raw[i + seq_length]])
    x = np.reshape(data_x, (len(data_x), seq_length, 1)) / float(len(chars))
    y = np.eye(len(chars), dtype=np.float32)[data_y]  # keras.utils.to_categorical
    return {"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "x_bytes": x.nbytes + y.nbytes}


def child_sample(length: int, rows: int, impl: str) -> dict:
    import dataclasses

    import jax

    from jaxchar.config import load_config
    from jaxchar.lstm import select
    from jaxchar.model import init_params
    from jaxchar.sampling import sample

    model = dataclasses.replace(load_config("fast").model, vocab_size=60, impl=impl)
    params = init_params(model, jax.random.PRNGKey(0))
    prompt = jax.numpy.arange(100) % 60
    baseline = peak_rss_mb()
    out = sample(
        params,
        jax.random.PRNGKey(1),
        prompt,
        cfg=model,
        length=length,
        temperature=0.8,
        num_samples=rows,
    )
    jax.block_until_ready(out)
    backend = select(model, "sample", platform="cpu", rows=rows).backend
    return {"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "backend": backend}


def sampling(args) -> None:
    rows, results = [], {}
    for impl in ("auto", "scan"):
        for length in args.lengths:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", "sample", f"{length},{args.rows}", impl],
                capture_output=True,
                text=True,
                check=True,
            )
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            results.setdefault(impl, {})[str(length)] = got
            rows.append([impl, got["backend"], length, args.rows, f"{got['peak_mb']:,.0f}"])
        peaks = [results[impl][str(n)]["peak_mb"] for n in args.lengths]
        results[impl]["growth_mb"] = peaks[-1] - peaks[0]
        rows.append([impl, "", "growth", "", f"{peaks[-1] - peaks[0]:,.0f}"])
    print(common.table(rows, ["impl", "backend", "length", "rows", "peak RSS MB"]))
    path = common.save("memory_sampling", {"rows": args.rows, "results": results})
    print(f"written to {path}", file=sys.stderr)


def tutorial_arrays_gb(chars: int, vocab: int = 65) -> float:
    """X as float64 [n, 100, 1] (numpy's default for the division) plus float32 one-hot y."""
    n = chars - 100
    return (n * 100 * 8 + n * vocab * 4) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tutorial-max-mb", type=int, default=1)
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "PATH", "STEPS"))
    parser.add_argument("--sampling", action="store_true", help="generation's memory instead")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 20000])
    args = parser.parse_args()
    if args.child:
        what, path, steps = args.child
        if what == "sample":
            length, rows = (int(v) for v in path.split(","))
            out = child_sample(length, rows, steps)
        elif what == "jaxchar":
            out = child_jaxchar(path, int(steps))
        else:
            out = child_tutorial(path)
        print(json.dumps(out))
        return
    if args.sampling:
        sampling(args)
        return

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = build_corpus(size, Path(tmp))
            entry = {}
            for what in ("jaxchar", "tutorial"):
                if what == "tutorial" and size > args.tutorial_max_mb:
                    entry[what] = {"computed_gb": tutorial_arrays_gb(size * MB)}
                    continue
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", what, str(path), str(args.steps)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                entry[what] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[str(size)] = entry
            j, t = entry["jaxchar"], entry["tutorial"]
            tut = (
                f"{t['peak_mb']:,.0f} MB measured"
                if "peak_mb" in t
                else f"{t['computed_gb'] * 1000:,.0f} MB (arrays alone, computed)"
            )
            rows.append(
                [
                    f"{size} MB",
                    f"{j['peak_mb']:,.0f}",
                    f"{j['peak_mb'] - j['baseline_mb']:,.0f}",
                    tut,
                ]
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(common.table(rows, ["corpus", "jaxchar peak MB", "above start-up MB", "tutorial"]))
    path = common.save("memory", {"steps": args.steps, "results": results})
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
