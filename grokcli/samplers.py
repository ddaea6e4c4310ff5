"""Small stateless samplers on device: (logits, key, per-row parameters) -> token.

Every parameter is a per-row array so that one compiled step serves any mix of settings in a
batch and changing a setting never recompiles. Order, as in llama.cpp and transformers:
repetition penalty, temperature, top-k, top-p, min-p, then a categorical draw (or argmax).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .sampling_params import SamplingParams

FILTERED = -1e10  # the reference's fill value for filtered-out logits


class RowParams(NamedTuple):
    """SamplingParams of each batch row as device arrays."""

    temperature: jax.Array  # [B] f32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] f32, 1 = off
    min_p: jax.Array  # [B] f32, 0 = off
    repetition_penalty: jax.Array  # [B] f32, 1 = off


def row_params(params: Sequence[SamplingParams]) -> RowParams:
    """Stack per-row sampling parameters into arrays."""
    return RowParams(
        temperature=jnp.asarray(np.array([p.temperature for p in params], np.float32)),
        top_k=jnp.asarray(np.array([p.top_k for p in params], np.int32)),
        top_p=jnp.asarray(np.array([p.top_p for p in params], np.float32)),
        min_p=jnp.asarray(np.array([p.min_p for p in params], np.float32)),
        repetition_penalty=jnp.asarray(np.array([p.repetition_penalty for p in params], np.float32)),
    )


def apply_repetition_penalty(logits, seen, penalty):
    """Tokens already seen: positive logits divided by the penalty, negative ones multiplied."""
    p = penalty[:, None]
    penalised = jnp.where(logits > 0, logits / p, logits * p)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits, k):
    """Keep the k largest logits of each row (k = 0 keeps all)."""
    vocab = logits.shape[-1]
    k = jnp.where(k <= 0, vocab, jnp.minimum(k, vocab))
    descending = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
    return jnp.where(logits >= kth, logits, FILTERED)


def top_p_filter(logits, top_p):
    """The reference's nucleus filter: keep the largest logits whose probabilities reach top_p."""
    ascending = jnp.sort(logits, axis=-1)
    probs = jax.nn.softmax(ascending, axis=-1)
    threshold_idx = jnp.argmax(jnp.cumsum(probs, axis=-1) >= 1 - top_p[:, None], axis=-1)
    threshold = jnp.take_along_axis(ascending, threshold_idx[:, None], axis=-1)
    keep = (logits >= threshold) | (top_p[:, None] >= 1.0)
    return jnp.where(keep, logits, FILTERED)


def min_p_filter(logits, min_p):
    """Drop tokens whose probability is below min_p times the most likely token's."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    cutoff = jnp.max(log_probs, axis=-1, keepdims=True) + jnp.log(jnp.maximum(min_p[:, None], 1e-30))
    keep = (log_probs >= cutoff) | (min_p[:, None] <= 0)
    return jnp.where(keep, logits, FILTERED)


def sample(logits, keys, params: RowParams, seen):
    """Next token of each row. logits [B, V] f32; keys [B] PRNG keys; seen [B, V] bool."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, params.repetition_penalty)
    greedy = params.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, params.temperature)[:, None]

    def filtered(x):
        return min_p_filter(top_p_filter(top_k_filter(x, params.top_k), params.top_p), params.min_p)

    any_filter = jnp.any((params.top_k > 0) | (params.top_p < 1) | (params.min_p > 0))
    scaled = jax.lax.cond(any_filter, filtered, lambda x: x, scaled)
    # Drawing costs a random number per vocabulary entry (~1 ms per row at vocab 32768 on CPU):
    # skipped when every row is greedy.
    drawn = jax.lax.cond(
        jnp.any(~greedy),
        lambda x: jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, x).astype(jnp.int32),
        lambda x: jnp.zeros(x.shape[:1], jnp.int32), scaled)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


def token_logprobs(logits, tokens, top_n: int):
    """Log-probability of the chosen tokens under the model, and the top_n alternatives."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(log_probs, max(top_n, 1))
    return chosen, top_ids, top_values
