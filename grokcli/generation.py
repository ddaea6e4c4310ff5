"""Generation in three layers: compiled prefill/decode steps -> a token loop -> events.

The KV cache is preallocated per request batch; prompts are right-padded to a power-of-two
length bucket, and the cache to a power-of-two context, so that new prompt lengths reuse
compiled code. Each step's compiled executable is kept on the Model and reused; the decode
step donates the cache so it is updated in place.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import model as model_fn
from . import samplers
from .errors import PromptError, PromptTooLongError
from .events import Completion, DoneEvent, GenerationStats, StatusEvent, TokenEvent, TopLogprob
from .sampling import SamplingParams, sampling_params

MIN_BUCKET = 16  # smallest prompt bucket
MIN_CONTEXT = 512  # smallest cache: short requests of any length then share one compiled decode step

# Counts of jax's own compilation events, read to tell a persistent-cache hit from a compile.
_compile_events = {"cache_hits": 0, "backend_compiles": 0}


def _on_event(event: str, **_kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _compile_events["cache_hits"] += 1


def _on_duration(event: str, duration: float, **_kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compile_events["backend_compiles"] += 1


jax.monitoring.register_event_listener(_on_event)
jax.monitoring.register_event_duration_secs_listener(_on_duration)


def length_bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n (at least MIN_BUCKET), capped at `cap`."""
    bucket = MIN_BUCKET
    while bucket < n:
        bucket *= 2
    return min(bucket, cap)


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first local device, or the process's peak RSS on CPU."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# ---------------------------------------------------------------------------------------------
# Layer 1: the jitted steps.


def _prefill_step(params, tokens, lengths, cache, keys, row_params, seen, *, cfg, dtype, top_n):
    h, cache = model_fn.forward(params, tokens, cfg, cache, input_lengths=lengths, dtype=dtype,
                                fresh_cache=True)
    last = h[jnp.arange(tokens.shape[0]), lengths - 1]  # [B, emb]: each row's last real token
    return _sample_step(params, last, cache, keys, 0, row_params, seen, cfg=cfg, top_n=top_n)


def _decode_step(params, tokens, cache, keys, step, row_params, seen, *, cfg, dtype, top_n):
    ones = jnp.ones(tokens.shape[:1], jnp.int32)
    h, cache = model_fn.forward(params, tokens[:, None], cfg, cache, input_lengths=ones, dtype=dtype)
    return _sample_step(params, h[:, 0], cache, keys, step, row_params, seen, cfg=cfg, top_n=top_n)


def _sample_step(params, hidden, cache, keys, step, row_params, seen, *, cfg, top_n):
    logits = model_fn.lm_head(params, hidden, cfg)  # [B, vocab] f32
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    token = samplers.sample(logits, step_keys, row_params, seen)
    seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    if top_n:
        logprob, top_ids, top_values = samplers.token_logprobs(logits, token, top_n)
    else:
        logprob = top_ids = top_values = None
    return token, logprob, top_ids, top_values, cache, seen


def _compile(model, key, fn, args, donate, out_shardings=None):
    """AOT-compile `fn` for `args` once per (model, key); returns (executable, cache_hit or None)."""
    if key in model.compiled:
        return model.compiled[key], None
    hits = _compile_events["cache_hits"]
    pinned = {} if out_shardings is None else {"out_shardings": out_shardings}  # sharded: outputs feed inputs
    jitted = jax.jit(fn, donate_argnums=donate, **pinned)
    executable = jitted.lower(*args).compile()
    model.compiled[key] = executable
    return executable, _compile_events["cache_hits"] > hits


# ---------------------------------------------------------------------------------------------
# Layer 2: the token loop, and layer 3: events.


@dataclasses.dataclass
class _Row:
    """Host-side state of one prompt in a batch."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: object | None
    detok: object | None
    stopper: object | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


def _encode(tokenizer, prompt, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise PromptError("a text prompt needs a tokenizer (or pass a list of token ids)")
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if not ids:
        raise PromptError("the prompt is empty: give at least one token")
    return ids


def _fit_prompt(ids: list[int], context: int, max_tokens: int, truncate: str | None):
    """The prompt ids that fit the context (with room for one new token), and a note if cut."""
    if len(ids) + 1 <= context:
        return ids, None
    if truncate != "left":
        raise PromptTooLongError(
            f"prompt is {len(ids)} tokens but the context holds {context} (prompt + at least 1 new token); "
            f"shorten it or pass truncate='left' (--truncate left)")
    keep = max(context - max_tokens, context // 2, 1)
    return ids[-keep:], f"prompt truncated on the left from {len(ids)} to {keep} tokens to fit the {context}-token context"


def stream_generate_batch(model, tokenizer, prompts: Sequence, sampling=None, *, truncate: str | None = None,
                          continuation: bool = False, **overrides) -> Iterator[StatusEvent | TokenEvent | DoneEvent]:
    """Generate for several prompts together; yields events whose `row` names the prompt.

    `sampling` is one SamplingParams for all prompts or a list with one per prompt; keyword
    overrides (temperature=..., max_tokens=...) apply to all. Raises ValueError /
    PromptTooLongError before any work when a parameter or a prompt is unusable.

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
    per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(per_row) != len(prompts):
        raise ValueError(f"{len(per_row)} sampling settings for {len(prompts)} prompts")
    params = [sampling_params(p, **overrides) for p in per_row]
    notes, rows = [], []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ids, note = _fit_prompt(_encode(tokenizer, prompt, cfg.vocab_size), cfg.sequence_len, p.max_tokens, truncate)
        if note:
            notes.append(f"prompt {i}: {note}" if len(prompts) > 1 else note)
        rows.append(_Row(i, ids, p, tokenizer, *_text_state(tokenizer, p, continuation)))
    return _run(model, rows, notes)


def _text_state(tokenizer, params: SamplingParams, continuation: bool):
    if tokenizer is None:
        return None, None
    from .stops import StopMatcher
    from .tokenizer import IncrementalDetokenizer

    return IncrementalDetokenizer(tokenizer, continuation), StopMatcher(list(params.stop))


def stream_generate(model, tokenizer, prompt, sampling: SamplingParams | None = None, *,
                    truncate: str | None = None, continuation: bool = False,
                    **overrides) -> Iterator[StatusEvent | TokenEvent | DoneEvent]:
    """Generate for one prompt (text or token ids), yielding status, token and done events."""
    return stream_generate_batch(model, tokenizer, [prompt], sampling, truncate=truncate,
                                 continuation=continuation, **overrides)


def _run(model, rows: list[_Row], notes: list[str]):
    cfg = model.config
    batch = len(rows)
    t_start = time.perf_counter()
    for note in notes:
        yield StatusEvent("truncated", note)
    longest = max(len(r.prompt_ids) for r in rows)
    prompt_bucket = length_bucket(longest, cfg.sequence_len)
    needed = prompt_bucket + max(r.params.max_tokens for r in rows)
    context = length_bucket(max(needed, MIN_CONTEXT), cfg.sequence_len)
    top_n = max(r.params.logprobs for r in rows)

    tokens = np.full((batch, prompt_bucket), cfg.pad_token, np.int32)
    seen = np.zeros((batch, cfg.vocab_size), bool)
    for r in rows:
        tokens[r.index, :len(r.prompt_ids)] = r.prompt_ids
        seen[r.index, r.prompt_ids] = True
    lengths = np.array([len(r.prompt_ids) for r in rows], np.int32)
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(r.params.seed), r.index) for r in rows])
    row_params = samplers.row_params([r.params for r in rows])
    if getattr(model, "mesh", None) is not None:
        from .sharding import step_inputs  # fixed layouts on the mesh; the cache never whole on a device

        placed = step_inputs(cfg, model.mesh, model.dtype, context, tokens=tokens, lengths=lengths, seen=seen,
                             keys=keys, row_params=row_params)
        cache, tokens_dev, lengths_dev, seen_dev, keys, row_params, first_token, out_shardings = (
            placed[k] for k in ("cache", "tokens", "lengths", "seen", "keys", "row_params", "first_token",
                                "out_shardings"))
    else:
        cache = model_fn.init_cache(cfg, batch, context, model.dtype)
        seen_dev, tokens_dev, lengths_dev = jnp.asarray(seen), jnp.asarray(tokens), jnp.asarray(lengths)
        first_token, out_shardings = jnp.zeros((batch,), jnp.int32), None

    common = dict(cfg=cfg, dtype=model.dtype, top_n=top_n)
    prefill_args = (model.params, tokens_dev, lengths_dev, cache, keys, row_params, seen_dev)
    decode_args = (model.params, first_token, cache, keys, jnp.int32(0), row_params, seen_dev)
    steps = {}
    for kind, fn, args, donate in (("prefill", _prefill_step, prefill_args, (3, 6)),
                                   ("decode", _decode_step, decode_args, (2, 6))):
        key = (kind, batch, prompt_bucket if kind == "prefill" else 0, context, top_n)
        if key not in model.compiled:
            yield StatusEvent("compiling", f"compiling {kind} for batch {batch}, context {context}")
            t0 = time.perf_counter()
            steps[kind], hit = _compile(model, key, partial(fn, **common), args, donate, out_shardings)
            cached = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
            message = ("loaded compiled code" if hit else "compiled (first run, cached for next time)" if cached
                       else "compiled (compile cache off)")
            yield StatusEvent("compiled", f"{kind}: {message}", cache_hit=hit, seconds=time.perf_counter() - t0)
        else:
            steps[kind] = model.compiled[key]
    del decode_args

    yield StatusEvent("prefill", f"prefilling {int(lengths.sum())} prompt tokens")
    t_prefill = time.perf_counter()
    out = steps["prefill"](*prefill_args)
    del prefill_args, cache
    t_first = None
    active = list(rows)
    step = 0
    try:
        while True:
            token, logprob, top_ids, top_values, cache, seen_dev = out
            step += 1
            # Dispatch the next step before reading this one, so the device works while the
            # host detokenises (the cache is donated: `out` is replaced, never reused).
            if any(len(r.token_ids) + 1 < min(r.params.max_tokens, context - len(r.prompt_ids) + 1) for r in active):
                out = steps["decode"](model.params, token, cache, keys, jnp.int32(step), row_params, seen_dev)
            else:
                out = None
            token_host = np.asarray(token)
            if t_first is None:
                t_first = time.perf_counter()
            lp_host = None if logprob is None else (np.asarray(logprob), np.asarray(top_ids), np.asarray(top_values))
            for r in list(active):
                event = _advance(r, int(token_host[r.index]), lp_host, cfg, context)
                if event is not None:
                    yield event
                if r.finish_reason is not None:
                    active.remove(r)
                    yield _done(r, _stats(r, t_start, t_prefill, t_first, lengths))
            if not active or out is None:
                for r in active:  # defensive: _advance finishes every row before `out` runs dry
                    r.finish_reason = "length"
                    yield _done(r, _stats(r, t_start, t_prefill, t_first, lengths))
                return
    except KeyboardInterrupt:
        for r in active:
            r.finish_reason = "interrupted"
            yield _done(r, _stats(r, t_start, t_prefill, t_first or time.perf_counter(), lengths))


def _advance(r: _Row, token: int, lp_host, cfg, context: int) -> TokenEvent | None:
    """Add one sampled token to a row; sets its finish_reason when it is done."""
    if token == cfg.eos_token and not r.params.ignore_eos:
        r.finish_reason = "eos"
        return None
    r.token_ids.append(token)
    logprob = top = None
    if lp_host is not None and r.params.logprobs:
        logprob = float(lp_host[0][r.index])
        ids, values = lp_host[1][r.index][: r.params.logprobs], lp_host[2][r.index][: r.params.logprobs]
        top = tuple(TopLogprob(int(i), r.tokenizer.token_text(int(i)) if r.tokenizer else "", float(v))
                    for i, v in zip(ids, values))
    delta = ""
    if r.detok is not None:
        delta, stopped = r.stopper.feed(r.detok.push(token))
        if stopped:
            r.finish_reason = "stop"
    if r.finish_reason is None:
        if len(r.token_ids) >= r.params.max_tokens or len(r.prompt_ids) + len(r.token_ids) >= context:
            r.finish_reason = "length"
    if r.finish_reason == "length" and r.detok is not None:
        delta += _finish_text(r)
    r.text.append(delta)
    return TokenEvent(r.index, token, delta, logprob, top)


def _finish_text(r: _Row) -> str:
    """Text still held by the detokenizer and the stop matcher when a row ends."""
    tail, stopped = r.stopper.feed(r.detok.flush())
    if not stopped:
        tail += r.stopper.flush()  # may still complete an overlapping stop string
    if r.stopper.stopped and r.finish_reason in ("length", "eos"):
        r.finish_reason = "stop"  # the released text completed a stop string
    return tail


def _done(r: _Row, stats: GenerationStats) -> DoneEvent:
    final_delta = ""
    if r.finish_reason != "stop" and r.detok is not None:
        final_delta = _finish_text(r)  # "" when _advance already flushed at "length"
        r.text.append(final_delta)
    return DoneEvent(r.index, r.finish_reason, "".join(r.text), tuple(r.token_ids), stats, final_delta)


def _stats(r: _Row, t_start, t_prefill, t_first, lengths) -> GenerationStats:
    now = time.perf_counter()
    prefill_s = max(t_first - t_prefill, 1e-9)
    decode_s = now - t_first
    n = len(r.token_ids)
    return GenerationStats(
        prompt_tokens=len(r.prompt_ids),
        generated_tokens=n,
        time_to_first_token_s=t_first - t_start,
        prefill_tokens_per_s=float(lengths.sum()) / prefill_s,
        decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        total_s=now - t_start,
        peak_memory_bytes=peak_memory_bytes(),
    )


def _completion(prompt, done: DoneEvent, row: list[TokenEvent]) -> Completion:
    logprobs = tuple(e.logprob for e in row if e.logprob is not None) or None
    tops = tuple(e.top_logprobs for e in row if e.top_logprobs is not None) or None
    return Completion(prompt if isinstance(prompt, str) else None, done.text, done.token_ids,
                      done.finish_reason, done.stats, logprobs, tops)


def generate_batch(model, tokenizer, prompts: Sequence, sampling=None, *, truncate: str | None = None,
                   continuation: bool = False, **overrides) -> list[Completion]:
    """Finished completions for several prompts, generated together, in prompt order."""
    tokens: dict[int, list[TokenEvent]] = {i: [] for i in range(len(prompts))}
    done: dict[int, DoneEvent] = {}
    for event in stream_generate_batch(model, tokenizer, prompts, sampling, truncate=truncate,
                                       continuation=continuation, **overrides):
        if isinstance(event, TokenEvent):
            tokens[event.row].append(event)
        elif isinstance(event, DoneEvent):
            done[event.row] = event
    return [_completion(p, done[i], tokens[i]) for i, p in enumerate(prompts)]


def generate(model, tokenizer, prompt, sampling: SamplingParams | None = None, *, truncate: str | None = None,
             continuation: bool = False, **overrides) -> Completion:
    """The finished completion of one prompt (`text`, `token_ids`, `finish_reason`, `stats`)."""
    return generate_batch(model, tokenizer, [prompt], sampling, truncate=truncate, continuation=continuation,
                          **overrides)[0]
