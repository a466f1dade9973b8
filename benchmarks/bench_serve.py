"""`jaxchar serve` under load on loopback: batching on (64 rows) against off (one request at
a time), with 1, 8 and 64 concurrent clients.

    python benchmarks/bench_serve.py [--clients 1 8 64] [--length 200] [--reps 3]

The server runs as its own process (`jaxchar serve RUN --quiet`, batching on, then
`--no-batching`) over a run of the default config's shapes, trained a few steps (speed does
not depend on the weights), or over `--run RUN`. Each client is a thread that sends
requests back to back (whole answers; `--stream`: server-sent events, as the page reads
them, results in serve_stream.json) until the round's requests are done:
every client makes `--requests` requests (default: enough for at least 64 in a round). A
round's figures: aggregate generated characters per second (all characters / the round's
wall time) and the latency of each request (sent to last character), p50 and p99. Rounds are
repeated `--reps` times after a warm-up round; medians are reported.

Long prompts beside short requests (batching on): `--long-clients` clients (default 4) each
send back-to-back requests whose prompts are `--long-prompt` characters (default 4,000, just
under the server's --max-prompt) while 8 short clients run their round; the short requests'
p50 and p99 are reported against the same round with no long prompts, so one sees how much a
long prompt holds the others back (the engine reads prompts a piece a step). The engine
alone (no HTTP) is timed too, with each `--engine-impls` (auto; pallas: the Pallas sampling
loop, for GPUs). Writes benchmarks/results/serve.json (serve_gpu.json on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def train_run(root: Path) -> Path:
    from jaxchar.config import load_config, override
    from jaxchar.run import train_run as train

    run = root / "fast"
    cfg = override(load_config("fast"), ["train.max_steps=2", "train.sample_chars=0"])
    train(common.DATA / "wonderland.txt", run, cfg)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, batching: bool, chunk: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "jaxchar", "serve", str(run), "--port", str(port), "--quiet"]
    cmd += ["--chunk", str(chunk)]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server stopped: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start in 300 s")


PROMPT = "alice was beginning"


def one_request(
    url: str, length: int, seed: int, stream: bool, prompt: str = PROMPT
) -> tuple[float, int]:
    """Seconds from sending to the last character, and the characters received."""
    body = {"prompt": prompt, "length": length, "seed": seed, "stream": stream}
    req = urllib.request.Request(
        f"{url}/v1/generate", data=json.dumps(body).encode(), method="POST"
    )
    began, chars, final = time.perf_counter(), 0, False
    with urllib.request.urlopen(req, timeout=600) as r:
        if not stream:
            return time.perf_counter() - began, len(json.load(r)["text"])
        for line in r:
            if line.startswith(b"event: done"):
                final = True  # the next data line is the whole answer, not a piece
            elif line.startswith(b"data: ") and not final:
                chars += len(json.loads(line[6:])["text"])
    return time.perf_counter() - began, chars


def round_of(url: str, clients: int, requests: int, length: int, seed0: int, stream: bool) -> dict:
    latencies: list[float] = []
    chars = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            seconds, n = one_request(url, length, seed0 + i * 1000 + j, stream)
            with lock:
                latencies.append(seconds)
                chars[0] += n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    latencies.sort()
    return {
        "chars_per_s": chars[0] / wall,
        "p50_s": latencies[len(latencies) // 2],
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "requests": len(latencies),
        "chars": chars[0],
        "wall_s": wall,
    }


def mixed_round(url: str, long_clients: int, long_prompt: int, length: int, seed0: int) -> dict:
    """A round of 8 short clients (8 requests each) while `long_clients` clients send
    requests with `long_prompt`-character prompts until the short ones are done: the short
    requests' figures, and the long requests completed meanwhile."""
    text = (common.DATA / "wonderland.txt").read_text(encoding="utf-8").lower()
    prompt = text[5000 : 5000 + long_prompt]
    done, longs = threading.Event(), [0]

    def long_client(i: int) -> None:
        j = 0
        while not done.is_set():
            one_request(url, 20, seed0 + 50_000 + i * 1000 + j, False, prompt)
            longs[0] += 1
            j += 1

    threads = [threading.Thread(target=long_client, args=(i,)) for i in range(long_clients)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the long prompts are being read when the short clients begin
    try:
        short = round_of(url, 8, 8, length, seed0, False)
    finally:
        done.set()
        for t in threads:
            t.join()
    return {**short, "long_requests": longs[0]}


def engine_alone(run: Path, clients: list[int], length: int, reps: int, impl: str) -> dict:
    """The batching engine with no HTTP in front: n requests submitted at once, chars/s
    until the last finishes (median of `reps` after a warm-up): the server's ceiling. With
    `impl` "pallas" its calls run the Pallas sampling loop (jaxchar/engine.py)."""
    import dataclasses

    from jaxchar.engine import Engine, Request
    from jaxchar.run import Run

    trained = Run.open(run)
    params, _ = trained.params()
    cfg = dataclasses.replace(trained.cfg.model, impl=impl)
    engine = Engine(params, cfg, mode=trained.options().mode, slots=64).start()
    prompt = trained.encode_prompt("alice was beginning")
    opts = trained.options(length=length, temperature=0.8, top_k=0, top_p=1.0)

    def burst(n: int, seed0: int) -> float:
        done = [threading.Event() for _ in range(n)]
        began = time.perf_counter()
        for i in range(n):
            ev = done[i]
            engine.submit(Request(prompt, opts, seed0 + i, lambda ids, ev=ev: ids or ev.set()))
        for ev in done:
            ev.wait()
        return n * length / (time.perf_counter() - began)

    out = {}
    try:
        for n in clients:
            burst(n, 0)
            out[str(n)] = statistics.median(burst(n, 1000 * (r + 1)) for r in range(reps))
            rate = out[str(n)]
            print(f"engine alone ({impl}), {n} requests at once: {rate:,.0f} chars/s", flush=True)
    finally:
        engine.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--requests", type=int, help="requests per client per round")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=8, help="the server's --chunk")
    parser.add_argument(
        "--stream", action="store_true", help="streamed requests (server-sent events)"
    )
    parser.add_argument("--long-clients", type=int, default=4)
    parser.add_argument("--long-prompt", type=int, default=4000, help="characters")
    parser.add_argument(
        "--engine-impls",
        nargs="+",
        default=["auto"],
        choices=["auto", "scan", "pallas"],
        help="model.impl for the engine-alone figures (pallas: the sampling kernel, for GPUs)",
    )
    parser.add_argument(
        "--run", type=Path, help="serve this run (default: train the default config 2 steps)"
    )
    args = parser.parse_args()

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_run(Path(tmp))
        alone_by = {
            impl: engine_alone(run, args.clients, args.length, args.reps, impl)
            for impl in args.engine_impls
        }
        alone = alone_by[args.engine_impls[0]]
        for batching in (True, False):
            name = "batching on (64 rows)" if batching else "batching off"
            proc, url = start_server(run, batching, args.chunk)
            try:
                if batching and args.long_clients:
                    mixed_round(url, args.long_clients, args.long_prompt, args.length, 0)
                    plain = [
                        round_of(url, 8, 8, args.length, 77_000 + r, False)
                        for r in range(args.reps)
                    ]
                    mixed = [
                        mixed_round(
                            url, args.long_clients, args.long_prompt, args.length, 88_000 + r
                        )
                        for r in range(args.reps)
                    ]
                    results["long prompts"] = {
                        "long_clients": args.long_clients,
                        "long_prompt": args.long_prompt,
                        **{
                            f"{name}_{k}": statistics.median(r[k] for r in rounds)
                            for name, rounds in (("alone", plain), ("beside_long", mixed))
                            for k in ("p50_s", "p99_s", "chars_per_s")
                        },
                        "long_requests": [r["long_requests"] for r in mixed],
                    }
                    lp = results["long prompts"]
                    print(
                        f"8 short clients alone: p50 {lp['alone_p50_s'] * 1e3:.0f} ms, "
                        f"p99 {lp['alone_p99_s'] * 1e3:.0f} ms; beside {args.long_clients} "
                        f"clients sending {args.long_prompt:,}-character prompts: p50 "
                        f"{lp['beside_long_p50_s'] * 1e3:.0f} ms, p99 "
                        f"{lp['beside_long_p99_s'] * 1e3:.0f} ms "
                        f"({lp['beside_long_p99_s'] / lp['alone_p99_s']:.1f}x the p99)",
                        flush=True,
                    )
                for clients in args.clients:
                    per_client = args.requests or max(1, 64 // clients)
                    round_of(url, clients, per_client, args.length, 0, args.stream)  # warm-up
                    rounds = [
                        round_of(
                            url, clients, per_client, args.length, 10_000 * (r + 1), args.stream
                        )
                        for r in range(args.reps)
                    ]
                    med = {
                        k: statistics.median(r[k] for r in rounds)
                        for k in ("chars_per_s", "p50_s", "p99_s")
                    }
                    results.setdefault(name, {})[str(clients)] = {
                        **med,
                        "requests_per_round": rounds[0]["requests"],
                        "rounds": rounds,
                    }
                    print(
                        f"{name}, {clients} clients: {med['chars_per_s']:,.0f} chars/s, "
                        f"p50 {med['p50_s'] * 1e3:.0f} ms, p99 {med['p99_s'] * 1e3:.0f} ms",
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    on, off = results["batching on (64 rows)"], results["batching off"]
    one = on[str(args.clients[0])]["chars_per_s"]
    rows = []
    for clients in args.clients:
        a, b = on[str(clients)], off[str(clients)]
        rows.append(
            [
                clients,
                f"{a['chars_per_s']:,.0f}",
                f"{a['p50_s'] * 1e3:.0f}",
                f"{a['p99_s'] * 1e3:.0f}",
                f"{b['chars_per_s']:,.0f}",
                f"{b['p50_s'] * 1e3:.0f}",
                f"{b['p99_s'] * 1e3:.0f}",
                f"{a['chars_per_s'] / b['chars_per_s']:.1f}x",
                f"{a['chars_per_s'] / one:.1f}x",
                f"{alone[str(clients)]:,.0f}",
            ]
        )
    header = [
        "clients",
        "on chars/s",
        "on p50 ms",
        "on p99 ms",
        "off chars/s",
        "off p50 ms",
        "off p99 ms",
        "on / off",
        f"on / {args.clients[0]} client",
        "engine alone chars/s",
    ]
    print(common.table(rows, header))
    payload = {
        "length": args.length,
        "reps": args.reps,
        "chunk": args.chunk,
        "stream": args.stream,
        "results": results,
        "engine_alone_chars_per_s": alone,
        "engine_alone_by_impl": alone_by,
    }
    print(f"written to {common.save('serve_stream' if args.stream else 'serve', payload)}")


if __name__ == "__main__":
    main()
