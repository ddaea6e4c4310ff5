"""The continuous-batching engine: `parallel` KV slots, one model thread, requests that come and go.

One batch cache holds `parallel` slots of `context` positions. Each iteration of the model
thread runs one decode step over every slot (idle slots take part with zero input tokens, so
nothing they hold changes) and one prefill chunk of a waiting prompt, so a new request starts
between two decode steps of the others and a finished one frees its slot at once. When many
prompts are waiting, one "mixed" step prefills a chunk of each of them while the decoding rows
advance by one token. Every step is compiled ahead of time at start-up for its one shape:
nothing compiles while serving.

A finished slot keeps its cache and the ids it holds: a new prompt starting with the same
tokens (a shared system prompt, the earlier turns of a chat) reuses the longest matching
prefix of any slot, copied into its own slot when that slot is another's, and prefills only
the rest.

Rows never mix: each row's positions, attention mask, sampling key and repetition state are its
own, so a response is the one the same request gets alone from `grokcli.generate` (greedy).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from functools import partial
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .. import model as model_fn
from .. import samplers
from ..events import TopLogprob
from ..sampling_params import SamplingParams

log = logging.getLogger("grokcli.server")

MAX_LOGPROBS = 20  # the most top alternatives a request may ask for (one compiled variant)
_IDLE = SamplingParams(temperature=0.0, max_tokens=1)  # sampling settings of an empty slot

# Backend compiles in this process, counted from jax's monitoring hooks (compiles after the
# warm-up are a bug: the serving loop has a fixed set of shapes).
_compiles = {"count": 0}


def _on_duration(event: str, duration: float, **_kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles["count"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_count() -> int:
    """Backend compilations this process has run so far."""
    return _compiles["count"]


class QueueFull(Exception):
    """More sequences are waiting for a slot than the engine accepts; retry later."""


class EngineClosed(Exception):
    """The engine is shutting down (or failed) and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine divides the model's memory and time between requests."""

    parallel: int = 4  # KV slots: sequences generated at the same time
    context: int | None = None  # positions per slot (prompt + completion); None: the model's sequence_len
    prefill_chunk: int = 128  # prompt tokens a slot prefills per step
    max_queue: int = 64  # sequences that may wait for a slot; beyond that submit() raises QueueFull
    prefix_reuse: bool = True  # reuse the KV of a matching prompt prefix held by any slot
    mixed_min_rows: int | None = None  # prompts waiting at once for a mixed step (None: parallel // 4, at least 2)

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if self.context is not None and self.context < 2:
            raise ValueError(f"context must be >= 2, got {self.context}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


def plan_parallel(cfg, mesh=None, *, context: int | None = None, prefill_chunk: int = 128,
                  device_memory: int | None = None, dtype: str = "bfloat16", most: int = 16,
                  unknown: int = 4) -> int:
    """The most KV slots (at most `most`) whose memory plan fits the devices beside the weights;
    `unknown` when the device memory is not known (CPUs), 1 when not even one fits (loading then
    fails with the numbers). `mesh` as `memory.plan_for_devices` takes it."""
    from ..memory import Reservation, plan_for_devices

    context = context or cfg.sequence_len
    chunk = min(prefill_chunk, context)
    for n in sorted({most, *(m for m in (12, 8, 6, 4, 3, 2, 1) if m < most)}, reverse=True):
        plan = plan_for_devices(cfg, mesh, Reservation(batch=n, prompt_tokens=chunk, max_tokens=max(1, context - chunk),
                                                         prefill_chunk=chunk),
                                device_memory=device_memory, dtype=dtype)
        if plan.fits is None:
            return min(unknown, most)
        if plan.fits:
            return n
    return 1


@dataclasses.dataclass(frozen=True)
class TokenOut:
    """One generated token of a sequence, with the text it makes final."""

    token_id: int
    text: str  # may be "" (held back: an unfinished character or a possible stop string)
    logprob: float | None
    top_logprobs: tuple[TopLogprob, ...] | None


@dataclasses.dataclass(frozen=True)
class DoneOut:
    """The end of a sequence."""

    finish_reason: str  # "stop" (stop string), "eos", "length", "cancelled" or "error"
    text: str  # everything generated, stop string excluded
    final_text: str  # text no TokenOut carried (released at the end)
    token_ids: tuple[int, ...]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from an earlier request
    time_to_first_token_s: float | None
    error: str | None = None


Sink = Callable[[object], None]  # receives TokenOut / DoneOut from the model thread


class Observer:
    """Hooks the engine calls from its thread (metrics); the default does nothing."""

    def prompt(self, tokens: int, cached: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def tokens(self, count: int, step_seconds: float) -> None: ...

    def finished(self, reason: str) -> None: ...


class Sequence:
    """One prompt being completed: what was asked, and the engine's progress on it."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, *, tokenizer=None,
                 key_index: int = 0):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.key_index = key_index  # the row index `generate_batch` would give it (its sampling stream)
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens in the slot's cache
        self.cached = 0  # of those, reused from an earlier request
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self._detok = self._stopper = None
        if tokenizer is not None:
            from ..stops import StopMatcher
            from ..tokenizer import IncrementalDetokenizer

            self._detok = IncrementalDetokenizer(tokenizer, continuation=True)
            self._stopper = StopMatcher(list(params.stop))
        self._tokenizer = tokenizer
        self.row_params = None  # its sampling settings as a one-row RowParams (set when it gets a slot)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    def _release(self) -> str:
        """Text still held by the detokenizer and the stop matcher when the sequence ends."""
        if self._detok is None or self._stopper.stopped:
            return ""
        tail, stopped = self._stopper.feed(self._detok.flush())
        if not stopped:
            tail += self._stopper.flush()
        if self._stopper.stopped:
            self.finish_reason = "stop"  # the released text completed a stop string
        return tail

    def add_token(self, token: int, logprob, top, context: int) -> TokenOut | None:
        """Take one sampled token; sets finish_reason when the sequence is done."""
        if token == self._eos and not self.params.ignore_eos:
            self.finish_reason = "eos"
            return None
        self.token_ids.append(token)
        delta = ""
        if self._detok is not None:
            delta, stopped = self._stopper.feed(self._detok.push(token))
            if stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and (len(self.token_ids) >= self.params.max_tokens
                                           or len(self.prompt_ids) + len(self.token_ids) >= context):
            self.finish_reason = "length"
        if self.finish_reason == "length":
            delta += self._release()
        self.text.append(delta)
        return TokenOut(token, delta, logprob, top)

    def done(self, error: str | None = None) -> DoneOut:
        final = ""
        if self.finish_reason in ("eos", "cancelled", "error"):
            final = self._release() if self.finish_reason == "eos" else ""
            self.text.append(final)
        ttft = None if self.t_first is None else self.t_first - self.t_submit
        return DoneOut(self.finish_reason, "".join(self.text), final, tuple(self.token_ids), len(self.prompt_ids),
                       self.cached, ttft, error)

    _eos = -1  # set by the engine from the model config


# ---------------------------------------------------------------------------------------------
# The compiled steps. Each takes the batch cache and the `seen` masks and returns them updated
# (both donated, so they are updated in place).


def _sample(params, hidden, seen, keys, steps, row_params, use, *, cfg, top_n):
    """Next token of each row from its last hidden state; marked seen in the rows that `use` it."""
    logits = model_fn.lm_head(params, hidden, cfg)
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
    token = samplers.sample(logits, step_keys, row_params, seen)
    rows = jnp.arange(token.shape[0])
    seen = seen.at[rows, token].set(seen[rows, token] | use)
    if top_n:
        logprob, top_ids, top_values = samplers.token_logprobs(logits, token, top_n)
    else:
        logprob = jnp.zeros(token.shape, jnp.float32)
        top_ids = jnp.zeros(token.shape + (1,), jnp.int32)
        top_values = jnp.zeros(token.shape + (1,), jnp.float32)
    return token, logprob, top_ids, top_values, seen


def _at_lengths(cache: model_fn.KVCache, lengths) -> model_fn.KVCache:
    """The cache with each row cut back to `lengths` positions (what the host says it holds)."""
    keep = jnp.arange(cache.valid.shape[1])[None, :] < lengths[:, None]
    return model_fn.KVCache(cache.k, cache.v, cache.valid & keep, lengths)


def _batch_step(params, cache, seen, tokens, lengths, counts, use, keys, steps, row_params, *, cfg, dtype, top_n):
    """Every slot at once: row b adds its first counts[b] tokens (0: the row is left as it is)
    after position lengths[b], and samples after its last one (a token it uses if use[b])."""
    cache = _at_lengths(cache, lengths)
    h, cache = model_fn.forward(params, tokens, cfg, cache, input_lengths=counts, dtype=dtype)
    last = h[jnp.arange(tokens.shape[0]), jnp.maximum(counts - 1, 0)]
    *out, seen = _sample(params, last, seen, keys, steps, row_params, use, cfg=cfg, top_n=top_n)
    return (*out, cache, seen)


def _row_step(params, cache, seen, slot, tokens, length, count, use, keys, steps, row_params, *, cfg, dtype,
              top_n):
    """One slot alone: its row is cut out of the batch cache, extended by `count` tokens and put back."""
    def row(x, axis):
        return jax.lax.dynamic_slice_in_dim(x, slot, 1, axis)

    one = model_fn.KVCache(row(cache.k, 1), row(cache.v, 1), row(cache.valid, 0), row(cache.lengths, 0))
    one = _at_lengths(one, length[None])
    h, one = model_fn.forward(params, tokens, cfg, one, input_lengths=count[None], dtype=dtype)
    token, logprob, top_ids, top_values, seen_row = _sample(
        params, h[:, jnp.maximum(count - 1, 0)], row(seen, 0), keys, steps, row_params, use[None], cfg=cfg,
        top_n=top_n)

    def put(x, part, axis):
        return jax.lax.dynamic_update_slice_in_dim(x, part, slot, axis)

    cache = model_fn.KVCache(put(cache.k, one.k, 1), put(cache.v, one.v, 1), put(cache.valid, one.valid, 0),
                             put(cache.lengths, one.lengths, 0))
    return token, logprob, top_ids, top_values, cache, put(seen, seen_row, 0)


def _copy_prefix(cache, src, dst, n):
    """Slot `dst` gets the first `n` positions of slot `src` (the rest of `dst` is left alone)."""
    def copy(x, axis):
        src_row = jax.lax.dynamic_slice_in_dim(x, src, 1, axis)
        dst_row = jax.lax.dynamic_slice_in_dim(x, dst, 1, axis)
        shape = [1] * x.ndim
        shape[axis + 1] = x.shape[axis + 1]
        keep = (jnp.arange(x.shape[axis + 1]) < n).reshape(shape)
        return jax.lax.dynamic_update_slice_in_dim(x, jnp.where(keep, src_row, dst_row), dst, axis)

    return model_fn.KVCache(copy(cache.k, 1), copy(cache.v, 1), copy(cache.valid, 0), cache.lengths)


def _set_seen(seen, slot, row):
    """Slot `slot`'s repetition mask becomes `row` (the tokens of its new prompt)."""
    return jax.lax.dynamic_update_slice_in_dim(seen, row[None], slot, 0)


def _make_key(seed, index):
    return jax.random.fold_in(jax.random.PRNGKey(seed), index)


# ---------------------------------------------------------------------------------------------


class Engine:
    """Serves completions of one model to many callers; the model runs in one background thread.

    `submit()` is thread-safe and returns at once; events go to the sequence's sink from the
    model thread. `stream()` wraps it as a blocking iterator for plain Python use.
    """

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, observer: Observer | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.observer = observer or Observer()
        cfg = model.config
        self.cfg = cfg
        self.slots = self.config.parallel
        self.context = min(self.config.context or cfg.sequence_len, cfg.sequence_len)
        self.chunk = min(self.config.prefill_chunk, self.context)
        self.mixed_min_rows = self.config.mixed_min_rows or max(2, self.slots // 4)
        self.max_queue = self.config.max_queue
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting_count = 0  # submitted, no slot yet (inbox + waiting list)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._slot_seq: list[Sequence | None] = [None] * self.slots
        self._slot_ids: list[list[int]] = [[] for _ in range(self.slots)]  # ids whose KV each slot holds
        self._slot_used = [0.0] * self.slots  # when each slot last held a sequence (least recent is reused first)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stop = threading.Event()
        self.error: str | None = None  # set when the model thread died
        self.row_decode_max = 0  # while at most this many rows decode, they step one by one (set at warm-up)
        self._compiled_at_warmup = 0
        Sequence._eos = cfg.eos_token

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Allocate the cache, compile every step (warm-up) and start the model thread."""
        self._setup()
        self._compiled_at_warmup = compile_count()
        self._thread = threading.Thread(target=self._run, name="grok-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, *, key_index: int = 0) -> Sequence:
        """Queue a prompt (token ids that fit the context); raises QueueFull or EngineClosed."""
        if len(prompt_ids) + 1 > self.context:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens but a slot holds {self.context} "
                             "(prompt + at least 1 new token)")
        seq = Sequence(prompt_ids, params, sink, tokenizer=self.tokenizer, key_index=key_index)
        self.submit_many([seq])
        return seq

    def submit_many(self, seqs: list[Sequence]) -> None:
        """Queue several sequences together: all are accepted, or none (QueueFull/EngineClosed)."""
        with self._lock:
            if self._closed or self.error:
                raise EngineClosed(self.error or "the server is shutting down")
            free = sum(s is None for s in self._slot_seq)
            if self._waiting_count + len(seqs) > self.max_queue + free:
                raise QueueFull(f"{self._waiting_count} requests are waiting (limit {self.max_queue})")
            self._waiting_count += len(seqs)
        for seq in seqs:
            self._inbox.put(("submit", seq))

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (thread-safe); its slot is free before the next step. Its sink gets a
        DoneOut with finish_reason "cancelled" unless it had already finished."""
        self._inbox.put(("cancel", seq))

    def stream(self, prompt_ids: list[int], params: SamplingParams, *, key_index: int = 0,
               timeout: float | None = None) -> Iterator[TokenOut | DoneOut]:
        """Submit and yield the sequence's events until its DoneOut (blocking)."""
        events: queue.Queue = queue.Queue()
        seq = self.submit(prompt_ids, params, events.put, key_index=key_index)
        try:
            while True:
                event = events.get(timeout=timeout)
                yield event
                if isinstance(event, DoneOut):
                    return
        finally:
            self.cancel(seq)

    def close(self, timeout: float | None = 10.0) -> None:
        """Take no new requests, cancel the running ones and stop the model thread."""
        with self._lock:
            self._closed = True
        self._stop.set()
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def stop_accepting(self) -> None:
        """New submissions fail with EngineClosed; running and waiting ones carry on."""
        with self._lock:
            self._closed = True

    def snapshot(self) -> dict:
        """Counts for /metrics and /health (read without locking: a scrape may be one step old)."""
        running = [s for s in self._slot_seq if s is not None]
        return {"running": len(running), "waiting": self._waiting_count,
                "slots_in_use": len(running), "slots": self.slots, "context": self.context,
                "compiles_after_warmup": compile_count() - self._compiled_at_warmup}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- set-up -------------------------------------------------------------------------------

    def _setup(self) -> None:
        model, cfg, n, c = self.model, self.cfg, self.slots, self.context
        mesh = getattr(model, "mesh", None)
        self._outs = {}  # output layouts on a mesh: each output feeds the next step as that input
        if mesh is None:
            self._cache = model_fn.init_cache(cfg, n, c, model.dtype)
            self._seen = jnp.zeros((n, cfg.vocab_size), bool)
        else:
            from .. import sharding

            self._cache = sharding.init_cache(cfg, n, c, model.dtype, mesh)  # never whole on one device
            rep = sharding.replicated(mesh)
            self._seen = sharding.put(np.zeros((n, cfg.vocab_size), bool), rep)
            cache_layout = sharding.cache_shardings(cfg, n, c, mesh)
            self._outs = {"step": (rep, rep, rep, rep, cache_layout, rep), "copy": cache_layout, "seen": rep,
                          "key": rep}
        self._keys = np.zeros((n, 2), np.uint32)
        self._steps = np.zeros((n,), np.int32)
        self._lengths = np.zeros((n,), np.int32)  # positions each slot's cache holds
        self._params: list[SamplingParams] = [_IDLE] * n
        self._row_params = samplers.row_params(self._params)
        self._last_token = np.zeros((n,), np.int32)  # the next token each decoding slot feeds
        common = dict(cfg=cfg, dtype=model.dtype)
        i32 = np.int32
        no = np.zeros((n,), bool)
        batch_args = lambda t: (model.params, self._cache, self._seen, np.zeros((n, t), i32), self._lengths,  # noqa: E731
                                self._lengths, no, self._keys, self._steps, self._row_params)
        one_params = samplers.row_params([_IDLE])
        row_args = lambda t: (model.params, self._cache, self._seen, i32(0), np.zeros((1, t), i32),  # noqa: E731
                              i32(0), i32(1), np.bool_(False), self._keys[:1], self._steps[:1], one_params)
        self._exe = {}
        specs = [("decode0", _batch_step, batch_args(1), dict(top_n=0), (1, 2)),
                 ("decode", _batch_step, batch_args(1), dict(top_n=MAX_LOGPROBS), (1, 2)),
                 ("row", _row_step, row_args(self.chunk), dict(top_n=MAX_LOGPROBS), (1, 2)),
                 ("row1", _row_step, row_args(1), dict(top_n=MAX_LOGPROBS), (1, 2))]
        if n >= self.mixed_min_rows:
            specs.append(("mixed", _batch_step, batch_args(self.chunk), dict(top_n=MAX_LOGPROBS), (1, 2)))
        for name, fn, args, extra, donate in specs:
            self._exe[name] = self._compile(partial(fn, **common, **extra), args, donate, "step")
        self._exe["copy"] = self._compile(_copy_prefix, (self._cache, i32(0), i32(0), i32(0)), (0,), "copy")
        self._exe["seen"] = self._compile(_set_seen, (self._seen, i32(0), np.zeros((cfg.vocab_size,), bool)), (0,),
                                          "seen")
        self._exe["key"] = self._compile(_make_key, (np.uint32(0), i32(0)), (), "key")
        # One call of each: the first run of an executable can still trace or transfer lazily.
        self._keys[:] = np.asarray(self._exe["key"](np.uint32(0), i32(0)))
        self._cache = self._exe["copy"](self._cache, i32(0), i32(0), i32(0))
        self._seen = self._exe["seen"](self._seen, i32(0), np.zeros((cfg.vocab_size,), bool))
        for name in ("decode0", "decode") + (("mixed",) if "mixed" in self._exe else ()):
            t = self.chunk if name == "mixed" else 1
            *out, self._cache, self._seen = self._exe[name](*batch_args(t))
            np.asarray(out[0])
        for name, t in (("row", self.chunk), ("row1", 1)):
            *out, self._cache, self._seen = self._exe[name](*row_args(t))
            np.asarray(out[0])
        # A decode step over every slot costs about the same however many are busy (on a CPU,
        # several times one row's step: the MoE then reads every expert). While few rows decode,
        # one-row steps are cheaper: measure how many.
        t_batch = self._time(lambda: self._exe["decode0"](*batch_args(1)))
        t_row = self._time(lambda: self._exe["row1"](*row_args(1)))
        self.row_decode_max = min(int(t_batch / t_row), self.slots - 1) if t_row < t_batch else 0
        log.info("decode step: %.1f ms over %d slots, %.1f ms for one row: one-row steps while <= %d rows decode",
                 t_batch * 1e3, self.slots, t_row * 1e3, self.row_decode_max)

    def _time(self, step, rounds: int = 3) -> float:
        """The fastest of a few runs of a compiled step (it returns (..., cache, seen))."""
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            *out, self._cache, self._seen = step()
            np.asarray(out[0])
            best = min(best, time.perf_counter() - t0)
        return best

    def _compile(self, fn, args, donate, kind):
        pinned = {"out_shardings": self._outs[kind]} if kind in self._outs else {}
        return jax.jit(fn, donate_argnums=donate, **pinned).lower(*args).compile()

    # -- the model thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = any(s is not None for s in self._slot_seq) or bool(self._waiting)
                self._read_inbox(block=not busy)
                if self._stop.is_set():
                    break
                self._admit()
                if any(s is not None for s in self._slot_seq):
                    self._iterate()
        except Exception as e:  # noqa: BLE001 - the server must answer, not hang
            log.exception("the model thread failed")
            self.error = f"the model failed: {type(e).__name__}"
            with self._lock:
                self._closed = True
        finally:
            reason = "error" if self.error else "cancelled"
            for slot, seq in enumerate(self._slot_seq):
                if seq is not None:
                    self._finish(seq, reason, error=self.error)
            while True:
                try:
                    kind, seq = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "submit":
                    self._waiting.append(seq)
            for seq in self._waiting:
                seq.finish_reason = reason
                self._emit(seq, seq.done(self.error))
            self._waiting.clear()
            self._waiting_count = 0

    def _read_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, seq = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if kind == "submit":
                self._waiting.append(seq)
            elif kind == "cancel":
                self._cancel(seq)
            elif kind == "stop":
                return

    def _cancel(self, seq: Sequence) -> None:
        if seq.finish_reason is not None or seq.cancelled:
            return
        seq.cancelled = True
        if seq.slot is not None:
            self._finish(seq, "cancelled")
        elif seq in self._waiting:
            self._waiting.remove(seq)
            with self._lock:
                self._waiting_count -= 1
            seq.finish_reason = "cancelled"
            self._emit(seq, seq.done())
        # else: still in the inbox behind this cancel? No: submits are queued before cancels.

    def _emit(self, seq: Sequence, event) -> None:
        try:
            seq.sink(event)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the others
            log.exception("a request's event sink failed")

    def _admit(self) -> None:
        while self._waiting and None in self._slot_seq:
            seq = self._waiting.popleft()
            if seq.cancelled:
                continue
            with self._lock:
                self._waiting_count -= 1
            slot, source, reuse = self._choose_slot(seq.prompt_ids)
            if reuse and source != slot:
                self._cache = self._exe["copy"](self._cache, np.int32(source), np.int32(slot), np.int32(reuse))
            self._slot_ids[slot] = self._slot_ids[source][:reuse] if reuse else []
            seq.slot, seq.prefilled, seq.cached = slot, reuse, reuse
            self._slot_seq[slot] = seq
            self._lengths[slot] = reuse
            self._steps[slot] = 0
            self._keys[slot] = np.asarray(self._exe["key"](np.uint32(seq.params.seed), np.int32(seq.key_index)))
            self._params[slot] = seq.params
            self._row_params = samplers.row_params(self._params)
            seq.row_params = samplers.row_params([seq.params])  # for its one-row steps
            if seq.params.repetition_penalty != 1.0:
                row = np.zeros((self.cfg.vocab_size,), bool)
                row[seq.prompt_ids] = True
                self._seen = self._exe["seen"](self._seen, np.int32(slot), row)
            self.observer.prompt(len(seq.prompt_ids), reuse)

    def _choose_slot(self, ids: list[int]) -> tuple[int, int, int]:
        """(slot to use, slot to copy a prefix from, prefix length): the longest reusable prefix,
        else the free slot idle the longest. At least one prompt token is always prefilled."""
        free = [s for s in range(self.slots) if self._slot_seq[s] is None]
        best_src, best_n = None, 0
        if self.config.prefix_reuse:
            limit = len(ids) - 1
            for s in range(self.slots):
                n = _common_prefix(self._slot_ids[s], ids, limit)
                if n > best_n or (n == best_n and n and s in free and best_src not in free):
                    best_src, best_n = s, n
        if best_n and best_src in free:
            return best_src, best_src, best_n
        # Keep the free slots holding the most reusable text: take the least recently used one.
        slot = min(free, key=lambda s: self._slot_used[s])
        return slot, (best_src if best_n else slot), best_n

    def _iterate(self) -> None:
        prefilling = [s for s in self._slot_seq if s is not None and s.prefilling]
        decoding = [s for s in self._slot_seq if s is not None and not s.prefilling]
        if len(prefilling) >= self.mixed_min_rows and "mixed" in self._exe:
            self._mixed_step(prefilling, decoding)
            return
        if decoding and len(decoding) <= self.row_decode_max:
            for seq in decoding:
                self._decode_row(seq)
        elif decoding:
            self._decode_step(decoding)
        if prefilling:
            self._row_step(min(prefilling, key=lambda s: s.id))  # oldest first: its first token soonest

    def _decode_step(self, decoding: list[Sequence]) -> None:
        counts = np.zeros((self.slots,), np.int32)
        for seq in decoding:
            counts[seq.slot] = 1
        want_lp = any(s.params.logprobs for s in decoding)
        t0 = time.perf_counter()
        out = self._exe["decode" if want_lp else "decode0"](
            self.model.params, self._cache, self._seen, self._last_token[:, None], self._lengths, counts,
            counts > 0, self._keys, self._steps, self._row_params)
        *result, self._cache, self._seen = out
        host = [np.asarray(x) for x in result]
        for seq in decoding:
            self._slot_ids[seq.slot].append(int(self._last_token[seq.slot]))
        self._lengths += counts
        self._deliver(decoding, host, lambda seq: seq.slot, time.perf_counter() - t0)

    def _row_step(self, seq: Sequence) -> None:
        slot, start = seq.slot, seq.prefilled
        piece = seq.prompt_ids[start:start + self.chunk]
        tokens = np.zeros((1, self.chunk), np.int32)
        tokens[0, :len(piece)] = piece
        t0 = time.perf_counter()
        *result, self._cache, self._seen = self._exe["row"](
            self.model.params, self._cache, self._seen, np.int32(slot), tokens, np.int32(start),
            np.int32(len(piece)), np.bool_(start + len(piece) == len(seq.prompt_ids)),
            self._keys[slot:slot + 1], self._steps[slot:slot + 1],
            seq.row_params)
        host = [np.asarray(x) for x in result]
        self._prefilled(seq, piece)
        if not seq.prefilling:
            self._deliver([seq], host, lambda _seq: 0, time.perf_counter() - t0)

    def _decode_row(self, seq: Sequence) -> None:
        """One decode step of one slot alone (cheaper than the all-slot step while few decode)."""
        slot = seq.slot
        t0 = time.perf_counter()
        *result, self._cache, self._seen = self._exe["row1"](
            self.model.params, self._cache, self._seen, np.int32(slot), self._last_token[slot:slot + 1, None],
            np.int32(self._lengths[slot]), np.int32(1), np.bool_(True), self._keys[slot:slot + 1],
            self._steps[slot:slot + 1], seq.row_params)
        host = [np.asarray(x) for x in result]
        self._slot_ids[slot].append(int(self._last_token[slot]))
        self._lengths[slot] += 1
        self._deliver([seq], host, lambda _seq: 0, time.perf_counter() - t0)

    def _mixed_step(self, prefilling: list[Sequence], decoding: list[Sequence]) -> None:
        tokens = np.zeros((self.slots, self.chunk), np.int32)
        counts = np.zeros((self.slots,), np.int32)
        use = np.zeros((self.slots,), bool)
        pieces = {}
        for seq in prefilling:
            piece = seq.prompt_ids[seq.prefilled:seq.prefilled + self.chunk]
            tokens[seq.slot, :len(piece)] = piece
            counts[seq.slot] = len(piece)
            use[seq.slot] = seq.prefilled + len(piece) == len(seq.prompt_ids)
            pieces[seq.slot] = piece
        for seq in decoding:
            tokens[seq.slot, 0] = self._last_token[seq.slot]
            counts[seq.slot] = use[seq.slot] = 1
        t0 = time.perf_counter()
        *result, self._cache, self._seen = self._exe["mixed"](
            self.model.params, self._cache, self._seen, tokens, self._lengths, counts, use, self._keys, self._steps,
            self._row_params)
        host = [np.asarray(x) for x in result]
        for seq in decoding:
            self._slot_ids[seq.slot].append(int(self._last_token[seq.slot]))
            self._lengths[seq.slot] += 1
        for seq in prefilling:
            self._prefilled(seq, pieces[seq.slot])
        ready = decoding + [s for s in prefilling if not s.prefilling]
        self._deliver(ready, host, lambda seq: seq.slot, time.perf_counter() - t0)

    def _prefilled(self, seq: Sequence, piece: list[int]) -> None:
        seq.prefilled += len(piece)
        self._slot_ids[seq.slot].extend(piece)
        self._lengths[seq.slot] += len(piece)

    def _deliver(self, seqs: list[Sequence], host, row_of, seconds: float) -> None:
        """Hand each sequence the token sampled for it in the step just run."""
        token, logprob, top_ids, top_values = host
        now = time.perf_counter()
        for seq in seqs:
            r, slot = row_of(seq), seq.slot
            tok = int(token[r])
            self._last_token[slot] = tok
            self._steps[slot] += 1
            if seq.t_first is None:
                seq.t_first = now
                self.observer.first_token(now - seq.t_submit)
            lp = top = None
            if seq.params.logprobs:
                n = seq.params.logprobs
                lp = float(logprob[r])
                top = tuple(TopLogprob(int(i), self._token_text(int(i)), float(v))
                            for i, v in zip(top_ids[r][:n], top_values[r][:n]))
            event = seq.add_token(tok, lp, top, self.context)
            if event is not None:
                self._emit(seq, event)
            if seq.finish_reason is not None:
                self._finish(seq, seq.finish_reason)
        self.observer.tokens(len(seqs), seconds)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id) if self.tokenizer is not None else ""

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finish_reason = reason
        slot = seq.slot
        if slot is not None and self._slot_seq[slot] is seq:
            self._slot_seq[slot] = None
            self._params[slot] = _IDLE
            self._row_params = samplers.row_params(self._params)
            self._slot_used[slot] = time.perf_counter()
        self.observer.finished(reason)
        self._emit(seq, seq.done(error))


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
