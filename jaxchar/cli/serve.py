"""`jaxchar serve RUN`: the run's model over HTTP (jaxchar.serve), on 127.0.0.1 by default."""

from __future__ import annotations

import argparse

from jaxchar.cli.common import add_common, add_step, info
from jaxchar.config import ConfigError

PROMPT_CHUNK = 64  # jaxchar.engine.PROMPT_CHUNK (not imported: --help stays fast)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(
            'jaxchar serve needs Starlette and uvicorn: pip install "jaxchar[serve]"'
        ) from None
    from jaxchar.serve import Server, make_app

    for name in ("slots", "chunk", "max_length", "max_prompt"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    pc = args.prompt_chunk
    if pc < 16 or pc & (pc - 1):
        raise ConfigError(f"--prompt-chunk must be a power of two of at least 16, not {pc}")
    server = Server(
        args.run_dir,
        slots=1 if args.no_batching else args.slots,
        chunk=args.chunk,
        gather_ms=args.gather_ms,
        max_length=args.max_length,
        max_prompt=args.max_prompt,
        prompt_chunk=args.prompt_chunk,
        step=args.step,
    )
    info(
        f"serving {args.run_dir} (checkpoint step {server.step}, {server.opts.mode} generation, "
        f"{server.engine.slots} rows) on http://{args.host}:{args.port}/",
        args.quiet,
    )
    uvicorn.run(
        make_app(server),
        host=args.host,
        port=args.port,
        log_level="warning" if args.quiet else "info",
    )
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a run's model over HTTP, with a page to try it",
        description="Serve a run's model over HTTP: POST /v1/generate (JSON, or streamed as "
        "server-sent events), GET /v1/model, GET /health, and a page at / to type a prompt "
        "and watch the text arrive beside the run's loss curve. Requests that arrive "
        'together run as rows of one batched call. Needs pip install "jaxchar[serve]".',
    )
    s.add_argument("run_dir", help="the --run-dir of a training run")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument(
        "--slots", type=int, default=64, help="requests generated at once, as rows (default: 64)"
    )
    s.add_argument(
        "--no-batching", action="store_true", help="one request at a time (for comparison)"
    )
    s.add_argument(
        "--chunk",
        type=int,
        default=8,
        help="characters per batched call; each is streamed as it is made (default: 8)",
    )
    s.add_argument(
        "--gather-ms",
        type=float,
        default=5.0,
        help="how long an idle server waits for more requests to batch (default: 5)",
    )
    s.add_argument(
        "--max-length", type=int, default=2000, help="longest generation a request may ask for"
    )
    s.add_argument(
        "--max-prompt",
        type=int,
        default=4096,
        help="longest prompt a request may send, in characters (default: 4096)",
    )
    s.add_argument(
        "--prompt-chunk",
        type=int,
        default=PROMPT_CHUNK,
        help="characters of each waiting prompt read between two batched calls: smaller "
        "holds the other requests back less, larger reads long prompts sooner (a power of "
        f"two, default: {PROMPT_CHUNK})",
    )
    add_step(s)
    add_common(s)
    s.set_defaults(func=run)
