"""Loss, train step, evaluation and the one training loop.

`train_step(state, batch, key) -> (state, metrics)` and `eval_step` are pure. `fit` is the
only place with I/O-like effects (logging, checkpoint calls); it runs `steps_per_call` train
steps per jitted dispatch (a `lax.scan` over steps, batches gathered on the device) and only
syncs with the host at log, save and epoch boundaries. Losses are in nats/char.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxchar import data
from jaxchar.config import Config, TrainConfig
from jaxchar.distributed import (
    Mesh,
    check_batch,
    is_single_process,
    place_sharded,
    replicate,
    shard_batch,
    shard_params,
)
from jaxchar.model import apply, for_inference, init_carry, init_params

LN2 = math.log(2.0)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a batch that does not fit the devices)."""


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps done
    params: Any
    opt_state: Any
    carry: Any  # stateful streams' LSTM state between batches, else ()


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    lr, warm = cfg.learning_rate, min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warm, 1)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=0.05)
    elif cfg.schedule == "exponential":
        main = optax.exponential_decay(lr, decay_steps, cfg.decay_rate)
    else:
        main = optax.constant_schedule(lr)
    if not warm:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


class EmaState(NamedTuple):
    count: jax.Array  # int32: updates averaged so far
    ema: Any  # the average, shaped like the params


def ema_decay(count: jax.Array, decay: float) -> jax.Array:
    """The decay at the count-th update: min(decay, (1 + count) / (10 + count)), so that
    the first updates are not held back by the initial weights (a short run's average is
    of its recent weights, not of its start)."""
    count = count.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + count) / (10.0 + count))


def track_ema(decay: float) -> optax.GradientTransformation:
    """Leaves the updates alone and keeps in its state an exponential moving average of
    the params they lead to: ema_t = d_t ema_{t-1} + (1 - d_t) params_t (`ema_decay`),
    ema_0 = the initial params. Kept in the optimizer state, it is checkpointed, restored,
    sharded and skipped (train.skip_nonfinite) with it."""

    def init(params):
        # a copy: the train state's params and the average are donated apart
        return EmaState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.array, params))

    def update(updates, state, params):
        count = state.count + 1
        d = ema_decay(count, decay)
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema, new)
        return updates, EmaState(count, ema)

    return optax.GradientTransformation(init, update)


# The train fields that make the optimizer; the others leave it alone.
_OPTIMIZER_FIELDS = (
    "learning_rate",
    "schedule",
    "warmup_steps",
    "decay_rate",
    "weight_decay",
    "decay",
    "clip_norm",
    "ema",
)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Adam (Keras' epsilon 1e-7), AdamW when weight_decay > 0, optional global-norm clip;
    with train.ema, the average of the weights kept last (`track_ema`).

    One object per optimizer: `run_steps` takes it as a static argument, compared by
    identity, so runs whose optimizers are the same (equal _OPTIMIZER_FIELDS, and equal
    total_steps where the schedule depends on it) share the compiled steps in one process:
    a resumed run, a notebook's second `fit`, the tests' many short runs."""
    if cfg.schedule == "constant" and not cfg.warmup_steps:
        total_steps = 0  # a constant rate does not depend on the run's length
    own = TrainConfig(**{name: getattr(cfg, name) for name in _OPTIMIZER_FIELDS})
    return _optimizer(own, total_steps)


@lru_cache(maxsize=64)
def _optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(cfg, total_steps)
    if cfg.weight_decay:
        mask = _matrices if cfg.decay == "matrices" else None
        opt = optax.adamw(schedule, eps=1e-7, weight_decay=cfg.weight_decay, mask=mask)
    else:
        opt = optax.adam(schedule, eps=1e-7)
    if cfg.clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return optax.chain(opt, track_ema(cfg.ema)) if cfg.ema else opt


def _matrices(params):
    """train.decay = "matrices": True for the parameters of two or more dimensions."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def used_params(state: TrainState, cfg: TrainConfig):
    """The weights that validation, checkpoints and sampling use: the moving average with
    train.ema (the last element of the optimizer's chain), else the params."""
    return state.opt_state[-1].ema if cfg.ema else state.params


def create_state(cfg: Config, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    params = init_params(cfg.model, key, cfg.data.seq_length)
    stateful = data.objective(cfg).carries_state
    carry = init_carry(cfg.model, cfg.train.batch_size) if stateful else ()
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), carry)


def loss_fn(params, cfg: Config, batch: dict, key, carry=None, train: bool = True):
    """Mean cross-entropy over the weighted targets, nats/char; also the new carry."""
    logits, new_carry = apply(
        params,
        cfg.model,
        batch["inputs"],
        carry or None,
        train=train,
        key=key,
        last_only=data.objective(cfg).last_only,
    )  # [batch, vocab] (window) or [batch, time, vocab]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weight = jnp.sum(batch["weights"])
    loss = jnp.sum(ce * batch["weights"]) / jnp.maximum(weight, 1.0)
    return loss, (weight, new_carry)


def train_step(state: TrainState, batch: dict, key, *, cfg: Config, tx) -> tuple[TrainState, dict]:
    stateful = data.objective(cfg).carries_state
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (weight, carry)), grads = grad_fn(state.params, cfg, batch, key, state.carry)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    carry = jax.lax.stop_gradient(carry) if stateful else ()
    grad_norm = optax.tree.norm(grads)
    skipped = jnp.zeros((), bool)
    if cfg.train.skip_nonfinite:  # keep the old params and optimizer state for this batch
        skipped = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skipped, o, n), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        carry = keep(carry, state.carry) if stateful else ()
        loss, weight = jnp.where(skipped, 0.0, loss), jnp.where(skipped, 0.0, weight)
    new_state = TrainState(state.step + 1, params, opt_state, carry)
    metrics = {"loss": loss, "weight": weight, "grad_norm": grad_norm, "skipped": skipped}
    return new_state, metrics


def eval_step(params, batch: dict, *, cfg: Config, carry=None) -> tuple[jax.Array, jax.Array, Any]:
    """Summed loss (nats) and weight of one batch, without dropout; and the new carry."""
    loss, (weight, carry) = loss_fn(params, cfg, batch, None, carry, train=False)
    return loss * weight, weight, carry


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
    root = jax.random.PRNGKey(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)  # data order, dropout


# The fields that the compiled train and evaluation programs (`run_steps`, `_evaluate_jit`)
# never read: `for_programs` sets them to their defaults before a config becomes those
# programs' static argument, so that configs that differ only there (a seed, a run's length,
# logging, saving, sampling, how the text was read) share one compiled program. A field not
# listed is kept: a new one costs a compile, never a wrong program. (The optimizer's fields
# reach the train step through `tx`, the seed through its traced `keys`.)
_UNREAD = {
    "data": (
        "lowercase",
        "remove_punctuation",
        "strip_gutenberg",
        "encoding",
        "errors",
        "val_fraction",
    ),
    "train": (
        "epochs",
        "max_steps",
        "minutes",
        *_OPTIMIZER_FIELDS,
        "seed",
        "keep_best",
        "save_every_steps",
        "log_every",
        "steps_per_call",
        "eval_batches",
        "eval_rows",
        "sample_chars",
    ),
}


def for_programs(cfg: Config) -> Config:
    """cfg with the fields that no compiled train or evaluation program reads (`_UNREAD`,
    and the [sample] section) at their defaults."""
    sections = {}
    for name, fields in _UNREAD.items():
        section = getattr(cfg, name)
        default = type(section)()
        sections[name] = replace(section, **{f: getattr(default, f) for f in fields})
    return replace(cfg, **sections, sample=type(cfg.sample)())


@partial(jax.jit, static_argnames=("cfg", "tx", "n", "mesh"), donate_argnums=(0, 1))
def run_steps(
    state: TrainState,
    totals,
    ids,
    epoch,
    first,
    spans=None,
    keys=None,
    *,
    cfg: Config,
    tx,
    n: int,
    mesh=None,
):
    """n train steps of one epoch, starting at step `first` of it, in one dispatch.
    spans: the sentence spans [n, 2] of the sentences objective, else None.
    keys: the (data order, dropout) keys of the run's seed (`_keys`), traced, so that seeds
    share a program (fit passes them with `for_programs(cfg)`); None: cfg.train.seed's.
    totals: the epoch's running sums (loss x weight, weight, skipped updates); returns the
    per-step losses [n] (NaN where train.skip_nonfinite dropped the update)."""
    data_key, dropout_key = _keys(cfg.train.seed) if keys is None else keys
    obj = data.objective(cfg)

    def body(carry, i):
        state, totals = carry
        if obj.carries_state:  # streams restart at each epoch, and so does their state
            fresh = init_carry(cfg.model, cfg.train.batch_size)
            reset = jax.tree.map(lambda z, c: jnp.where(first + i == 0, z, c), fresh, state.carry)
            state = state.replace(carry=shard_batch(reset, mesh))
        # with a mesh, each device gathers and trains on its own rows of the global batch
        batch = shard_batch(obj.train_batch(ids, spans, data_key, epoch, first + i), mesh)
        key = jax.random.fold_in(dropout_key, state.step)
        state, m = train_step(state, batch, key, cfg=cfg, tx=tx)
        if cfg.train.shard_params and mesh is not None:  # FSDP: stay split between steps
            state = state.replace(
                params=shard_params(state.params, mesh),
                opt_state=shard_params(state.opt_state, mesh),
            )
        totals = (
            totals[0] + m["loss"] * m["weight"],
            totals[1] + m["weight"],
            totals[2] + m["skipped"],
        )
        return (state, totals), jnp.where(m["skipped"], jnp.nan, m["loss"])

    (state, totals), losses = jax.lax.scan(body, (state, totals), jnp.arange(n))
    return state, totals, losses


@partial(jax.jit, static_argnames=("cfg", "obj", "n"))
def _evaluate_jit(params, ids, spans, *, cfg: Config, obj: data.Objective, n: int):
    """Summed loss over n in-order evaluation batches of `obj`, and their weight."""

    def body(acc, i):
        total, weight, carry = acc
        loss, w, new_carry = eval_step(params, obj.eval_batch(ids, spans, i), cfg=cfg, carry=carry)
        return (total + loss, weight + w, new_carry if obj.eval_carries_state else None), None

    carry = init_carry(cfg.model, obj.batch) if obj.eval_carries_state else None
    (total, weight, _), _ = jax.lax.scan(body, (0.0, 0.0, carry), jnp.arange(n))
    return total, weight


@dataclass(frozen=True)
class Score:
    loss: float  # nats/char
    chars: int  # characters scored


def score(params, cfg: Config, ids, spans=None, context: int | None = None) -> Score:
    """The model's mean loss (nats/char) on the ids, without dropout, and how many
    characters it scored: the whole text as training evaluates it (or the first
    train.eval_batches batches), or with `context`, in-order chunks of `context`
    characters each read from a fresh state (data.ResetEvery: every character but the
    first scored once, with 1 to `context` characters before it). The sentences
    objective scores its sentence `spans` (corpus.sentence_spans of these ids), each from a
    fresh state. Batches have train.eval_rows rows (default train.batch_size)."""
    rows = cfg.train.eval_rows or cfg.train.batch_size
    if context is not None:
        if context < 1:
            raise TrainingError(f"the context must be at least 1 character, not {context}")
        per_chunk = replace(cfg.data, objective="sequence", stateful=False, seq_length=context)
        cfg = replace(cfg, data=per_chunk)
        obj = data.ResetEvery(rows, context).for_evaluation(len(ids))
    else:
        obj = data.objective(cfg, rows).for_evaluation(len(ids))
    if obj.needs_spans and (spans is None or not len(spans)):
        raise TrainingError("the sentences objective needs the text's sentence spans")
    n = obj.eval_steps(len(ids), 0 if spans is None else len(spans))
    if cfg.train.eval_batches and context is None:
        n = min(n, cfg.train.eval_batches)
    if n < 1:
        raise TrainingError("the text is too short to evaluate: it needs seq_length + 1 chars")
    spans = None if spans is None else jnp.asarray(spans)
    program = for_programs(cfg)  # and dropout off: configs that differ only there share it
    program = replace(program, model=for_inference(program.model))
    total, weight = _evaluate_jit(params, jnp.asarray(ids), spans, cfg=program, obj=obj, n=n)
    return Score(float(total / jnp.maximum(weight, 1.0)), int(weight))


def evaluate(params, cfg: Config, ids, spans=None) -> float:
    """`score(...).loss`: the loss training reports as its validation loss."""
    return score(params, cfg, ids, spans).loss


class Checkpointer(Protocol):
    """What `fit` needs from a run directory (jaxchar.checkpoint.RunDir provides it)."""

    def restore_latest(self, target: dict) -> dict | None: ...

    def save(self, step: int, tree: dict, metrics: dict) -> None: ...


@dataclass
class FitResult:
    state: TrainState
    history: list[dict] = field(default_factory=list)  # one entry per save
    interrupted: bool = False  # stopped before the schedule's end (a signal, or the time)
    time_up: bool = False  # stopped at train.minutes' deadline (the machine ran slower)
    skipped: int = 0  # updates dropped by train.skip_nonfinite


def zero_totals() -> tuple[jax.Array, jax.Array, jax.Array]:
    """The epoch's running sums: loss x weight (nats), weight (chars), skipped updates."""
    return jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32)


@dataclass(frozen=True)
class Plan:
    """How many steps a run takes: per epoch, in all (epochs or train.max_steps; with
    train.minutes, the train.max_steps that `sized` chose, which fit does first).

    A stateful run (data.stateful) whose length is not a whole number of epochs spends the
    fraction first: it begins `offset` steps into its first epoch, so that its last epoch
    ends where the streams end. Its streams are read in order, and a run stopped partway
    through an epoch has last learnt from their middles (on tiny Shakespeare, seed 0:
    1.4305 after 5 epochs, 1.4511 after 5.54 from the streams' starts; docs/experiments.md,
    "Stateful streams"). The offset follows the run's length: a resume that raises it
    moves the streams once, under the state carried so far."""

    steps_per_epoch: int
    total_steps: int
    offset: int = 0  # steps of the first epoch that the run skips

    @classmethod
    def of(cls, cfg: Config, n_chars: int, n_spans: int = 0) -> Plan:
        t = cfg.train
        per_epoch = data.objective(cfg).steps_per_epoch(n_chars, n_spans)
        if per_epoch < 1:
            raise TrainingError(
                f"{n_chars} training characters make no full batch of {t.batch_size} "
                f"x {cfg.data.seq_length}: lower train.batch_size or data.seq_length"
            )
        if t.minutes and t.max_steps:  # sized by time: the steps `sized` chose, not epochs
            total = t.max_steps
        else:
            total = per_epoch * t.epochs
            total = min(total, t.max_steps) if t.max_steps else total
        stateful = data.objective(cfg).carries_state
        return cls(per_epoch, total, -total % per_epoch if stateful else 0)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within that epoch) of the run's `step`-th step."""
        return divmod(step + self.offset, self.steps_per_epoch)

    def steps_in_next_call(self, step: int, t: TrainConfig) -> int:
        """Steps of the next dispatch: up to train.steps_per_call, never past the epoch's
        end, the run's end or the next periodic save."""
        n = min(t.steps_per_call, self.steps_per_epoch - self.position(step)[1])
        n = min(n, self.total_steps - step)
        if t.save_every_steps:
            n = min(n, t.save_every_steps - step % t.save_every_steps)
        return n

    def saves_at(self, step: int, t: TrainConfig) -> bool:
        return (
            self.position(step)[1] == 0
            or step == self.total_steps
            or bool(t.save_every_steps and step % t.save_every_steps == 0)
        )


@dataclass(frozen=True)
class Sizing:
    """What `sized` measured on this machine and the run length it chose."""

    minutes: float  # the budget
    steps: int  # the run's length: its train.max_steps
    steps_per_epoch: int
    step_s: float  # seconds a train step took
    compile_s: float  # seconds the train step took to compile
    eval_s: float  # seconds the first evaluation took (its compile included)
    left_s: float  # seconds of the budget left once measured
    stateful: bool = False  # the run reads streams: a fraction of an epoch comes first
    deadline: float = math.inf  # when the budget ends, a reading of the clock it was timed on

    def time_is_up(self, now: float, call_s: float) -> bool:
        """Whether another call of `call_s` seconds and a save's evaluation would end after
        the deadline: the run then saves now instead (the machine runs slower than when
        it was timed; the budget's margin did not absorb it)."""
        return now + call_s + self.eval_s > self.deadline

    def time_up_event(self, step: int, total: int, step_s: float) -> dict:
        text = (
            f"train.minutes = {self.minutes:g}: the time is up at step {step:,} of {total:,} "
            f"(a step took {step_s * 1e3:.1f} ms, timed at {self.step_s * 1e3:.1f} ms); saving "
            "now. --resume finishes the schedule"
        )
        return {"event": "time_up", "step": step, "total_steps": total, "text": text}

    def event(self) -> dict:
        """The {"event": "sized"} log entry: what was measured and chosen, in words."""
        epochs = f"{self.steps / self.steps_per_epoch:.2f} epochs"
        if self.stateful and self.steps % self.steps_per_epoch:
            epochs += ", the fraction first, so that the last ends where the streams end"
        text = (
            f"train.minutes = {self.minutes:g}: a train step takes {self.step_s * 1e3:.1f} ms "
            f"here and an evaluation {self.eval_s:.1f} s, so {self.steps:,} steps "
            f"({epochs}) fill the {self.left_s:.0f} s left (train.max_steps = {self.steps})"
        )
        return {"event": "sized", "max_steps": self.steps, "text": text}


def _now() -> float:
    """The clock that `sized` times on by default and `fit` reads Sizing.deadline on."""
    return time.perf_counter()


SIZING_SLACK = 0.90  # the share of the time left that the chosen steps may fill
SIZING_MIN_S = 2.0  # steps are timed for at least this long (and at least 3 calls)
SIZING_WARMUP_CALLS = 2  # calls after the compile that are not timed


def sized(
    cfg: Config,
    train_ids: np.ndarray,
    val_ids: np.ndarray | None = None,
    *,
    train_spans: np.ndarray | None = None,
    val_spans: np.ndarray | None = None,
    mesh: Mesh | None = None,
    began: float | None = None,
    clock: Callable[[], float] | None = None,
) -> tuple[Config, Sizing | None]:
    """cfg with train.max_steps chosen for train.minutes (a run sized by time), and what
    was measured; cfg itself, and None, without train.minutes. For a new run: a resumed
    one keeps the length chosen when it started (its stored train.max_steps).

    The budget counts from `began` (a reading of `clock`, default `_now`, the clock fit
    reads the deadline on; default: now). Calls of the train step from a throwaway start
    (compile first, a few untimed, then at least SIZING_MIN_S of them, their median) give
    the time of a step, and
    one evaluation of the held-out ids the time of each save's; the run then gets the most
    steps whose time, its evaluations (one per epoch, per train.save_every_steps, and at
    the end) and one more compile of the step (the chosen length is part of the compiled
    program) fill SIZING_SLACK of what is left (a stateful run then spends the fraction
    of an epoch first: `Plan`). train.epochs is not used; a train.max_steps already set
    is an upper bound. Every process of a multi-host run takes process 0's choice."""
    t = cfg.train
    if not t.minutes:
        return cfg, None
    if mesh is not None:
        check_batch(t.batch_size, mesh)
    clock = clock or _now
    began = clock() if began is None else began
    trial = replace(cfg, train=replace(t, minutes=0.0, max_steps=0))
    per_epoch = Plan.of(trial, len(train_ids), _spans_count(train_spans)).steps_per_epoch
    tx = make_optimizer(trial.train, per_epoch * t.epochs)
    state, totals = _initial_state(trial, tx, mesh, None)
    ids, spans = _on_device(train_ids, mesh), _on_device(train_spans, mesh)
    n = min(t.steps_per_call, per_epoch)

    keys, program = _keys(t.seed), for_programs(trial)

    def call(state, totals):  # the epoch's first steps each time: the time is the same
        state, totals, losses = run_steps(
            state, totals, ids, 0, 0, spans, keys, cfg=program, tx=tx, n=n, mesh=mesh
        )
        losses.block_until_ready()
        return state, totals

    start = clock()
    state, totals = call(state, totals)
    compiled = clock()
    for _ in range(SIZING_WARMUP_CALLS):  # the first calls after a compile run slower
        state, totals = call(state, totals)
    times, timed = [], clock()
    while len(times) < 3 or clock() - timed < SIZING_MIN_S:
        before = clock()
        state, totals = call(state, totals)
        times.append(clock() - before)
    step_s = float(np.median(times)) / n  # the median call: a stray pause does not count
    compile_s = max(compiled - start - n * step_s, 0.0)
    eval_s = 0.0
    if val_ids is not None and len(val_ids):
        evaluated = clock()
        score(used_params(state, t), cfg, val_ids, val_spans)
        eval_s = clock() - evaluated
    left = t.minutes * 60 - (clock() - began)
    steps = _steps_within(SIZING_SLACK * (left - compile_s), step_s, eval_s, per_epoch, t)
    if t.max_steps:
        steps = min(steps, t.max_steps)
    if not is_single_process():
        from jax.experimental import multihost_utils

        steps = int(multihost_utils.broadcast_one_to_all(np.int32(steps)))
    if steps < 1:
        raise TrainingError(
            f"train.minutes = {t.minutes:g} leaves no time for a step here (a step takes "
            f"{step_s * 1e3:.1f} ms, an evaluation {eval_s:.1f} s, {max(left, 0):.0f} s were "
            "left once measured): raise train.minutes, or set train.epochs instead"
        )
    chosen = replace(cfg, train=replace(t, max_steps=steps))
    stateful = data.objective(trial).carries_state
    deadline = began + t.minutes * 60
    return chosen, Sizing(
        t.minutes, steps, per_epoch, step_s, compile_s, eval_s, left, stateful, deadline
    )


def _spans_count(spans) -> int:  # the sentences objective's spans, else 0
    return 0 if spans is None else len(spans)


def _steps_within(seconds: float, step_s: float, eval_s: float, per_epoch: int, t) -> int:
    """The most steps whose time and their saves' evaluations (one per epoch begun, one
    per train.save_every_steps) fit in `seconds`: the cost only grows with the steps."""

    def cost(steps: int) -> float:
        saves = -(-steps // per_epoch)
        saves += steps // t.save_every_steps if t.save_every_steps else 0
        return steps * step_s + saves * eval_s

    low, high = 0, max(int(seconds / step_s), 0) + 1  # cost(low) fits, cost(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if cost(mid) <= seconds else (low, mid)
    return low


def _initial_state(cfg: Config, tx, mesh: Mesh | None, checkpointer) -> tuple[TrainState, Any]:
    """Fresh params from train.seed, placed on the mesh; or the checkpointer's latest save."""
    state = create_state(cfg, tx, jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 2))
    if mesh is not None and cfg.train.shard_params:
        state = replicate(state.replace(params=None, opt_state=None), mesh).replace(
            params=place_sharded(state.params, mesh),
            opt_state=place_sharded(state.opt_state, mesh),
        )
    else:
        state = replicate(state, mesh)
    totals = replicate(zero_totals(), mesh)
    if checkpointer is not None:
        restored = checkpointer.restore_latest({"state": state, "totals": totals})
        if restored is not None:
            state, totals = restored["state"], restored["totals"]
    return state, totals


def _on_device(array: np.ndarray | None, mesh: Mesh | None):
    if array is None:
        return None
    return replicate(array, mesh) if mesh is not None else jax.device_put(array)


def _last_loss(losses: jax.Array, step: int, skip_nonfinite: bool) -> float:
    """The last step's loss of a dispatch (the last kept one when updates can be skipped);
    a non-finite loss stops training."""
    recent = np.asarray(losses)
    if skip_nonfinite:  # skipped steps are NaN in `losses`
        kept = recent[~np.isnan(recent)]
        recent = kept if len(kept) else np.zeros(1)
    loss = float(recent[-1])
    if not math.isfinite(loss):
        raise TrainingError(
            f"the loss became {loss} at step {step}: lower train.learning_rate, set "
            "train.clip_norm or train.skip_nonfinite; the last good checkpoint is kept"
        )
    return loss


def _save_metrics(
    cfg: Config, params, totals, val_ids, val_spans, interrupted: bool = False
) -> dict:
    """The epoch's mean training loss so far and the validation loss, nats and bits/char.
    A save on interruption skips the validation pass (on a large held-out text it takes
    long, and a stop must be quick) and says so: {"interrupted": true}, no val_loss. Such a
    save is for resuming only and is never ranked as a best checkpoint."""
    train_loss = float(totals[0] / jnp.maximum(totals[1], 1.0))
    metrics = {"train_loss": train_loss, "train_bpc": train_loss / LN2}
    if interrupted:
        metrics["interrupted"] = True
    elif val_ids is not None and len(val_ids):
        held_out = score(params, cfg, val_ids, val_spans)
        metrics["val_loss"] = held_out.loss
        metrics["val_bpc"] = held_out.loss / LN2
        # characters scored, of the held-out text's (fewer with train.eval_batches)
        metrics["val_chars"], metrics["val_text_chars"] = held_out.chars, len(val_ids)
    if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
        raise TrainingError(f"non-finite metrics: {metrics}; not saved")
    return metrics


def fit(
    cfg: Config,
    train_ids: np.ndarray,
    val_ids: np.ndarray | None = None,
    *,
    checkpointer: Checkpointer | None = None,
    log: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    mesh: Mesh | None = None,
    on_save: Callable[[Any, dict], None] | None = None,
    train_spans: np.ndarray | None = None,
    val_spans: np.ndarray | None = None,
    time_limit: Sizing | None = None,
) -> FitResult:
    """Trains `cfg.model` on the ids; saves through `checkpointer` at every epoch end (or
    every train.save_every_steps); resumes from the checkpointer's latest save if it has one.

    `log` receives dicts: {"event": "start" | "progress" | "save", ...}. `should_stop` is
    polled between dispatches (signal handlers set it); the loop then saves and returns.
    With a `mesh` (jaxchar.distributed.make_mesh) the global batch is split over its
    devices and params are replicated; results match the single-device run. `on_save`
    receives (params, metrics) after each save (the CLI prints samples there); with
    train.ema those params, the validation loss and the checkpoints' params are the moving
    average (`used_params`). The
    sentences objective needs the splits' sentence spans (Corpus.train_spans, val_spans).
    A run sized by train.minutes (here, or by the caller, which passes its `time_limit`)
    that falls behind its timing saves, evaluated, and stops before its deadline, logging
    {"event": "time_up"} (one process only: the processes of a multi-host run would each
    read their own clock)."""
    log = log or (lambda event: None)
    should_stop = should_stop or (lambda: False)
    if cfg.model.vocab_size < 1:
        raise TrainingError("cfg.model.vocab_size is not set: use the corpus' vocabulary size")
    obj = data.objective(cfg)
    if obj.needs_spans and train_spans is None:
        raise TrainingError("data.objective = 'sentences' needs train_spans (Corpus.train_spans)")
    sizing = None
    if cfg.train.minutes and not cfg.train.max_steps:  # not sized yet (train_run sizes first)
        cfg, sizing = sized(
            cfg, train_ids, val_ids, train_spans=train_spans, val_spans=val_spans, mesh=mesh
        )
        time_limit = sizing
    if not is_single_process():
        time_limit = None
    t = cfg.train
    plan = Plan.of(cfg, len(train_ids), _spans_count(train_spans))
    tx, schedule = make_optimizer(t, plan.total_steps), make_schedule(t, plan.total_steps)
    if mesh is not None:
        check_batch(t.batch_size, mesh)
    state, totals = _initial_state(cfg, tx, mesh, checkpointer)
    ids, spans = _on_device(train_ids, mesh), _on_device(train_spans, mesh)
    step = int(state.step)
    if sizing is not None:  # a caller that resumes this run passes this cfg's max_steps
        log(sizing.event())
    log(
        {
            "event": "start",
            "step": step,
            "total_steps": plan.total_steps,
            "steps_per_epoch": plan.steps_per_epoch,
        }
    )
    result = FitResult(state)
    began, began_step, last_log = time.perf_counter(), step, step

    def speed() -> float:  # chars/s since this call began
        return (step - began_step) * obj.chars_per_step / max(time.perf_counter() - began, 1e-9)

    keys, program = _keys(t.seed), for_programs(cfg)
    in_flight = None  # the previous call's losses
    calls_s, calls = 0.0, 0  # what the calls took, for time_limit
    while step < plan.total_steps:
        called = _now() if time_limit is not None else 0.0
        epoch, first = plan.position(step)
        n = plan.steps_in_next_call(step, t)
        state, totals, losses = run_steps(
            state, totals, ids, epoch, first, spans, keys, cfg=program, tx=tx, n=n, mesh=mesh
        )
        # at most two calls queued on the device: JAX's asynchronous dispatch would
        # otherwise run up to log_every steps ahead of it, and a stop (Ctrl-C) would wait
        # for all of them before its save; the device still works on one call while the
        # host waits for the one before
        if in_flight is not None:
            in_flight.block_until_ready()
        in_flight = losses
        step += n
        epoch_end = plan.position(step)[1] == 0
        save_now, stop = plan.saves_at(step, t), should_stop()
        if time_limit is not None:
            now = _now()
            calls_s, calls = calls_s + now - called, calls + 1
            call_s = calls_s / calls  # the mean so far: a run's speed drifts slowly
            if step < plan.total_steps and time_limit.time_is_up(now, call_s):
                log(time_limit.time_up_event(step, plan.total_steps, call_s / n))
                save_now, stop, result.time_up = True, True, True
        if step // t.log_every > last_log // t.log_every or save_now or stop:
            loss = _last_loss(losses, step, t.skip_nonfinite)
            log(
                {
                    "event": "progress",
                    "step": step,
                    "epoch": epoch + 1,
                    "loss": loss,
                    "lr": float(schedule(step)),
                    "total_steps": plan.total_steps,
                    "chars_per_s": speed(),
                }
            )
            last_log = step
        if save_now or stop:
            interrupted = stop and not save_now
            weights = used_params(state, t)
            metrics = _save_metrics(cfg, weights, totals, val_ids, val_spans, interrupted)
            metrics.update(
                step=step,
                epoch=epoch + 1,
                epoch_done=epoch_end,
                lr=float(schedule(step)),
                chars_per_s=speed(),
                wall_s=time.perf_counter() - began,
            )
            if t.skip_nonfinite:
                metrics["skipped_updates"] = int(totals[2])
                result.skipped += int(totals[2])
            if epoch_end:  # the next epoch's sums start at zero, in the checkpoint too
                totals = replicate(zero_totals(), mesh)
            if checkpointer is not None:
                tree = {"state": state, "totals": totals, "weights": weights}
                checkpointer.save(step, tree, metrics)
            result.history.append(metrics)
            log({"event": "save", **metrics})
            if on_save is not None:
                on_save(weights, metrics)
        if stop:
            result.interrupted = step < plan.total_steps
            break
    result.state = state
    return result


ONEHOT_MAX_VOCAB = 1024  # [batch, time, vocab] inputs beyond this cost more than they give


def with_vocab(cfg: Config, vocab_size: int) -> Config:
    """The config with model.vocab_size filled in (a new Config; the old one is untouched)."""
    if cfg.model.encoding == "onehot" and vocab_size > ONEHOT_MAX_VOCAB:
        raise TrainingError(
            f"a vocabulary of {vocab_size} characters is too large for model.encoding = "
            f"'onehot' (at most {ONEHOT_MAX_VOCAB}): use --set model.encoding=embed"
        )
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab_size))
