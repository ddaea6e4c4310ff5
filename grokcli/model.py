"""The Grok-1 forward pass as pure JAX functions of (params, tokens, cache).

Semantics follow xAI's reference (see shared fixtures README, "The reference forward, precisely"):
sandwich RMSNorms, rotate-half RoPE, grouped-query attention with a 30*tanh(s/30) score cap,
causal + pad-key mask, an f32 router whose top-k gates are not renormalised, gelu-gated experts,
and a tied output embedding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .quant import qmatmul

RMS_EPS = 1e-5
ROPE_BASE = 10000.0
ATTN_SOFTCAP = 30.0
MASKED = -1e30  # the reference's fill value for masked attention scores


def compute_dtype_for_backend(backend: str | None = None) -> jnp.dtype:
    """Activations in bf16 where the platform computes it well, f32 on CPU (see STYLE.md)."""
    return jnp.float32 if (backend or jax.default_backend()) == "cpu" else jnp.bfloat16


class KVCache(NamedTuple):
    """Keys and values of every layer for a batch of sequences, preallocated to the context."""

    k: jax.Array  # [layers, B, context, kv_heads, key_size]
    v: jax.Array  # [layers, B, context, kv_heads, key_size]
    valid: jax.Array  # [B, context] bool: position written and not a pad token
    lengths: jax.Array  # [B] int32: positions written so far (next write position)


def init_cache(cfg: ModelConfig, batch: int, context: int, dtype=None) -> KVCache:
    """An empty cache for `batch` sequences of up to `context` tokens."""
    dtype = dtype or compute_dtype_for_backend()
    shape = (cfg.num_layers, batch, context, cfg.num_kv_heads, cfg.key_size)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, context), bool), jnp.zeros((batch,), jnp.int32))


def rms_norm(x, scale):
    """RMSNorm in f32 (eps 1e-5), result in the input's dtype."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + RMS_EPS)
    return (scale.astype(jnp.float32) * normed).astype(x.dtype)


def rope(x, positions):
    """Rotary embedding, rotate-half form. x [B, T, heads, key]; positions [B, T]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    phase = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, dim/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)


def _attention(p, x, cfg: ModelConfig, positions, keys_fn):
    """Self-attention of one layer.

    `keys_fn(k, v)` stores the new keys/values where needed and returns what to attend over:
    (keys [B, S, kv, key], values, key positions [B, S], key validity [B, S]).
    """
    b, t, _ = x.shape
    q = qmatmul(x, p["q"]).reshape(b, t, cfg.num_q_heads, cfg.key_size)
    k = qmatmul(x, p["k"]).reshape(b, t, cfg.num_kv_heads, cfg.key_size)
    v = qmatmul(x, p["v"]).reshape(b, t, cfg.num_kv_heads, cfg.key_size)
    q, k = rope(q, positions), rope(k, positions)
    keys, values, key_pos, key_valid = keys_fn(k, v)

    # [B, T, kv, group, key] x [B, S, kv, key] -> [B, kv, group, T, S]
    qg = q.reshape(b, t, cfg.num_kv_heads, cfg.q_per_kv, cfg.key_size)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    scores = scores * cfg.attn_output_multiplier
    scores = ATTN_SOFTCAP * jnp.tanh(scores / ATTN_SOFTCAP)
    mask = key_valid[:, None, None, None, :] & (key_pos[:, None, None, None, :] <= positions[:, None, None, :, None])
    scores = jnp.where(mask, scores, MASKED)
    weights = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, values.astype(x.dtype))
    return qmatmul(out.reshape(b, t, cfg.num_q_heads * cfg.key_size), p["o"])


def _moe(p, x, cfg: ModelConfig):
    """Top-k mixture of experts computing only the selected experts."""
    b, t, d = x.shape
    n, k = b * t, cfg.num_selected_experts
    xf = x.reshape(n, d)
    probs = jax.nn.softmax(xf.astype(jnp.float32) @ p["router"].astype(jnp.float32), axis=-1)
    gates, chosen = jax.lax.top_k(probs, k)  # [N, k]: gates are not renormalised
    experts = chosen.reshape(-1)  # [N*k], expert of each (token, slot) pair
    pairs = n * k

    def ffn(rows, **select):
        gate = qmatmul(rows, p["w_gate"], **select)
        up = qmatmul(rows, p["w_up"], **select)
        hidden = jax.nn.gelu(gate, approximate=True) * up
        return qmatmul(hidden, p["w_down"], **select)

    if pairs <= cfg.num_experts:
        # Few pairs (decode): fetch each pair's expert weights by index.
        out = ffn(jnp.repeat(xf, k, axis=0), experts=experts)
    else:
        # Many pairs (prefill): sort pairs by expert and run one grouped matmul per projection.
        order = jnp.argsort(experts, stable=True)
        sorted_experts = experts[order]
        group_sizes = jnp.bincount(experts, length=cfg.num_experts).astype(jnp.int32)
        out_sorted = ffn(xf[order // k], experts=sorted_experts, group_sizes=group_sizes)
        out = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    out = out.reshape(n, k, d) * gates[..., None].astype(out.dtype)
    return out.sum(axis=1).reshape(b, t, d).astype(x.dtype)


def decoder_layer(p, h, cfg: ModelConfig, positions, keys_fn):
    """One layer with the reference's sandwich norms around attention and the MoE."""
    attn = _attention(p, rms_norm(h, p["attn_norm"]), cfg, positions, keys_fn)
    h = h + rms_norm(attn, p["attn_post_norm"])
    return h + rms_norm(_moe(p, rms_norm(h, p["moe_norm"]), cfg), p["moe_post_norm"])


def embed(params, tokens, cfg: ModelConfig, dtype):
    """Input embeddings times the embedding multiplier."""
    return params["embed"][tokens].astype(dtype) * jnp.asarray(cfg.embedding_multiplier_scale, dtype)


def lm_head(params, h, cfg: ModelConfig):
    """Logits (f32) from final hidden states, with the tied embedding and the output multiplier."""
    table = params["embed"].astype(h.dtype)
    logits = jnp.einsum("...d,vd->...v", h, table, preferred_element_type=jnp.float32)
    return logits * cfg.output_multiplier_scale


def forward(params, tokens, cfg: ModelConfig, cache: KVCache | None = None, input_lengths=None,
            dtype=None, fresh_cache: bool = False):
    """Final-normed hidden states `[B, T, emb]` and the updated cache.

    Without a cache the tokens attend causally among themselves (pad tokens masked as keys).
    With a cache, row b's tokens are placed at positions `cache.lengths[b] + t`; only the first
    `input_lengths[b]` of them count (right padding), and the cache's lengths advance by that.
    `fresh_cache=True` promises the cache is empty (a prefill): attention then looks only at the
    new tokens instead of the whole preallocated context.
    """
    dtype = dtype or compute_dtype_for_backend()
    b, t = tokens.shape
    not_pad = tokens != cfg.pad_token
    rows = jnp.arange(b)[:, None]
    cache_k = cache_v = None
    if cache is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        key_valid_new = not_pad
    else:
        if input_lengths is None:
            input_lengths = jnp.full((b,), t, jnp.int32)
        positions = cache.lengths[:, None] + jnp.arange(t)[None, :]
        key_valid_new = not_pad & (jnp.arange(t)[None, :] < input_lengths[:, None])
        valid = cache.valid.at[rows, positions].set(key_valid_new, mode="drop")
        cache_k, cache_v = cache.k, cache.v
        all_pos = jnp.broadcast_to(jnp.arange(cache_k.shape[2]), (b, cache_k.shape[2]))

    h = embed(params, tokens, cfg, dtype)
    for layer, p in enumerate(params["layers"]):
        def keys_fn(k, v, layer=layer):
            nonlocal cache_k, cache_v
            if cache is None:
                return k, v, positions, key_valid_new
            # In-place (the cache is donated by the callers) write of this layer's new entries.
            cache_k = cache_k.at[layer, rows, positions].set(k.astype(cache_k.dtype), mode="drop")
            cache_v = cache_v.at[layer, rows, positions].set(v.astype(cache_v.dtype), mode="drop")
            if fresh_cache:
                return k, v, positions, key_valid_new
            return cache_k[layer], cache_v[layer], all_pos, valid

        h = decoder_layer(p, h, cfg, positions, keys_fn)
    h = rms_norm(h, params["final_norm"])
    if cache is None:
        return h, None
    return h, KVCache(cache_k, cache_v, valid, cache.lengths + input_lengths.astype(jnp.int32))


def logits(params, tokens, cfg: ModelConfig, dtype=None):
    """Full-sequence logits `[B, T, vocab]` (f32), no cache."""
    h, _ = forward(params, tokens, cfg, dtype=dtype)
    return lm_head(params, h, cfg)


def hidden_states(params, tokens, cfg: ModelConfig, dtype=None):
    """The embedding input and every layer's output `[layers + 1, B, T, emb]`, for diagnostics."""
    dtype = dtype or compute_dtype_for_backend()
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    not_pad = tokens != cfg.pad_token
    h = embed(params, tokens, cfg, dtype)
    outputs = [h]
    for p in params["layers"]:
        h = decoder_layer(p, h, cfg, positions, lambda k, v: (k, v, positions, not_pad))
        outputs.append(h)
    return jnp.stack(outputs)
