"""An independent float32 numpy implementation of the Grok-1 forward, written from the reference's
description (shared fixtures README, "The reference forward, precisely"), used as a test oracle.

It deliberately shares no code with grokcli.model: per-token loops over experts, explicit head
loops, dequantised weights.
"""

from __future__ import annotations

import math

import numpy as np


def dequant(w) -> np.ndarray:
    """Dense f32 matrix of a plain array or anything with .weight/.scales (row blocks)."""
    if not hasattr(w, "weight"):
        return np.asarray(w, np.float32)
    q = np.asarray(w.weight).astype(np.float32)
    s = np.asarray(w.scales).astype(np.float32)
    blocks = s.shape[-2]
    rows = q.shape[-2] // blocks
    s_full = np.repeat(s, rows, axis=-2)  # each scale row covers `rows` input rows
    return q * s_full


def rms_norm(x, scale, eps=1e-5):
    x = x.astype(np.float32)
    return scale.astype(np.float32) * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope(x, positions, base=10000.0):
    """x [T, H, D]; rotate-half."""
    d = x.shape[-1]
    half = d // 2
    out = np.empty_like(x)
    for t, pos in enumerate(positions):
        for i in range(half):
            theta = pos / (base ** (2 * i / d))
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[t, :, i], x[t, :, i + half]
            out[t, :, i] = a * c - b * s
            out[t, :, i + half] = b * c + a * s
    return out


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def forward_row(params, tokens, cfg) -> np.ndarray:
    """Logits [T, vocab] for one sequence of token ids."""
    tokens = np.asarray(tokens)
    T = len(tokens)
    E = np.asarray(params["embed"], np.float32)
    h = E[tokens] * cfg.embedding_multiplier_scale
    key_ok = tokens != cfg.pad_token
    group = cfg.num_q_heads // cfg.num_kv_heads
    for p in params["layers"]:
        x = rms_norm(h, np.asarray(p["attn_norm"]))
        q = (x @ dequant(p["q"])).reshape(T, cfg.num_q_heads, cfg.key_size)
        k = (x @ dequant(p["k"])).reshape(T, cfg.num_kv_heads, cfg.key_size)
        v = (x @ dequant(p["v"])).reshape(T, cfg.num_kv_heads, cfg.key_size)
        q, k = rope(q, range(T)), rope(k, range(T))
        attn = np.zeros((T, cfg.num_q_heads, cfg.key_size), np.float32)
        for head in range(cfg.num_q_heads):
            kv = head // group
            s = (q[:, head] @ k[:, kv].T) * cfg.attn_output_multiplier
            s = 30.0 * np.tanh(s / 30.0)
            mask = np.tril(np.ones((T, T), bool)) & key_ok[None, :]
            s = np.where(mask, s, -1e30)
            attn[:, head] = softmax(s) @ v[:, kv]
        h = h + rms_norm(attn.reshape(T, -1) @ dequant(p["o"]), np.asarray(p["attn_post_norm"]))

        x = rms_norm(h, np.asarray(p["moe_norm"]))
        probs = softmax(x @ np.asarray(p["router"], np.float32))
        w_gate, w_up, w_down = dequant(p["w_gate"]), dequant(p["w_up"]), dequant(p["w_down"])
        moe = np.zeros_like(x)
        for t in range(T):
            chosen = np.argsort(-probs[t], kind="stable")[: cfg.num_selected_experts]
            for e in chosen:
                hidden = gelu_tanh(x[t] @ w_gate[e]) * (x[t] @ w_up[e])
                moe[t] += probs[t, e] * (hidden @ w_down[e])
        h = h + rms_norm(moe, np.asarray(p["moe_post_norm"]))
    h = rms_norm(h, np.asarray(params["final_norm"]))
    return (h @ E.T) * cfg.output_multiplier_scale
