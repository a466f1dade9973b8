"""`jaxchar serve RUN`: a run's model over HTTP (Starlette), batched by jaxchar.engine.

Routes:
- `POST /v1/generate`: JSON {prompt, length, temperature, top_k, top_p, seed, beam, stop,
  length_penalty, stream}; every field optional (the run's [sample] settings, a random seed
  that the answer reports). The text as JSON, or with `stream: true` as server-sent events:
  `data: {"text": ...}` pieces, then `event: done` with the whole answer. `beam` runs beam
  search instead of sampling (`jaxchar.beam_search`; not streamed piece by piece).
- `GET /v1/model`: config, vocabulary, checkpoint step and its losses.
- `GET /v1/metrics`: the run's metrics.jsonl records and its latest training samples.
- `GET /health`; `GET /`: a page to type a prompt and watch the text arrive, with the
  run's loss curve and training samples, refreshed while a training run writes them.

Bad requests get a 4xx with one line of JSON, {"error": "..."}; nothing a client sends can
stop the server. Needs `pip install "jaxchar[serve]"` (Starlette and uvicorn).
"""

from __future__ import annotations

import ast
import asyncio
import json
import random
import re
import threading
from pathlib import Path
from typing import Any

from jaxchar.config import ConfigError, check_seed
from jaxchar.corpus import UnknownCharactersError
from jaxchar.engine import PROMPT_CHUNK, Engine, Request
from jaxchar.run import Run

MAX_BODY = 64 * 1024  # bytes of a request body
FIELDS = {
    "prompt": str,
    "length": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
    "beam": int,
    "stop": str,
    "length_penalty": float,
    "stream": bool,
    "unknown": str,  # "error" (the default) or "skip": characters not in the vocabulary
}
MAX_BEAM = 64


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _parse(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY:
        raise BadRequest(f"the request body is over {MAX_BODY} bytes", 413)
    try:
        given = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(
            f"the body is not JSON ({err.msg if hasattr(err, 'msg') else err})"
        ) from None
    if not isinstance(given, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    out = {}
    for name, value in given.items():
        if value is None:
            continue
        kind = FIELDS[name]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise BadRequest(f"{name} must be {kind.__name__}, not {json.dumps(value)[:40]}")
        out[name] = value
    return out


_SAMPLE_LINE = re.compile(r"^(\[temperature [^\]]+\]) (['\"].*['\"])$")


def readable_samples(text: str) -> str:
    """samples.txt as text to read: each `[temperature T] '...'` line (a quoted string, so
    that the log keeps one line per sample) becomes its header and the sample itself, with
    its line breaks; other lines are kept as they are."""
    out = []
    for line in text.splitlines():
        found = _SAMPLE_LINE.match(line)
        if found:
            try:
                sample = ast.literal_eval(found.group(2))
            except (ValueError, SyntaxError):  # a line being written
                sample = None
            if isinstance(sample, str):
                out.extend([found.group(1), sample, ""])
                continue
        out.append(line)
    return "\n".join(out) + ("\n" if out else "")


class _Mailbox:
    """Pieces from the engine's thread to the requests' queues on the event loop, with one
    wake-up of the loop for all the rows of an engine step rather than one per row."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class Server:
    """The run, its engine, and the request handling (independent of the web framework's
    objects where it can be, so that tests can reach it)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        slots: int = 64,
        chunk: int = 8,
        gather_ms: float = 5.0,
        max_length: int = 2000,
        max_prompt: int = 4096,
        prompt_chunk: int = PROMPT_CHUNK,
        step: int | None = None,
    ):
        self.run = Run.open(run_dir)
        # the engine reads prompts a piece a step between the other rows' steps; the bound
        # keeps one request's reading (and its memory) short
        self.max_prompt = max_prompt
        self.params, self.step = self.run.params(step)
        self.opts = self.run.options()
        self.engine = Engine(
            self.params,
            self.run.cfg.model,
            mode=self.opts.mode,
            seq_length=self.run.cfg.data.seq_length,
            slots=slots,
            chunk=chunk,
            gather_ms=gather_ms,
            max_length=max_length,
            prompt_chunk=prompt_chunk,
        )
        self._mailbox: _Mailbox | None = None

    def settings(self, given: dict[str, Any]) -> dict[str, Any]:
        """The request's settings, checked, with the run's defaults filled in."""
        s = {
            "seed": given.get("seed", random.randrange(2**31)),
            "beam": given.get("beam"),
            "stop": given.get("stop"),
            "length_penalty": given.get("length_penalty", 0.0),
            "stream": given.get("stream", False),
        }
        length = given.get("length", min(self.opts.length, self.engine.max_length))
        if not 1 <= length <= self.engine.max_length:
            raise BadRequest(f"length must be between 1 and {self.engine.max_length}", 422)
        try:  # the options checked once, as the CLI checks them (Run.options)
            s["opts"] = self.run.options(
                length=length,
                temperature=given.get("temperature"),
                top_k=given.get("top_k"),
                top_p=given.get("top_p"),
            )
            check_seed(s["seed"])
        except ConfigError as err:
            raise BadRequest(str(err), 422) from None
        if s["beam"] is not None and not 1 <= s["beam"] <= MAX_BEAM:
            raise BadRequest(f"beam must be between 1 and {MAX_BEAM}", 422)
        if s["stop"] is not None and s["beam"] is None:
            raise BadRequest("stop applies to beam search: give beam too", 422)
        prompt = given.get("prompt")
        if prompt is None:
            prompt = self.run.default_prompt(s["seed"])
        if len(prompt) > self.max_prompt:
            raise BadRequest(
                f"the prompt has {len(prompt):,} characters, more than this server's "
                f"{self.max_prompt:,} (its --max-prompt): send a shorter one",
                413,
            )
        unknown = given.get("unknown", "error")
        if unknown not in ("error", "skip"):
            raise BadRequest('unknown must be "error" or "skip"', 422)
        try:
            s["ids"] = self.run.encode_prompt(prompt, unknown)
        except UnknownCharactersError as err:
            raise BadRequest(f'{err.base}: remove them, or send "unknown": "skip"', 422) from None
        except (ConfigError, ValueError) as err:
            raise BadRequest(str(err), 422) from None
        s["prompt"] = prompt
        return s

    def model_info(self) -> dict[str, Any]:
        import dataclasses

        try:
            saved = self.run.metrics(self.step)
        except Exception:  # noqa: BLE001 - a checkpoint without metrics still serves
            saved = {}
        losses = {k: v for k, v in saved.items() if k.endswith(("loss", "bpc"))}
        return {
            "run": str(self.run.path),
            "step": self.step,
            "losses": losses,
            "vocab_size": len(self.run.vocab),
            "vocab": "".join(self.run.vocab.chars),
            "mode": self.opts.mode,
            "config": dataclasses.asdict(self.run.cfg),
            "slots": self.engine.slots,
            "max_length": self.engine.max_length,
            "max_prompt": self.max_prompt,
        }

    def metrics(self) -> dict[str, Any]:
        """metrics.jsonl's records (step, losses) and the end of samples.txt, read afresh
        each time, so that a page follows a training run that is still writing them."""
        records = []
        path = self.run.path / "metrics.jsonl"
        lines = (
            path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
        )
        for line in lines:
            try:
                m = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            keep = ("step", "epoch", "train_loss", "val_loss")
            records.append({k: m[k] for k in keep if k in m})
        samples = self.run.path / "samples.txt"
        text = samples.read_text(encoding="utf-8", errors="replace") if samples.exists() else ""
        return {"metrics": records, "samples": readable_samples(text)[-4000:]}

    async def beam(self, s: dict[str, Any]) -> dict[str, Any]:
        found = await asyncio.to_thread(
            self.run.beam,
            s["prompt"],
            beam=s["beam"],
            length=s["opts"].length,
            results=s["beam"],
            stop=s["stop"],
            length_penalty=s["length_penalty"],
            step=self.step,
        )
        return {"text": found[0][0], "beams": [{"text": t, "log_prob": lp} for t, lp in found]}

    def submit(self, s: dict[str, Any]) -> tuple[Request, asyncio.Queue]:
        """Queues a sampling request; its pieces (lists of ids, then None) arrive on the
        queue from the engine's thread."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        mailbox = self._mailbox

        def emit(ids):
            mailbox.put(queue, ids)

        req = Request(s["ids"], s["opts"], s["seed"], emit)
        return self.engine.submit(req), queue

    def answer(self, s: dict[str, Any], text: str, **extra: Any) -> dict[str, Any]:
        return {
            "text": text,
            "prompt": s["prompt"],
            "seed": s["seed"],
            "length": s["opts"].length,
            "temperature": s["opts"].temperature,
            "top_k": s["opts"].top_k,
            "top_p": s["opts"].top_p,
            "step": self.step,
            **extra,
        }


def make_app(server: Server, *, warm_up: bool = True):
    """The Starlette application around `server`; the engine runs for the app's lifetime."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    from jaxchar.page import PAGE

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def read_body(request: HTTPRequest) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY:
            raise BadRequest(f"the request body is over {MAX_BODY} bytes", 413)
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY:
                raise BadRequest(f"the request body is over {MAX_BODY} bytes", 413)
        return body

    async def generate(request: HTTPRequest):
        try:
            s = server.settings(_parse(await read_body(request)))
        except BadRequest as err:
            return error(str(err), err.status)
        if s["beam"] is not None:
            try:
                found = await server.beam(s)
            except (ConfigError, ValueError) as err:
                return error(str(err), 422)
            body = server.answer(s, found["text"], beams=found["beams"])
            if not s["stream"]:
                return JSONResponse(body)

            async def once():
                yield f"data: {json.dumps({'text': found['text']})}\n\n"
                yield f"event: done\ndata: {json.dumps(body)}\n\n"

            return StreamingResponse(once(), media_type="text/event-stream")
        req, queue = server.submit(s)
        vocab = server.run.vocab
        if not s["stream"]:
            pieces = []
            try:
                while (ids := await queue.get()) is not None:
                    pieces.append(vocab.decode(ids))
            except asyncio.CancelledError:
                req.cancel()
                raise
            if req.made < req.length:
                return error("generation failed on the server; see its log", 500)
            return JSONResponse(server.answer(s, "".join(pieces)))

        async def events():
            pieces = []
            try:
                while (ids := await queue.get()) is not None:
                    piece = vocab.decode(ids)
                    pieces.append(piece)
                    yield f"data: {json.dumps({'text': piece})}\n\n"
                yield f"event: done\ndata: {json.dumps(server.answer(s, ''.join(pieces)))}\n\n"
            finally:  # the client went away (or all is sent): its row is freed
                req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def model(request: HTTPRequest):
        return JSONResponse(server.model_info())

    async def metrics(request: HTTPRequest):
        return JSONResponse(server.metrics())

    async def health(request: HTTPRequest):
        return JSONResponse({"status": "ok", "busy_rows": server.engine.busy_rows()})

    async def page(request: HTTPRequest):
        return HTMLResponse(PAGE)

    async def not_found(request: HTTPRequest, exc):
        return error(f"no route {request.method} {request.url.path}", exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        if warm_up:
            lengths = (min(server.opts.length, server.engine.max_length),)
            await asyncio.to_thread(server.engine.warm_up, lengths)
        yield
        server.engine.stop()

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/v1/model", model),
        Route("/v1/metrics", metrics),
        Route("/v1/generate", generate, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: not_found},
    )
