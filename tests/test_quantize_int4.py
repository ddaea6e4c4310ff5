"""The int4 weight form: quantisation bounds, and qmatmul's three modes in both XLA forms (CPU
chunked loops and the accelerator form) against a float64 numpy oracle written here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokcli import quant
from grokcli.quant import qmatmul, quantize
from grokcli.quant4 import Int4Weight, quantize4, requantize


def oracle(w: Int4Weight) -> np.ndarray:
    """Dequantised float64 matrix, by arithmetic on the bytes (no code shared with quant4)."""
    b = np.asarray(w.packed).astype(np.int64)
    low, high = b % 16, b // 16
    if w.offsets is None:
        low, high = (low ^ 8) - 8, (high ^ 8) - 8
    *lead, half, n_out = b.shape
    q = np.empty((*lead, 2 * half, n_out), np.float64)
    q[..., 0::2, :], q[..., 1::2, :] = low, high
    group = 2 * half // w.scales.shape[-2]
    out = q * np.repeat(np.asarray(w.scales).astype(np.float64), group, axis=-2)
    if w.offsets is not None:
        out += np.repeat(np.asarray(w.offsets).astype(np.float64), group, axis=-2)
    return out


@pytest.fixture(params=["cpu-loops", "accelerator"])
def form(request, monkeypatch):
    if request.param == "accelerator":
        monkeypatch.setattr(quant, "_chunked_backend", lambda: False)
    return request.param


def _device(w: Int4Weight) -> Int4Weight:
    return jax.tree.map(jnp.asarray, w)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_quantisation_error_is_bounded_by_the_step(scheme):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 64, 40)).astype(np.float32) * rng.uniform(0.1, 3, (1, 1, 40))
    q = quantize4(w, 16, scheme)
    assert q.packed.dtype == np.uint8 and q.packed.shape == (3, 32, 40) and q.scales.shape == (3, 4, 40)
    assert q.shape == w.shape and q.group_size == 16 and q.symmetric == (scheme == "sym")
    step = np.abs(np.repeat(np.asarray(q.scales, np.float64), 16, axis=-2))
    err = np.abs(oracle(q) - w)
    if scheme == "sym":
        assert np.all(err <= step + 1e-7)  # the extreme maps onto -8; its mirror may clip at +7
        extreme = np.abs(w.reshape(3, 4, 16, 40)).max(axis=2)
        np.testing.assert_allclose(np.abs(q.scales.astype(np.float32)) * 8, extreme, rtol=1 / 128)
    else:
        span = np.repeat(np.abs(w.reshape(3, 4, 16, 40)).max(axis=2), 16, axis=1)
        assert np.all(err <= step * 0.5 + span / 64)
    np.testing.assert_allclose(q.dequantize(), oracle(q), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_device(q).dequantize()), oracle(q), rtol=1e-6, atol=1e-6)


def test_search_never_does_worse_than_the_plain_scale():
    w = np.random.default_rng(1).standard_t(3, (128, 64)).astype(np.float32)  # heavy tails
    for base in ("sym", "asym"):
        plain = ((oracle(quantize4(w, 32, base)) - w) ** 2).sum(axis=0)
        searched = ((oracle(quantize4(w, 32, base + "-search")) - w) ** 2).sum(axis=0)
        assert np.all(searched <= plain * (1 + 1e-6)) and searched.sum() < 0.95 * plain.sum()


def test_requantize_in_chunks_equals_quantising_the_dequantised_int8():
    rng = np.random.default_rng(2)
    q8 = quantize(rng.standard_normal((2, 96, 24)).astype(np.float32), row_blocks=8)
    whole = quantize4(np.asarray(q8.dequantize(np.float32)), 32, "asym-search")
    chunked = requantize(q8.weight, q8.scales, 32, "asym-search", budget=96 * 24 // 2)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_bad_settings_are_refused():
    w = np.zeros((48, 8), np.float32)
    for group, scheme in ((32, "sym"), (7, "sym"), (16, "nf4")):
        with pytest.raises(ValueError):
            quantize4(w, group, scheme)


# Chunk sizes (f32 elements) that make the CPU loops take chunks smaller than a group's packed
# rows, equal to it, and spanning several groups.
CHUNKS = [2 * 40 * 8, 2 * 40 * 16, 1 << 16]


@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_dense(form, scheme, chunk, monkeypatch):
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(3)
    w = quantize4(rng.standard_normal((128, 40)).astype(np.float32), 32, scheme)
    x = rng.standard_normal((3, 2, 128)).astype(np.float32)
    _close(jax.jit(qmatmul)(jnp.asarray(x), _device(w)), x.astype(np.float64) @ oracle(w))


@pytest.mark.parametrize("scheme, chunk", [("sym", CHUNKS[0]), ("asym", CHUNKS[2])])
def test_gathered_rows_use_their_own_expert(form, scheme, chunk, monkeypatch):
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(4)
    w = quantize4(rng.standard_normal((6, 128, 40)).astype(np.float32), 32, scheme)
    x = rng.standard_normal((4, 128)).astype(np.float32)
    experts = np.array([5, 0, 5, 2], np.int32)
    got = jax.jit(lambda x, w, e: qmatmul(x, w, experts=e))(jnp.asarray(x), _device(w), jnp.asarray(experts))
    full = oracle(w)
    _close(got, np.stack([x[n].astype(np.float64) @ full[e] for n, e in enumerate(experts)]))


@pytest.mark.parametrize("scheme, sizes", [("sym", (3, 0, 0, 9, 1, 0, 0, 27)), ("asym", (5,) * 8),
                                           ("asym", (0, 0, 0, 0, 0, 0, 0, 1))])
def test_grouped_matches_a_per_expert_loop(form, scheme, sizes, monkeypatch):
    monkeypatch.setattr(quant, "_grouped_chunk_elements", lambda tile: 2 * 40 * 8)
    rng = np.random.default_rng(sum(sizes))
    w = quantize4(rng.standard_normal((8, 128, 40)).astype(np.float32), 32, scheme)
    n = sum(sizes)
    x = rng.standard_normal((n, 128)).astype(np.float32)
    experts = np.repeat(np.arange(8), sizes).astype(np.int32)
    got = jax.jit(lambda x, w, g, e: qmatmul(x, w, group_sizes=g, experts=e))(
        jnp.asarray(x), _device(w), jnp.asarray(np.array(sizes, np.int32)), jnp.asarray(experts))
    full = oracle(w)
    _close(got, np.stack([x[r].astype(np.float64) @ full[experts[r]] for r in range(n)]))


def test_model_runs_int4_weights_like_their_dequantised_floats():
    """The whole forward on int4 leaves equals the forward on their dequantised float copies."""
    from grokcli import model
    from grokcli.checkpoint.writer import random_params
    from grokcli.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, pad_token=0, eos_token=2, sequence_len=32, embedding_multiplier_scale=4.0,
                      output_multiplier_scale=0.5773502691896257, emb_size=64, key_size=16, num_q_heads=4,
                      num_kv_heads=2, num_layers=1, widening_factor=1.0, attn_output_multiplier=0.25,
                      num_experts=4, num_selected_experts=2)
    params = random_params(cfg, seed=0)
    to4 = lambda leaf: quantize4(np.asarray(leaf.dequantize(np.float32)), 16, "asym")  # noqa: E731
    is_q = lambda leaf: isinstance(leaf, quant.QuantizedWeight)  # noqa: E731
    p4 = jax.tree.map(lambda leaf: to4(leaf) if is_q(leaf) else leaf, params, is_leaf=is_q)
    is4 = lambda leaf: isinstance(leaf, Int4Weight)  # noqa: E731
    dense = jax.tree.map(lambda leaf: oracle(leaf).astype(np.float32) if is4(leaf) else leaf, p4, is_leaf=is4)
    tokens = jnp.asarray(np.random.default_rng(5).integers(1, 64, (2, 12)), jnp.int32)
    got = jax.jit(lambda p, t: model.logits(p, t, cfg))(jax.tree.map(jnp.asarray, p4), tokens)
    want = jax.jit(lambda p, t: model.logits(p, t, cfg))(jax.tree.map(jnp.asarray, dense), tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
