"""The compiled generation steps, their named inputs and outputs, and where those live on devices.

Two steps per request shape (see `request_shape.py`): `prefill_step` writes one chunk of every
row's prompt into the KV cache (attending over what earlier chunks, or an earlier request,
left there) and samples from each row's last token; `decode_step` feeds one token per row.
Both return a `StepOutput`, whose cache and `seen` mask feed the next step: the cache is donated
so it is updated in place. Executables are compiled ahead of time once per (model, shape) and
kept on the Model.
"""

from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import model as model_fn
from . import samplers
from .model import KVCache
from .request_shape import RequestShape

TOP_LOGPROBS = 20  # alternatives computed when any row asks for logprobs (SamplingParams allows <= 20)


class RequestInputs(NamedTuple):
    """What stays fixed for a request: per-row sampling state."""

    keys: jax.Array  # [B] PRNG keys; step s of row b draws with fold_in(keys[b], s)
    row_params: samplers.RowParams  # [B] sampling settings
    logprobs: jax.Array  # [] bool: compute log-probabilities (a value, so asking never recompiles)


class PrefillChunk(NamedTuple):
    """One prefill step's tokens: the next `prefill_chunk` prompt tokens of every row."""

    tokens: jax.Array  # [B, chunk] int32, right-padded
    lengths: jax.Array  # [B] int32: real tokens of each row in this chunk (0: nothing to add)
    start: jax.Array  # [B] int32: cache positions each row keeps; later positions are cleared


class Sampled(NamedTuple):
    """The token each row drew, and its log-probabilities (zeros unless asked for)."""

    token: jax.Array  # [B] int32
    logprob: jax.Array  # [B] f32: log-probability of `token`
    top_ids: jax.Array  # [B, TOP_LOGPROBS] int32: most likely tokens, best first
    top_values: jax.Array  # [B, TOP_LOGPROBS] f32: their log-probabilities


class StepOutput(NamedTuple):
    """What a step returns; `cache` and `seen` feed the next step."""

    sampled: Sampled
    cache: KVCache
    seen: jax.Array  # [B, vocab] bool: tokens in each row's prompt or output (repetition penalty)


# ---------------------------------------------------------------------------------------------
# The step functions (pure; compiled below).


def _sample(params, hidden, request: RequestInputs, step, seen, *, cfg) -> Sampled:
    logits = model_fn.lm_head(params, hidden, cfg)  # [B, vocab] f32
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(request.keys, step)
    token = samplers.sample(logits, step_keys, request.row_params, seen)
    batch = token.shape[0]

    def skipped():
        return (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, TOP_LOGPROBS), jnp.int32),
                jnp.zeros((batch, TOP_LOGPROBS), jnp.float32))

    logprob, top_ids, top_values = jax.lax.cond(
        request.logprobs, lambda: samplers.token_logprobs(logits, token, TOP_LOGPROBS), skipped)
    return Sampled(token, logprob, top_ids, top_values)


def _mark_seen(seen, token):
    return seen.at[jnp.arange(token.shape[0]), token].set(True)


def prefill_step(params, chunk: PrefillChunk, cache: KVCache, request: RequestInputs, seen, *, cfg,
                 dtype) -> StepOutput:
    """Write one chunk of prompt tokens after each row's first `chunk.start` cached positions.

    Every prompt ends in the last chunk of a request (rows with shorter prompts start later),
    so the last chunk's `sampled` holds each row's first new token; earlier chunks' are unused.
    """
    kept = jnp.arange(cache.valid.shape[1])[None, :] < chunk.start[:, None]
    cache = cache._replace(valid=cache.valid & kept, lengths=chunk.start)
    h, cache = model_fn.forward(params, chunk.tokens, cfg, cache, input_lengths=chunk.lengths, dtype=dtype)
    last = h[jnp.arange(h.shape[0]), jnp.maximum(chunk.lengths - 1, 0)]  # [B, emb]: each row's last token
    sampled = _sample(params, last, request, 0, seen, cfg=cfg)
    return StepOutput(sampled, cache, _mark_seen(seen, sampled.token))


def decode_step(params, token, cache: KVCache, request: RequestInputs, step, seen, *, cfg, dtype) -> StepOutput:
    """Feed one token per row (`token` [B]) and sample the next; `step` numbers the draws."""
    ones = jnp.ones(token.shape, jnp.int32)
    h, cache = model_fn.forward(params, token[:, None], cfg, cache, input_lengths=ones, dtype=dtype)
    sampled = _sample(params, h[:, 0], request, step, seen, cfg=cfg)
    return StepOutput(sampled, cache, _mark_seen(seen, sampled.token))


def _grow(cache: KVCache, *, context: int) -> KVCache:
    """The same cache in `context` positions per row (the new positions empty)."""
    pad = context - cache.valid.shape[1]

    def widen(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        return jnp.pad(x, widths)

    return KVCache(widen(cache.k, 2), widen(cache.v, 2), widen(cache.valid, 1), cache.lengths)


# ---------------------------------------------------------------------------------------------
# Placement: plain device arrays on one device, fixed layouts on a mesh (the cache never whole
# on one device; every output pinned to the layout of the input it feeds).


def _sharded(model) -> bool:
    return getattr(model, "mesh", None) is not None


def _put_batch(model, tree):
    if not _sharded(model):
        return jax.tree.map(jnp.asarray, tree)
    from .sharding import put_batch

    return put_batch(jax.tree.map(np.asarray, tree), model.mesh)


def place_chunk(model, tokens: np.ndarray, lengths: np.ndarray, start: np.ndarray) -> PrefillChunk:
    """A host chunk on the devices (batch rows along the mesh's data axis)."""
    return PrefillChunk(*_put_batch(model, (tokens, lengths, start)))


def place_request(model, keys: np.ndarray, row_params: samplers.RowParams, logprobs: bool,
                  seen: np.ndarray) -> tuple[RequestInputs, jax.Array]:
    """A request's fixed inputs and its initial `seen` mask on the devices."""
    flag = np.asarray(logprobs, bool)
    if not _sharded(model):
        return RequestInputs(jnp.asarray(keys), row_params, jnp.asarray(flag)), jnp.asarray(seen)
    from .sharding import put, replicated

    keys, row_params, seen = _put_batch(model, (keys, row_params, seen))
    return RequestInputs(keys, row_params, put(flag, replicated(model.mesh))), seen


def new_cache(model, shape: RequestShape) -> KVCache:
    """An empty KV cache for a request shape, created in its layout."""
    from .sharding import init_cache

    return init_cache(model.config, shape.batch, shape.context, model.dtype, getattr(model, "mesh", None))


def step_shardings(model, shape: RequestShape) -> StepOutput | None:
    """The layout of a step's outputs on the model's mesh (None without a mesh)."""
    if not _sharded(model):
        return None
    from .sharding import batch_part, cache_shardings, named, replicated

    rep = replicated(model.mesh)
    seen = named(model.mesh, batch_part((shape.batch, model.config.vocab_size), model.mesh))
    return StepOutput(Sampled(rep, rep, rep, rep),
                      cache_shardings(model.config, shape.batch, shape.context, model.mesh), seen)


# ---------------------------------------------------------------------------------------------
# Compilation.

# Counts of jax's own compilation events, read to tell a persistent-cache hit from a compile.
_compile_events = {"cache_hits": 0}


def _on_event(event: str, **_kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _compile_events["cache_hits"] += 1


jax.monitoring.register_event_listener(_on_event)


class Compiled(NamedTuple):
    """An executable, and how it was obtained (None when it was already in memory)."""

    executable: object
    cache_hit: bool | None  # True: loaded from the persistent compile cache; False: compiled
    seconds: float


def compiled(model, key: tuple, fn, args: tuple, donate: tuple[int, ...], out_shardings=None) -> Compiled:
    """AOT-compile `fn` for `args` once per (model, key)."""
    if key in model.compiled:
        return Compiled(model.compiled[key], None, 0.0)
    hits = _compile_events["cache_hits"]
    t0 = time.perf_counter()
    pinned = {} if out_shardings is None else {"out_shardings": out_shardings}
    executable = jax.jit(fn, donate_argnums=donate, **pinned).lower(*args).compile()
    model.compiled[key] = executable
    return Compiled(executable, _compile_events["cache_hits"] > hits, time.perf_counter() - t0)


def step_key(kind: str, shape: RequestShape) -> tuple:
    """The key of a step's executable in `Model.compiled`."""
    if kind == "prefill":
        return ("prefill", shape.batch, shape.prefill_chunk, shape.context)
    return (kind, shape.batch, shape.context)


def placeholder_token(model, shape: RequestShape):
    """A [B] token array in the layout decode steps receive (to compile the decode step)."""
    zeros = np.zeros((shape.batch,), np.int32)
    if not _sharded(model):
        return jnp.asarray(zeros)
    from .sharding import put, replicated

    return put(zeros, replicated(model.mesh))


def compile_prefill(model, shape: RequestShape, chunk: PrefillChunk, cache: KVCache, request: RequestInputs,
                    seen) -> Compiled:
    key = step_key("prefill", shape)
    fn = partial(prefill_step, cfg=model.config, dtype=model.dtype)
    return compiled(model, key, fn, (model.params, chunk, cache, request, seen), (2,), step_shardings(model, shape))


def compile_decode(model, shape: RequestShape, token, cache: KVCache, request: RequestInputs, seen) -> Compiled:
    key = step_key("decode", shape)
    fn = partial(decode_step, cfg=model.config, dtype=model.dtype)
    args = (model.params, token, cache, request, jnp.int32(0), seen)
    return compiled(model, key, fn, args, (2, 5), step_shardings(model, shape))


def grow_cache(model, cache: KVCache, shape: RequestShape) -> KVCache:
    """`cache` (same batch, fewer positions) moved into a cache of `shape.context` positions."""
    have = int(cache.valid.shape[1])
    key = ("grow", shape.batch, have, shape.context)
    out = step_shardings(model, shape)
    step = compiled(model, key, partial(_grow, context=shape.context), (cache,), (), None if out is None else out.cache)
    return step.executable(cache)


__all__ = ["TOP_LOGPROBS", "RequestInputs", "PrefillChunk", "Sampled", "StepOutput", "prefill_step", "decode_step",
           "place_chunk", "place_request", "new_cache", "step_shardings", "Compiled", "compiled",
           "compile_prefill", "compile_decode", "grow_cache", "step_key", "placeholder_token"]
