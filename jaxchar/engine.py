"""Batched generation for many concurrent requests: what `jaxchar serve` runs.

The engine keeps `slots` rows of generation state on the device. Each request takes a free
row: its prompt is read into that row's LSTM state (stateful runs) or window (window-trained
runs), and its own per-character keys, temperature, top-k and top-p are written beside it.
One jitted call then advances every row by `chunk` characters (a `lax.scan`), so requests
that arrive together share each step's matrix products; a request that arrives while
others run joins at the next call (continuous batching), and a finished or abandoned
request frees its row at once. Rows are independent: each draws with its own keys, which
are `jax.random.split(PRNGKey(seed), length)` as in `jaxchar.sample`, so a request gets the
text that `Run.generate` gives for the same seed and settings.

With `slots=1` requests run one at a time (the "batching off" of benchmarks/bench_serve.py).
Nothing here knows about HTTP: `submit` takes a callback that receives text pieces.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxchar.config import ModelConfig
from jaxchar.model import apply, init_carry, step
from jaxchar.sampling import _NEG, _reference, top_p_filter


def draw_row(key, logits, temperature, top_k, top_p):
    """One id from one row's logits [V], as `jaxchar.sampling.sample_logits` draws for a
    one-row batch, with the settings as values: top_k 0 and top_p 1 filter nothing,
    temperature 0 is argmax."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)
    kth = jnp.sort(scaled)[::-1][jnp.clip(top_k, 1, vocab) - 1]
    scaled = jnp.where((top_k > 0) & (scaled < kth), _NEG, scaled)
    scaled = jnp.where(top_p < 1, top_p_filter(scaled, top_p), scaled)
    drawn = jax.random.categorical(key, scaled[None], axis=-1)[0].astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits).astype(jnp.int32))


@partial(jax.jit, static_argnames=("cfg", "mode", "n"), donate_argnames=("state",))
def _advance(params, state, *, cfg: ModelConfig, mode: str, n: int):
    """Every row `n` characters further: (state, ids [rows, n], -1 where a row made none)."""
    rows = state["gen"].shape[0]
    reference = _reference(cfg)

    def body(st, _):
        live = st["active"] & (st["gen"] < st["length"])
        keys = st["keys"][jnp.arange(rows), jnp.minimum(st["gen"], st["keys"].shape[1] - 1)]
        if mode == "stateful":
            logits = st["logits"]
        else:
            logits, _ = apply(params, cfg, st["window"], mask=st["mask"], last_only=True)
        ids = jax.vmap(draw_row)(keys, logits, st["temperature"], st["top_k"], st["top_p"])
        st = dict(st, gen=st["gen"] + live)
        if mode == "stateful":
            st["logits"], st["carry"] = step(params, reference, st["carry"], ids)
        else:
            st["window"] = jnp.concatenate([st["window"][:, 1:], ids[:, None]], axis=1)
            st["mask"] = jnp.concatenate([st["mask"][:, 1:], jnp.ones((rows, 1), bool)], axis=1)
        return st, jnp.where(live, ids, -1)

    state, out = jax.lax.scan(body, state, None, length=n)
    return state, out.T


@partial(jax.jit, static_argnames=("cfg",))
def _prime(params, prompt, mask, *, cfg: ModelConfig):
    """The state after a left-padded prompt [1, P] (masked positions leave it untouched):
    (carry, logits [1, V]), as jaxchar.sampling reads a prompt."""
    reference = _reference(cfg)
    logits, carry = apply(params, reference, prompt, init_carry(reference, 1), mask=mask)
    return carry, logits[:, -1]


@partial(jax.jit, donate_argnames=("state",))
def _admit(state, slot, row):
    """Writes one request's row (a dict of [1, ...] values) into row `slot` of the state."""
    new = dict(state)
    for name, value in row.items():
        if name == "carry":
            new["carry"] = jax.tree.map(lambda s, v: s.at[slot].set(v[0]), state["carry"], value)
        else:
            new[name] = state[name].at[slot].set(value[0])
    return new


@dataclass
class Request:
    """One generation: ids of the prompt, settings, and where its text goes."""

    prompt: np.ndarray
    length: int
    seed: int
    temperature: float
    top_k: int
    top_p: float
    emit: Callable[[list[int] | None], None]  # new ids; None when finished
    made: int = 0
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """The client went away: its row is freed at the next step."""
        self.cancelled = True


def _bucket(n: int) -> int:
    """Prompt lengths are padded up to a power of two (at least 16): few compilations."""
    return max(16, 1 << (n - 1).bit_length())


class Engine:
    """See the module's docstring. `start()` runs the loop on a thread; `submit` is safe to
    call from any thread; `stop()` ends it."""

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
    ):
        if mode not in ("stateful", "window"):
            raise ValueError(f"mode must be 'stateful' or 'window', not {mode!r}")
        self.params, self.cfg, self.mode = params, cfg, mode
        self.seq_length, self.slots, self.chunk = seq_length, slots, chunk
        self.gather_s, self.max_length = gather_ms / 1000, max_length
        self._pending: list[Request] = []
        self._rows: list[Request | None] = [None] * slots
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.calls = 0  # jitted advance calls so far (for tests and the load benchmark)
        self.state = self._empty_state()

    def _empty_state(self) -> dict:
        s, v = self.slots, self.cfg.vocab_size
        state = {
            "keys": jnp.zeros((s, self.max_length, 2), jnp.uint32),
            "gen": jnp.zeros((s,), jnp.int32),
            "length": jnp.zeros((s,), jnp.int32),
            "active": jnp.zeros((s,), bool),
            "temperature": jnp.zeros((s,), jnp.float32),
            "top_k": jnp.zeros((s,), jnp.int32),
            "top_p": jnp.ones((s,), jnp.float32),
        }
        if self.mode == "stateful":
            state["carry"] = init_carry(_reference(self.cfg), s)
            state["logits"] = jnp.zeros((s, v), jnp.float32)
        else:
            state["window"] = jnp.zeros((s, self.seq_length), jnp.int32)
            state["mask"] = jnp.zeros((s, self.seq_length), bool)
        return state

    # --- the public side ---------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        if not 1 <= request.length <= self.max_length:
            raise ValueError(f"length must be between 1 and {self.max_length}")
        if len(request.prompt) < 1:
            raise ValueError("the prompt must have at least one character")
        with self._cond:
            self._pending.append(request)
            self._cond.notify()
        return request

    def busy_rows(self) -> int:
        with self._cond:
            return sum(r is not None for r in self._rows)

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

    def warm_up(self) -> None:
        """Compiles the advance call and the shortest prompt bucket before serving."""
        done = threading.Event()
        req = Request(np.array([0]), 1, 0, 0.0, 0, 1.0, lambda ids: ids is None and done.set())
        if self._thread is None:
            self.submit(req)
            self._step()
            while not done.is_set():
                self._step()
        else:
            self.submit(req)
            done.wait(timeout=300)

    # --- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._pending and not any(self._rows):
                    self._cond.wait()
                if self._stopped:
                    return
                idle = not any(self._rows)
            if idle and self.gather_s > 0:  # let the requests that arrive together gather
                time.sleep(self.gather_s)
            try:
                self._step()
            except Exception as err:  # noqa: BLE001 - every waiting client must hear of it
                self._fail_all(err)

    def _step(self) -> None:
        self._admit_pending()
        if not any(self._rows):
            return
        self.state, out = _advance(
            self.params, self.state, cfg=self.cfg, mode=self.mode, n=self.chunk
        )
        self.calls += 1
        out = np.asarray(out)
        with self._cond:
            for slot, req in enumerate(self._rows):
                if req is None:
                    continue
                ids = [int(i) for i in out[slot] if i >= 0]
                req.made += len(ids)
                if req.cancelled:
                    self._free(slot)
                    continue
                if ids:
                    req.emit(ids)
                if req.made >= req.length:
                    req.emit(None)
                    self._free(slot)

    def _free(self, slot: int) -> None:
        self._rows[slot] = None
        self.state["active"] = self.state["active"].at[slot].set(False)

    def _admit_pending(self) -> None:
        with self._cond:
            self._pending = [r for r in self._pending if not r.cancelled]
            free = [i for i, r in enumerate(self._rows) if r is None]
            taken = []
            while free and self._pending:
                slot, req = free.pop(0), self._pending.pop(0)
                self._rows[slot] = req
                taken.append((slot, req))
        for slot, req in taken:
            self.state = _admit(self.state, slot, self._row(req))

    def _row(self, req: Request) -> dict:
        keys = np.zeros((1, self.max_length, 2), np.uint32)
        keys[0, : req.length] = np.asarray(
            jax.random.split(jax.random.PRNGKey(req.seed), req.length)
        )
        row = {
            "keys": keys,
            "gen": np.zeros((1,), np.int32),
            "length": np.array([req.length], np.int32),
            "active": np.ones((1,), bool),
            "temperature": np.array([req.temperature], np.float32),
            "top_k": np.array([req.top_k], np.int32),
            "top_p": np.array([req.top_p], np.float32),
        }
        prompt = np.asarray(req.prompt, np.int32)
        if self.mode == "stateful":
            width = _bucket(len(prompt))
            padded = np.zeros((1, width), np.int32)
            padded[0, width - len(prompt) :] = prompt
            mask = np.arange(width)[None] >= width - len(prompt)
            row["carry"], row["logits"] = _prime(self.params, padded, mask, cfg=self.cfg)
        else:
            tail = prompt[-self.seq_length :]
            window = np.zeros((1, self.seq_length), np.int32)
            window[0, self.seq_length - len(tail) :] = tail
            row["window"] = window
            row["mask"] = np.arange(self.seq_length)[None] >= self.seq_length - len(tail)
        return row

    def _fail_all(self, err: Exception) -> None:
        with self._cond:
            waiting = [r for r in self._rows if r is not None] + self._pending
            self._rows = [None] * self.slots
            self._pending = []
        self.state = self._empty_state()
        for req in waiting:
            req.emit(None)
