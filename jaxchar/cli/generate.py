"""`jaxchar generate RUN`: text from a run's checkpoint, through `jaxchar.run.Run`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

from jaxchar.cli.common import add_common, add_step, add_unknown, info, say_notes
from jaxchar.config import ConfigError, check_seed

INTERACTIVE_HELP = "type a prompt and press Enter; :temp T, :len N, :seed S, :quit"


def run(args: argparse.Namespace) -> int:
    from jaxchar.corpus import read_text
    from jaxchar.run import Run

    prompt = read_text(args.prompt_file, corpus=False) if args.prompt_file else args.prompt
    _check_before_work(args)
    with Run.open(args.run_dir) as trained:
        if trained.note:
            info(trained.note, args.quiet)
        opts = trained.options(**_options(args))  # checked before the checkpoint is read
        _, step = trained.params(args.step)
        say_notes(trained.notes, args.quiet)
        if args.interactive:
            return _interactive(trained, args, opts)
        if args.beam is not None and args.beam < 1:
            raise ConfigError(f"--beam must be at least 1, not {args.beam}")
        if prompt is None:
            prompt = trained.default_prompt(args.seed)
        trained.encode_prompt(prompt, args.unknown)  # refused before anything is printed
        mode = f"beam search of width {args.beam}" if args.beam else f"{opts.mode} mode"
        info(f"checkpoint step {step}, {mode}; seed: {_one_line(prompt)}", args.quiet)
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
        try:
            if args.beam:
                _write_beams(trained, prompt, args, out)
            else:
                _write(trained, prompt, args, args.seed, out, opts)
        finally:
            if args.output:
                out.close()
    return 0


def _check_before_work(args: argparse.Namespace) -> None:
    """Refusals that need no model: made before the run's checkpoint is read."""
    check_seed(args.seed, "--seed")
    if args.beam is None and args.stop is not None:
        raise ConfigError("--stop ends a beam search hypothesis: give --beam N too")
    if args.beam is None and args.length_penalty:
        raise ConfigError("--length-penalty ranks beam search hypotheses: give --beam N too")
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise ConfigError(f"--output {out} is a directory: name a file to write")
        if not out.parent.is_dir():
            raise ConfigError(f"--output {out}: the folder {out.parent} does not exist")


def _one_line(text: str, limit: int = 200) -> str:
    """The prompt as one quoted line (newlines escaped), cut at `limit` characters."""
    shown = json.dumps(text[:limit], ensure_ascii=False)
    return shown + (f" (+{len(text) - limit:,} more)" if len(text) > limit else "")


def _options(args: argparse.Namespace) -> dict:
    return {
        "length": args.length,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "mode": args.mode,
        "num_samples": args.num_samples,
    }


def _write(trained, prompt: str, args, seed: int, out, opts) -> None:
    """One sample streams as it is made; several are made as one batch. `opts`: the
    checked options (Run.options)."""
    common = {"seed": seed, "step": args.step, "dtype": args.dtype, "unknown": args.unknown}
    if opts.num_samples == 1:
        for piece in trained.stream(prompt, **common, opts=opts):
            out.write(piece)
            out.flush()
        out.write("\n")
        return
    # made together in pieces and spooled to one temporary file per sample, so that memory
    # stays that of a piece whatever the length, and Ctrl-C stops between pieces
    with contextlib.ExitStack() as files:
        spools = [
            files.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))
            for _ in range(opts.num_samples)
        ]
        for pieces in trained.stream_rows(prompt, **common, opts=opts):
            for spool, piece in zip(spools, pieces, strict=True):
                spool.write(piece)
        for i, spool in enumerate(spools):
            out.write(f"===== sample {i + 1} of {len(spools)} =====\n")
            spool.seek(0)
            shutil.copyfileobj(spool, out)
            out.write("\n")


def _write_beams(trained, prompt: str, args, out) -> None:
    """The --num-samples best of --beam hypotheses, best first, with their log-probability."""
    found = trained.beam(
        prompt,
        beam=args.beam,
        length=args.length,
        results=args.num_samples or 1,
        stop=args.stop,
        length_penalty=args.length_penalty,
        step=args.step,
        dtype=args.dtype,
        unknown=args.unknown,
    )
    if len(found) == 1:
        out.write(found[0][0] + "\n")
        return
    for i, (text, log_prob) in enumerate(found):
        out.write(f"===== beam {i + 1} of {len(found)} (log-probability {log_prob:.3f}) =====\n")
        out.write(text + "\n")


def _interactive(trained, args: argparse.Namespace, opts) -> int:
    """Read a prompt per line; `:temp T`, `:len N`, `:seed S` change settings; `:quit`."""
    seed = args.seed
    interactive = sys.stdin.isatty()
    if interactive:
        info(INTERACTIVE_HELP)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in (":quit", ":q"):
            return 0
        text = line.rstrip("\n")
        try:
            if text.startswith(":"):
                name, _, value = text[1:].partition(" ")
                if name == "seed":
                    seed = int(value)
                elif name in ("temp", "len"):
                    field, kind = ("temperature", float) if name == "temp" else ("length", int)
                    opts = trained.options(**{**dataclasses.asdict(opts), field: kind(value)})
                else:
                    raise ConfigError(f"unknown command :{name} (:temp, :len, :seed, :quit)")
                info(f"temperature {opts.temperature}, length {opts.length}, seed {seed}")
                continue
            _write(trained, text, args, seed, sys.stdout, opts)
            sys.stdout.flush()
            seed += 1
        except (ConfigError, ValueError) as err:  # one bad line does not end the session
            print(f"jaxchar: error: {err}", file=sys.stderr)


def add_parser(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate text from a trained run",
        description="Generate text from a run's best checkpoint; the text alone goes to "
        "stdout. Sampling options left out come from the run's config ([sample]).",
    )
    gen.add_argument("run_dir", help="the --run-dir of a training run")
    given = gen.add_mutually_exclusive_group()
    given.add_argument(
        "--prompt",
        help="text to start from (default: a random window of the training text, drawn by --seed)",
    )
    given.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument(
        "--length", type=int, help="characters to generate (default: from the run's config)"
    )
    gen.add_argument(
        "--temperature",
        type=float,
        help="0 = argmax, as the tutorial; higher = more varied (default: from the run's config)",
    )
    gen.add_argument(
        "--top-k",
        type=int,
        help="sample among the k most likely characters; 0 turns it off (default: from the "
        "run's config)",
    )
    gen.add_argument(
        "--top-p",
        type=float,
        help="nucleus sampling mass, in (0, 1] (default: from the run's config)",
    )
    gen.add_argument(
        "--num-samples",
        type=int,
        help="independent samples, generated as a batch (default: from the run's config)",
    )
    gen.add_argument(
        "--mode",
        choices=("auto", "stateful", "window"),
        help="window: the last seq_length characters each step, as training saw them; "
        "stateful: one stream, state carried; auto: what the run was trained for "
        "(default: from the run's config)",
    )
    search = gen.add_argument_group("beam search (instead of sampling)")
    search.add_argument(
        "--beam",
        type=int,
        help="keep the N most likely continuations at each character and print the best "
        "(--num-samples: the best that many); temperature, top-k and top-p do not apply",
    )
    search.add_argument("--stop", help="with --beam: a character that ends a hypothesis (e.g. '.')")
    search.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        help="with --beam and --stop: rank by log-probability / length**A (default: 0)",
    )
    gen.add_argument(
        "--seed", type=int, default=0, help="the seed of sampling and of the prompt (default: 0)"
    )
    gen.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="matrix products in this type (default: the run's model.dtype); bfloat16 is "
        "faster on accelerators and on CPUs with bfloat16 instructions, and may change the text",
    )
    add_step(gen)
    add_unknown(gen, "prompt")
    gen.add_argument(
        "--output", help="write the text to this file instead of stdout (default: stdout)"
    )
    gen.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts from stdin, one per line; :temp T, :len N, :seed S, :quit",
    )
    add_common(gen)
    gen.set_defaults(func=run)
