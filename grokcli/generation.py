"""Generation: prompts -> rows -> compiled steps over a KV cache -> a stream of events.

One request runs in four parts: `_size` picks its shape (batch, prefill chunk and cache size
from the fixed sets of `request_shape.py`), `_place` puts its cache and inputs on the devices
(the cache of a PromptCache when one is given, so a shared prefix is not prefilled again),
`_compile` gets the two steps of that shape (in memory, from the persistent compile cache, or
compiled), and `_loop` prefills the new prompt tokens chunk by chunk and then decodes one token
per step, each step dispatched before the previous one's tokens are read, so the device works
while the host detokenises. More prompts than one batch holds run in consecutive groups.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import samplers, steps
from .events import Completion, DoneEvent, StatusEvent, TokenEvent
from .prompt_cache import PromptCache, common_prefix
from .request_shape import MIN_CONTEXT, RequestShape, batch_groups, fit_request, free_host_memory
from .rows import Row, Times, advance, done_event, encode, fit_prompt, peak_memory_bytes, row_stats, text_state
from .sampling_params import SamplingParams, sampling_params

__all__ = ["stream_generate", "stream_generate_batch", "generate", "generate_batch", "request_shape_for",
           "peak_memory_bytes", "MIN_CONTEXT"]


def stream_generate_batch(model, tokenizer, prompts: Sequence, sampling=None, *, truncate: str | None = None,
                          continuation: bool = False, prefill_chunk: int | None = None,
                          prompt_cache: PromptCache | None = None,
                          **overrides) -> Iterator[StatusEvent | TokenEvent | DoneEvent]:
    """Generate for several prompts together; yields events whose `row` names the prompt.

    `sampling` is one SamplingParams for all prompts or a list with one per prompt; keyword
    overrides (temperature=..., max_tokens=...) apply to all. Raises ValueError /
    PromptTooLongError / MemoryPlanError before any work when a parameter, a prompt or the
    memory is not enough; more prompts than one batch holds run in consecutive groups.

    `prefill_chunk`: prompt tokens per prefill step (default 512; one compiled prefill serves
    every prompt length). `prompt_cache`: a PromptCache whose cached KV is reused for the prefix
    the prompts share with its last request, and which keeps this request's KV afterwards.

    Text deltas concatenate to `tokenizer.decode(generated_ids)`. With `continuation=True` they
    are the text that continues the prompt instead: a leading space that `decode` drops at the
    start of a text is kept, so `prompt + text` reads right (what the CLI and the REPL print).
    """
    cfg = model.config
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts; use stream_generate() for a single prompt")
    if not prompts:
        raise ValueError("no prompts given")
    if truncate not in (None, "left"):
        raise ValueError(f"truncate must be None or 'left', got {truncate!r}")
    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise TypeError(f"prompt_cache must be a grokcli.PromptCache, got {type(prompt_cache).__name__}")
    per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(per_row) != len(prompts):
        raise ValueError(f"{len(per_row)} sampling settings for {len(prompts)} prompts")
    params = [sampling_params(p, **overrides) for p in per_row]
    notes, rows = [], []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ids, note = fit_prompt(encode(tokenizer, prompt, cfg.vocab_size), cfg.sequence_len, p.max_tokens, truncate)
        if note:
            notes.append(f"prompt {i}: {note}" if len(prompts) > 1 else note)
        rows.append(Row(i, ids, p, tokenizer, *text_state(tokenizer, p, continuation)))
    if prompt_cache is not None:
        prompt_cache.check_prompts([r.prompt_ids for r in rows])
    group = request_shape_for(model, [len(r.prompt_ids) for r in rows], max(p.max_tokens for p in params),
                              prefill_chunk=prefill_chunk)
    return _generate(model, rows, notes, group, prompt_cache)


def request_shape_for(model, prompt_lengths: Sequence[int], max_tokens: int | None, *,
                      prefill_chunk: int | None = None, min_context: int = 0) -> RequestShape:
    """The shape a request for these prompts runs in on this model's devices (see fit_request).

    Its `batch` is the group size: more prompts run in consecutive groups. Raises
    MemoryPlanError when the KV cache and activations of even one prompt do not fit.
    """
    device = None
    try:
        from .memory import detected_device_memory

        device = detected_device_memory()
    except Exception:  # noqa: BLE001 - no device statistics: check host memory only
        device = None
    on_cpu = jax.default_backend() == "cpu"
    mesh = getattr(model, "mesh", None)
    mesh_shape = (1, 1) if mesh is None else (int(mesh.shape["data"]), int(mesh.shape["model"]))
    return fit_request(model.config, rows=len(prompt_lengths), prompt_tokens=max(prompt_lengths),
                       max_tokens=max_tokens, prefill_chunk=prefill_chunk, min_context=min_context, mesh=mesh_shape,
                       dtype=np.dtype(model.dtype).name,
                       device_memory=device, free_memory=free_host_memory() if on_cpu and device is None else None)


def stream_generate(model, tokenizer, prompt, sampling: SamplingParams | None = None, *,
                    truncate: str | None = None, continuation: bool = False, prefill_chunk: int | None = None,
                    prompt_cache: PromptCache | None = None,
                    **overrides) -> Iterator[StatusEvent | TokenEvent | DoneEvent]:
    """Generate for one prompt (text or token ids), yielding status, token and done events.

    `prompt_cache` (a PromptCache) reuses the KV of the prefix this prompt shares with the cache's
    last request: a REPL passes the same one every turn and prefills only the turn's new text.
    """
    return stream_generate_batch(model, tokenizer, [prompt], sampling, truncate=truncate,
                                 continuation=continuation, prefill_chunk=prefill_chunk,
                                 prompt_cache=prompt_cache, **overrides)


def _generate(model, rows: list[Row], notes: list[str], group: RequestShape, prompt_cache):
    for note in notes:
        yield StatusEvent("truncated", note)
    groups = batch_groups(len(rows), group.batch)
    for n, indices in enumerate(groups):
        members = [rows[i] for i in indices]
        interrupted = yield from _run(model, members, group.prefill_chunk, prompt_cache)
        if interrupted:
            for r in (rows[i] for later in groups[n + 1:] for i in later):
                r.finish_reason = "interrupted"
                yield done_event(r, row_stats(r, Times(time.perf_counter())))
            return


# ---------------------------------------------------------------------------------------------
# One group of rows: size, place, compile, loop.


class _Placed(NamedTuple):
    """A request's inputs on the devices."""

    cache: object  # model.KVCache
    request: steps.RequestInputs
    seen: jax.Array


def _size(model, rows: list[Row], prefill_chunk: int | None, entry, reserved: int) -> RequestShape:
    """The request's shape; a cached entry's cache size (or a reserved one) is kept when larger."""
    keep = max(_entry_context(entry) if entry is not None else 0, reserved)
    return request_shape_for(model, [len(r.prompt_ids) for r in rows], max(r.params.max_tokens for r in rows),
                             prefill_chunk=prefill_chunk, min_context=keep)


def _entry_context(entry) -> int:
    """Positions per row of a prompt cache entry (a file's: its tokens and one more)."""
    if entry.cache is not None:
        return int(entry.cache.valid.shape[1])
    return len(entry.ids[0]) + 1


def _take_cache(model, shape: RequestShape, rows: list[Row], entry):
    """The KV cache for the request: the entry's (its reusable prefix per row) or a new one."""
    if entry is not None and entry.host is not None:
        entry = _placed_entry(model, shape, entry)
    usable = (entry is not None and entry.cache is not None and int(entry.cache.valid.shape[0]) == shape.batch
              and int(entry.cache.valid.shape[1]) <= shape.context)
    if not usable:
        del entry  # free the old cache before allocating the new one
        return steps.new_cache(model, shape)
    for r in rows:
        if r.slot < len(entry.ids):
            # At least the last prompt token is computed again: its logits give the first new token.
            r.cached = min(common_prefix(entry.ids[r.slot], r.prompt_ids), len(r.prompt_ids) - 1)
    cache = entry.cache
    if int(cache.valid.shape[1]) < shape.context:
        cache = steps.grow_cache(model, cache, shape)
    return cache


def _placed_entry(model, shape: RequestShape, entry):
    """An entry read from a file, put into a cache of the request's shape (its first row)."""
    from .model import KVCache

    k, v = entry.host
    n = k.shape[1]
    full = (model.config.num_layers, shape.batch, shape.context, model.config.num_kv_heads, model.config.key_size)
    host_k, host_v = np.zeros(full, k.dtype), np.zeros(full, v.dtype)
    host_k[:, 0, :n], host_v[:, 0, :n] = k, v
    valid = np.zeros((shape.batch, shape.context), bool)
    valid[0, :n] = np.asarray(entry.ids[0]) != model.config.pad_token
    lengths = np.zeros((shape.batch,), np.int32)
    lengths[0] = n
    arrays = KVCache(host_k, host_v, valid, lengths)
    if getattr(model, "mesh", None) is None:
        cache = KVCache(*(jnp.asarray(a) for a in arrays))
    else:
        from .sharding import cache_shardings, put

        layout = cache_shardings(model.config, shape.batch, shape.context, model.mesh)
        cache = KVCache(*(put(a, s) for a, s in zip(arrays, layout)))
    return dataclasses.replace(entry, cache=cache, host=None)


def _place(model, shape: RequestShape, rows: list[Row], cache) -> _Placed:
    """Sampling state of every row (padded rows draw greedily and are never read)."""
    cfg = model.config
    idle = SamplingParams(temperature=0)
    params = [idle] * shape.batch
    seen = np.zeros((shape.batch, cfg.vocab_size), bool)
    keys = [jax.random.PRNGKey(0)] * shape.batch
    for r in rows:
        params[r.slot] = r.params
        seen[r.slot, r.prompt_ids] = True
        keys[r.slot] = jax.random.fold_in(jax.random.PRNGKey(r.params.seed), r.index)
    logprobs = any(r.params.logprobs for r in rows)
    request, seen_dev = steps.place_request(model, np.asarray(jnp.stack(keys)), samplers.row_params(params),
                                            logprobs, seen)
    return _Placed(cache, request, seen_dev)


def _chunks(model, shape: RequestShape, rows: list[Row]) -> list[steps.PrefillChunk]:
    """Each row's uncached prompt tokens in prefill chunks, aligned so every prompt ends in the last."""
    c = shape.prefill_chunk
    todo = {r.slot: r.prompt_ids[r.cached:] for r in rows}
    count = max(shape.prefill_steps(len(ids)) for ids in todo.values())
    out = []
    for k in range(count):
        tokens = np.full((shape.batch, c), model.config.pad_token, np.int32)
        lengths = np.zeros((shape.batch,), np.int32)
        start = np.zeros((shape.batch,), np.int32)
        for r in rows:
            ids = todo[r.slot]
            j = k - (count - shape.prefill_steps(len(ids)))  # this row's own chunk number
            piece = ids[j * c:(j + 1) * c] if j >= 0 else []
            tokens[r.slot, :len(piece)] = piece
            lengths[r.slot] = len(piece)
            start[r.slot] = r.cached + max(j, 0) * c
        out.append(steps.place_chunk(model, tokens, lengths, start))
    return out


def _compile(model, shape: RequestShape, chunk, placed: _Placed):
    """The prefill and decode executables of the shape; yields status events when not in memory."""
    first = steps.placeholder_token(model, shape)
    out = {}
    for kind, make in (
            ("prefill", lambda: steps.compile_prefill(model, shape, chunk, placed.cache, placed.request, placed.seen)),
            ("decode", lambda: steps.compile_decode(model, shape, first, placed.cache, placed.request, placed.seen))):
        if steps.step_key(kind, shape) not in model.compiled:
            yield _preparing(kind, shape)
        result = make()
        if result.cache_hit is not None:
            yield StatusEvent("compiled", f"{kind}: {_compiled_message(result.cache_hit)}", cache_hit=result.cache_hit,
                              seconds=result.seconds)
        out[kind] = result.executable
    return out["prefill"], out["decode"]


def _preparing(kind: str, shape: RequestShape) -> StatusEvent:
    what = f"{kind} for batch {shape.batch}, context {shape.context}"
    if _compile_cache_on():
        # Whether this loads from the persistent cache or compiles is known only afterwards.
        return StatusEvent("preparing", f"preparing {what}")
    return StatusEvent("compiling", f"compiling {what}")


def _compile_cache_on() -> bool:
    return bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)


def _compiled_message(cache_hit: bool) -> str:
    if cache_hit:
        return "loaded compiled code"
    return "compiled (first run, cached for next time)" if _compile_cache_on() else "compiled (compile cache off)"


def _run(model, rows: list[Row], prefill_chunk: int | None, prompt_cache):
    """Generate for one group of rows; yields events, returns True when interrupted."""
    times = Times(time.perf_counter())
    for slot, r in enumerate(rows):
        r.slot = slot
    entry = prompt_cache.take(model) if prompt_cache is not None else None
    reserved = (prompt_cache.context or 0) if prompt_cache is not None else 0
    shape = _size(model, rows, prefill_chunk, entry, reserved)
    cache = _take_cache(model, shape, rows, entry)
    del entry
    placed = _place(model, shape, rows, cache)
    chunks = _chunks(model, shape, rows)
    state = _CacheState(placed.cache, shape, rows)
    try:
        prefill, decode = yield from _compile(model, shape, chunks[0], placed)
        return (yield from _loop(model, shape, rows, placed, chunks, prefill, decode, state, times))
    finally:
        if prompt_cache is not None:
            state.store(model, prompt_cache)


class _CacheState:
    """The newest KV cache of a request and the token ids each row has written into it."""

    def __init__(self, cache, shape: RequestShape, rows: list[Row]):
        self.cache = cache
        self.rows = rows
        self.fed: list[jax.Array] = []  # [B] token arrays fed to decode steps, in order

    def store(self, model, prompt_cache: PromptCache) -> None:
        if self.cache is None or self.cache.k.is_deleted():
            return  # a step failed after the cache was donated: nothing to keep
        fed = np.stack([np.asarray(t) for t in self.fed], axis=1) if self.fed else None
        ids, prompts = [], []
        for r in self.rows:
            ids.append(list(r.prompt_ids) + ([] if fed is None else fed[r.slot].tolist()))
            prompts.append(len(r.prompt_ids))
        prompt_cache.store(model, self.cache, ids, prompts)


def _loop(model, shape: RequestShape, rows: list[Row], placed: _Placed, chunks, prefill, decode,
          state: _CacheState, times: Times):
    cfg = model.config
    cached = sum(r.cached for r in rows)
    times.prefilled = sum(len(r.prompt_ids) - r.cached for r in rows)
    yield StatusEvent("prefill", f"prefilling {times.prefilled} prompt tokens"
                      + (f" ({cached} reused from the prompt cache)" if cached else ""))
    times.prefill = time.perf_counter()
    active = list(rows)
    try:
        for chunk in chunks:
            out = prefill(model.params, chunk, state.cache, placed.request, placed.seen)
            state.cache = out.cache
        step = 0
        while True:
            sampled, cache, seen = out
            step += 1
            # Dispatch the next step before reading this one (the cache is donated: `out` is
            # replaced, never reused).
            if any(len(r.token_ids) + 1 < min(r.params.max_tokens, shape.context - len(r.prompt_ids) + 1)
                   for r in active):
                out = decode(model.params, sampled.token, cache, placed.request, jnp.int32(step), seen)
                state.cache = out.cache
                state.fed.append(sampled.token)
            else:
                out = None
            token_host = np.asarray(sampled.token)
            if times.first is None:
                times.first = time.perf_counter()
            lp_host = None
            if any(r.params.logprobs for r in active):
                lp_host = (np.asarray(sampled.logprob), np.asarray(sampled.top_ids), np.asarray(sampled.top_values))
            for r in list(active):
                event = advance(r, int(token_host[r.slot]), lp_host, cfg, shape.context)
                if event is not None:
                    yield event
                if r.finish_reason is not None:
                    active.remove(r)
                    yield done_event(r, row_stats(r, times))
            if not active or out is None:
                for r in active:  # defensive: advance finishes every row before `out` runs dry
                    r.finish_reason = "length"
                    yield done_event(r, row_stats(r, times))
                return False
    except KeyboardInterrupt:
        for r in active:
            r.finish_reason = "interrupted"
            yield done_event(r, row_stats(r, times))
        return True


def _completion(prompt, done: DoneEvent, row: list[TokenEvent]) -> Completion:
    logprobs = tuple(e.logprob for e in row if e.logprob is not None) or None
    tops = tuple(e.top_logprobs for e in row if e.top_logprobs is not None) or None
    return Completion(prompt if isinstance(prompt, str) else None, done.text, done.token_ids,
                      done.finish_reason, done.stats, logprobs, tops)


def generate_batch(model, tokenizer, prompts: Sequence, sampling=None, *, truncate: str | None = None,
                   continuation: bool = False, prefill_chunk: int | None = None,
                   prompt_cache: PromptCache | None = None, **overrides) -> list[Completion]:
    """Finished completions for several prompts, generated together, in prompt order."""
    tokens: dict[int, list[TokenEvent]] = {i: [] for i in range(len(prompts))}
    done: dict[int, DoneEvent] = {}
    for event in stream_generate_batch(model, tokenizer, prompts, sampling, truncate=truncate,
                                       continuation=continuation, prefill_chunk=prefill_chunk,
                                       prompt_cache=prompt_cache, **overrides):
        if isinstance(event, TokenEvent):
            tokens[event.row].append(event)
        elif isinstance(event, DoneEvent):
            done[event.row] = event
    return [_completion(p, done[i], tokens[i]) for i, p in enumerate(prompts)]


def generate(model, tokenizer, prompt, sampling: SamplingParams | None = None, *, truncate: str | None = None,
             continuation: bool = False, prefill_chunk: int | None = None, prompt_cache: PromptCache | None = None,
             **overrides) -> Completion:
    """The finished completion of one prompt (`text`, `token_ids`, `finish_reason`, `stats`)."""
    return generate_batch(model, tokenizer, [prompt], sampling, truncate=truncate, continuation=continuation,
                          prefill_chunk=prefill_chunk, prompt_cache=prompt_cache, **overrides)[0]
