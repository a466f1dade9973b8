"""Batched generation for many concurrent requests: what `jaxchar serve` runs.

The engine keeps `slots` rows of generation state on the device. Each request takes a free
row: its prompt is read into that row's LSTM state (stateful runs) or window (window-trained
runs), a piece a step, and its own per-character keys, temperature, top-k and top-p are
written beside it.
One jitted call then advances every row by `chunk` characters (a `lax.scan`), so requests
that arrive together share each step's matrix products; a request that arrives while
others run joins at the next call (continuous batching), and a finished or abandoned
request frees its row at once. Rows are independent: each draws with its own keys, which
are `jax.random.split(PRNGKey(seed), length)` as in `jaxchar.sample`, so a request gets the
text that `Run.generate` gives for the same seed and settings.

Where the selector runs a stateful model's sampling loop as the Pallas kernel (NVIDIA GPUs;
forced with model.impl = "pallas"), a call whose rows filter nothing (top-k 0, top-p 1) is
one kernel launch instead of the lax.scan, drawing the same ids from the same keys.

With `slots=1` requests run one at a time (the "batching off" of benchmarks/bench_serve.py).
Nothing here knows about HTTP: `submit` takes a callback that receives text pieces.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxchar.config import ModelConfig, SampleConfig
from jaxchar.decoders import Decoder, Stateful, decoder
from jaxchar.lstm import pallas, select
from jaxchar.sampling import sample_logits

PROMPT_CHUNK = 64  # prompt characters read per step: see Engine


def _draw(keys, logits, temperature, top_k, top_p):
    """Each row's id from its logits with its own key and settings: `sample_logits` as
    `jaxchar.sample` calls it for one row (so a request gets Run.generate's text)."""

    def one(key, logits, temperature, top_k, top_p):
        return sample_logits(key, logits[None], temperature, top_k, top_p)[0]

    return jax.vmap(one)(keys, logits, temperature, top_k, top_p)


@partial(jax.jit, static_argnames=("dec", "rows"), donate_argnames=("state",))
def _advance(params, state, keys, left, temperature, top_k, top_p, *, dec: Decoder, rows):
    """The first `rows` rows of the state `keys.shape[1]` characters further. keys [rows,
    n, 2]: each row's keys for its next n draws; left [rows]: characters each row still
    needs (it makes none after those). Returns (state, ids [rows, n], -1 where none)."""
    part = jax.tree.map(lambda x: x[:rows], state)

    def body(st, xs):
        t, k = xs
        ids = _draw(k, dec.logits(params, st), temperature, top_k, top_p)
        return dec.advance(params, st, ids), jnp.where(t < left, ids, -1)

    n = keys.shape[1]
    part, out = jax.lax.scan(body, part, (jnp.arange(n), keys.transpose(1, 0, 2)))
    state = jax.tree.map(lambda whole, p: whole.at[:rows].set(p), state, part)
    return state, out.T


@partial(jax.jit, static_argnames=("dec", "rows"), donate_argnames=("state",))
def _advance_kernel(params, state, keys, left, temperature, *, dec: Stateful, rows):
    """`_advance` by the Pallas sampling loop, for rows that filter nothing (top-k 0, top-p
    1): each row's noise is what `_draw` draws from its keys, so the ids are the same."""
    part = jax.tree.map(lambda x: x[:rows], state)
    vocab = dec.cfg.vocab_size
    noise = jax.vmap(jax.vmap(lambda k: jax.random.gumbel(k, (1, vocab))[0]))(keys)
    part, ids = pallas.sampling.run(params, dec.cfg, *part, noise.transpose(1, 0, 2), temperature)
    out = jnp.where(jnp.arange(keys.shape[1])[None] < left[:, None], ids, -1)
    state = jax.tree.map(lambda whole, p: whole.at[:rows].set(p), state, part)
    return state, out


@partial(jax.jit, static_argnames=("length",))
def _keys(seeds, *, length):
    """split(PRNGKey(seed), length) for each seed: [m, length, 2]. (JAX's partitionable
    threefry, its default, makes the first n keys of a longer split those of split(.., n).)"""
    return jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s), length))(seeds)


@partial(jax.jit, static_argnames=("dec",), donate_argnames=("state",))
def _read(params, state, rows, fresh, piece, mask, *, dec: Decoder):
    """Reads piece [m, w] (`mask` False on its left padding) into rows `rows` [m] of the
    state; a `fresh` row starts from an empty state, and rows past the state's end (padding)
    are dropped."""
    last = jax.tree.leaves(state)[0].shape[0] - 1
    part = jax.tree.map(lambda s: s[jnp.minimum(rows, last)], state)
    empty = dec.empty(rows.shape[0])
    part = jax.tree.map(
        lambda p, e: jnp.where(fresh.reshape((-1,) + (1,) * (p.ndim - 1)), e, p), part, empty
    )
    part = dec.read(params, part, piece, mask)
    return jax.tree.map(lambda s, p: s.at[rows].set(p, mode="drop"), state, part)


@partial(jax.jit, donate_argnames=("state",))
def _admit(state, source, src, dst):
    """Copies rows `src` [m] of `source` (the prompts' state) into rows `dst` [m] of the
    state; rows past the state's end (padding) are dropped."""
    return jax.tree.map(lambda s, v: s.at[dst].set(v[src], mode="drop"), state, source)


@partial(jax.jit, donate_argnames=("state",))
def _move(state, src, dst):
    """Copies row `src` of the state into row `dst` (the busy rows stay at the front)."""
    return jax.tree.map(lambda s: s.at[dst].set(s[src]), state)


@dataclass(eq=False)  # a request is itself: compared by identity
class Request:
    """One generation: ids of the prompt, settings, and where its text goes."""

    prompt: np.ndarray
    opts: SampleConfig  # its length, temperature, top_k and top_p (checked: Run.options)
    seed: int
    emit: Callable[[list[int] | None], None]  # new ids; None when finished
    made: int = 0
    cancelled: bool = False
    read: int = 0  # prompt characters read so far
    place: int = -1  # its row in the engine's prompt state while its prompt is read
    keys: np.ndarray | None = None  # [length, 2]: split(PRNGKey(seed), length), on admission

    @property
    def length(self) -> int:
        return self.opts.length

    def cancel(self) -> None:
        """The client went away: its row is freed at the next step."""
        self.cancelled = True


def _ended(event: threading.Event, ids: list[int] | None) -> None:
    if ids is None:
        event.set()


def _bucket(n: int, floor: int = 1) -> int:
    """The power of two at or above n (at least `floor`): few shapes, few compilations."""
    return max(floor, 1 << max(0, n - 1).bit_length())


class Engine:
    """See the module's docstring. `start()` runs the loop on a thread; `submit` is safe to
    call from any thread; `stop()` ends it.

    The busy rows are kept at the front of the state (a finished row's place is taken by
    the last busy row), and each call advances only the smallest power of two of rows that
    holds them: one request alone costs a one-row step, 64 together one 64-row step.

    Prompts are read `prompt_chunk` characters a step, into a second state of `slots` rows
    (one row per request still reading), between the steps that advance the busy rows: a
    long prompt holds the others back by one piece a step, not by its whole length, and a
    request whose client leaves while its prompt is read is dropped at the next step. A
    request joins the busy rows when its prompt is read."""

    def __init__(
        self,
        params,
        cfg: ModelConfig,
        *,
        mode: str = "stateful",
        seq_length: int = 100,
        slots: int = 64,
        chunk: int = 8,
        gather_ms: float = 5.0,
        max_length: int = 2000,
        prompt_chunk: int = PROMPT_CHUNK,
    ):
        self.dec = decoder(cfg, mode, seq_length)  # refuses an unknown mode
        if prompt_chunk < 16 or prompt_chunk & (prompt_chunk - 1):
            raise ValueError(
                f"prompt_chunk must be a power of two of at least 16, not {prompt_chunk}"
            )
        self.params, self.cfg, self.mode = params, cfg, mode
        self.seq_length, self.slots, self.chunk = seq_length, slots, chunk
        self.gather_s, self.max_length = gather_ms / 1000, max_length
        self.prompt_chunk = prompt_chunk
        self._pending: list[Request] = []
        self._reading: list[Request] = []  # requests whose prompts are being read
        self._rows: list[Request] = []  # the busy rows, in state order
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.calls = 0  # advance calls so far (for tests and the load benchmark)
        self.widest = 0  # the most prompt characters read for one row in one call
        self.state = self._empty_state()
        self.prompts = self._empty_state()  # the reading requests' rows, by Request.place
        # whether the selector runs `rows` stateful rows on the Pallas sampling loop
        self._kernel = isinstance(self.dec, Stateful) and (
            lambda rows: (
                select(cfg, "sample", platform=jax.default_backend(), rows=rows).kernel == "pallas"
            )
        )

    def _empty_state(self) -> tuple:
        # placed on the device as the jitted calls' results are (committed), so that the
        # first call on a fresh state and every later one share one compiled program
        return jax.device_put(self.dec.empty(self.slots), jax.devices()[0])

    # --- the public side ---------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        if not 1 <= request.length <= self.max_length:
            raise ValueError(f"length must be between 1 and {self.max_length}")
        if len(request.prompt) < 1:
            raise ValueError("the prompt must have at least one character")
        if self.dec.context is not None:  # the rest cannot change what it generates
            request.prompt = request.prompt[-self.dec.context :]
        with self._cond:
            self._pending.append(request)
            self._cond.notify()
        return request

    def busy_rows(self) -> int:
        """Rows held by requests: generating, or reading their prompts."""
        with self._cond:
            return len(self._rows) + len(self._reading)

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="jaxchar-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout=30)

    def warm_up(self, lengths: tuple[int, ...] = ()) -> None:
        """Compiles before serving what requests would otherwise compile on the way: for
        every power of two of rows up to `slots`, that many requests admitted at once (a
        prompt of prompt_chunk + 1 characters, read in a 1-character piece and a whole one,
        and two chunks of text each), so every row count's advance, prompt-reading (the
        narrowest and the widest piece) and admission call is ready; and the keys of
        requests of each of `lengths`."""
        for length in lengths:
            _keys(np.zeros((self.slots,), np.uint32), length=_bucket(length, self.chunk))
        opts = [SampleConfig(length=2 * self.chunk, temperature=0.5)]
        if self._kernel:  # rows with a filter take the lax.scan loop: compile it too
            opts.append(SampleConfig(length=2 * self.chunk, temperature=0.5, top_k=1))
        m = 1
        while m <= self.slots:
            for o in opts:
                done = [threading.Event() for _ in range(m)]
                for ev in done:
                    prompt = np.zeros((self.prompt_chunk + 1,), np.int32)
                    self.submit(Request(prompt, o, 0, partial(_ended, ev)))
                if self._thread is None:
                    while not all(ev.is_set() for ev in done):
                        self._step()
                for ev in done:
                    ev.wait(timeout=300)
            m *= 2

    # --- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._pending and not self._busy():
                    self._cond.wait()
                if self._stopped:
                    return
                idle = not self._busy()
            if idle and self.gather_s > 0:  # let the requests that arrive together gather
                time.sleep(self.gather_s)
            try:
                self._step()
            except Exception:  # noqa: BLE001 - every waiting client must hear of it
                logging.getLogger("jaxchar.engine").exception("generation failed")
                self._fail_all()

    def _busy(self) -> bool:
        return bool(self._rows or self._reading)

    def _step(self) -> None:
        self._take_pending()
        self._read_prompts()
        with self._cond:
            rows = list(self._rows)
        if not rows:
            return
        k, n = _bucket(len(rows)), self.chunk
        keys = np.zeros((k, n, 2), np.uint32)
        left = np.zeros((k,), np.int32)
        temperature = np.zeros((k,), np.float32)
        top_k = np.zeros((k,), np.int32)
        top_p = np.ones((k,), np.float32)
        for i, req in enumerate(rows):
            part = req.keys[req.made : req.made + n]
            keys[i, : len(part)] = part
            left[i] = req.length - req.made
            o = req.opts
            temperature[i], top_k[i], top_p[i] = o.temperature, o.top_k, o.top_p
        if self._kernel and self._kernel(k) and not top_k.any() and (top_p == 1).all():
            self.state, out = _advance_kernel(
                self.params, self.state, keys, left, temperature, dec=self.dec, rows=k
            )
        else:
            self.state, out = _advance(
                self.params,
                self.state,
                keys,
                left,
                temperature,
                top_k,
                top_p,
                dec=self.dec,
                rows=k,
            )
        self.calls += 1
        out = np.asarray(out)
        finished = []
        for i, req in enumerate(rows):
            ids = [int(x) for x in out[i] if x >= 0]
            req.made += len(ids)
            if req.cancelled:
                finished.append(req)
                continue
            if ids:
                req.emit(ids)
            if req.made >= req.length:
                req.emit(None)
                finished.append(req)
        if finished:
            self._free(finished)

    def _free(self, done: list[Request]) -> None:
        """Drops finished rows; the last busy rows move into their places."""
        with self._cond:
            for req in done:
                slot, last = self._rows.index(req), len(self._rows) - 1
                if slot != last:
                    self.state = _move(self.state, last, slot)
                    self._rows[slot] = self._rows[last]
                self._rows.pop()

    def _take_pending(self) -> None:
        """Moves pending requests into free rows of the prompt state (a request holds a row
        from here until it finishes) and drops the ones whose clients left."""
        with self._cond:
            self._pending = [r for r in self._pending if not r.cancelled]
            self._reading = [r for r in self._reading if not r.cancelled]
            used = {r.place for r in self._reading}
            free = (p for p in range(self.slots) if p not in used)
            while self._pending and len(self._rows) + len(self._reading) < self.slots:
                req = self._pending.pop(0)
                req.place, req.read = next(free), 0
                self._reading.append(req)

    def _read_prompts(self) -> None:
        """Reads the next piece of every reading request's prompt in one call (the pieces
        left-padded to a power of two, few shapes); the requests whose prompts are then
        read get their keys in one call and join the busy rows in one call. A prompt's
        first piece is what is left over its whole pieces, so the rest are all whole."""
        with self._cond:
            reading = list(self._reading)
        if not reading:
            return
        pieces = []
        for req in reading:
            left = len(req.prompt) - req.read
            size = (left - 1) % self.prompt_chunk + 1 if req.read == 0 else self.prompt_chunk
            pieces.append(np.asarray(req.prompt[req.read : req.read + size], np.int32))
        m = _bucket(len(reading))
        width = _bucket(max(len(p) for p in pieces), 16)
        padded = np.zeros((m, width), np.int32)
        places = np.full((m,), self.slots, np.int32)  # past the end: dropped
        fresh = np.zeros((m,), bool)
        for i, (req, piece) in enumerate(zip(reading, pieces, strict=True)):
            padded[i, width - len(piece) :] = piece
            places[i], fresh[i] = req.place, req.read == 0
            req.read += len(piece)
        mask = (
            np.arange(width)[None]
            >= width - np.array([len(p) for p in pieces] + [0] * (m - len(pieces)))[:, None]
        )
        self.widest = max(self.widest, max(len(p) for p in pieces))
        self.prompts = _read(self.params, self.prompts, places, fresh, padded, mask, dec=self.dec)
        done = [r for r in reading if r.read >= len(r.prompt)]
        if done:
            self._join(done)

    def _join(self, taken: list[Request]) -> None:
        """Requests whose prompts are read take the next busy rows: their keys made in one
        call, their rows copied from the prompt state in one call."""
        m = _bucket(len(taken))
        seeds = np.zeros((self.slots,), np.uint32)  # one shape: one compilation per length
        seeds[: len(taken)] = [r.seed % 2**32 for r in taken]
        longest = _bucket(max(r.length for r in taken), self.chunk)
        keys = np.asarray(_keys(seeds, length=longest))
        for i, req in enumerate(taken):
            req.keys = keys[i, : req.length]
        src = np.zeros((m,), np.int32)
        dst = np.full((m,), self.slots, np.int32)  # past the end: dropped
        with self._cond:
            first = len(self._rows)
            for i, req in enumerate(taken):
                self._reading.remove(req)
                self._rows.append(req)
                src[i], dst[i] = req.place, first + i
        self.state = _admit(self.state, self.prompts, src, dst)

    def _fail_all(self) -> None:
        with self._cond:
            waiting = self._rows + self._reading + self._pending
            self._rows, self._reading, self._pending = [], [], []
        self.state = self._empty_state()
        self.prompts = self._empty_state()
        for req in waiting:
            req.emit(None)
