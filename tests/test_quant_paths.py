"""The accelerator form of the matmul helper (plain int8 -> compute-dtype dots, used on GPU/TPU),
run here on CPU so that it is tested without a GPU; test_quant.py covers the CPU chunked form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokcli import quant
from grokcli.quant import QuantizedWeight, qmatmul, quantize

from numpy_reference import dequant


@pytest.fixture(autouse=True)
def accelerator_form(monkeypatch):
    monkeypatch.setattr(quant, "_chunked_backend", lambda: False)


def device(q: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(jnp.asarray(q.weight), jnp.asarray(q.scales, jnp.float32))


@pytest.mark.parametrize("blocks", [1, 8])
def test_quantize_round_trip_error_is_within_half_a_step(blocks):
    w = np.random.default_rng(0).normal(size=(3, 64, 40)).astype(np.float32)
    q = quantize(w, blocks)
    assert q.weight.dtype == np.int8 and q.scales.shape == (3, blocks, 40)
    step = np.repeat(np.asarray(q.scales, np.float32), 64 // blocks, axis=-2)
    assert np.all(np.abs(dequant(q) - w) <= step * 0.5 + 1e-7)
    np.testing.assert_allclose(np.asarray(q.dequantize()), dequant(q))


@pytest.mark.parametrize("blocks", [1, 8])
def test_dense(blocks):
    rng = np.random.default_rng(1)
    q = quantize(rng.normal(size=(128, 48)).astype(np.float32), blocks)
    x = rng.normal(size=(2, 5, 128)).astype(np.float32)
    got = np.asarray(jax.jit(qmatmul)(jnp.asarray(x), device(q)))
    np.testing.assert_allclose(got, x @ dequant(q), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("blocks", [1, 8])
def test_selected_experts(blocks):
    rng = np.random.default_rng(2)
    q = quantize(rng.normal(size=(4, 64, 24)).astype(np.float32), blocks)
    x = rng.normal(size=(6, 64)).astype(np.float32)
    experts = np.array([3, 0, 3, 1, 2, 2])
    got = np.asarray(jax.jit(lambda x, w, e: qmatmul(x, w, experts=e))(jnp.asarray(x), device(q), experts))
    want = np.stack([x[n] @ dequant(q)[e] for n, e in enumerate(experts)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("blocks", [1, 8])
def test_grouped_experts_with_an_empty_group(blocks):
    rng = np.random.default_rng(3)
    q = quantize(rng.normal(size=(4, 64, 24)).astype(np.float32), blocks)
    experts = np.sort(np.array([0, 0, 2, 2, 2, 3, 0, 3, 3, 3, 3]))  # expert 1 has no rows
    sizes = np.bincount(experts, minlength=4).astype(np.int32)
    x = rng.normal(size=(len(experts), 64)).astype(np.float32)
    fn = jax.jit(lambda x, w, e, g: qmatmul(x, w, experts=e, group_sizes=g))
    got = np.asarray(fn(jnp.asarray(x), device(q), experts, sizes))
    want = np.stack([x[n] @ dequant(q)[e] for n, e in enumerate(experts)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_plain_weights_take_the_same_helper():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 16, 8)).astype(np.float32)
    x = rng.normal(size=(3, 16)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(qmatmul(jnp.asarray(x), jnp.asarray(w[1]))), x @ w[1], rtol=1e-5)
    e = np.array([2, 0, 2])
    np.testing.assert_allclose(np.asarray(qmatmul(jnp.asarray(x), jnp.asarray(w), experts=e)),
                               np.einsum("ni,nio->no", x, w[e]), rtol=1e-5, atol=1e-5)


def test_whole_forward_in_the_accelerator_form_matches_the_oracle():
    """The model's decode (gathered) and prefill (grouped) expert paths, accelerator form."""
    from grokcli import model as model_fn
    from grokcli.checkpoint import random_params
    from grokcli.config import ModelConfig

    from conftest import TINY_CONFIG
    from numpy_reference import forward_row

    cfg = ModelConfig(**TINY_CONFIG)
    params = random_params(cfg, 3)
    dev = jax.tree.map(jnp.asarray, params)
    tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, size=(1, 7)).astype(np.int32)
    want = forward_row(params, tokens[0], cfg)
    full = np.asarray(jax.jit(lambda p, t: model_fn.logits(p, t, cfg, dtype=jnp.float32))(dev, tokens))[0]
    np.testing.assert_allclose(full, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    # Token by token through the cache: 2 (token, expert) pairs per step take the gathered path.
    step = jax.jit(lambda p, t, c: model_fn.forward(p, t, cfg, c, dtype=jnp.float32))
    cache = model_fn.init_cache(cfg, 1, 16, jnp.float32)
    for t in range(tokens.shape[1]):
        h, cache = step(dev, jnp.asarray(tokens[:, t:t + 1]), cache)
        got = np.asarray(model_fn.lm_head(dev, h, cfg))[0, 0]
        np.testing.assert_allclose(got, want[t], rtol=2e-3, atol=2e-3 * np.abs(want).max())
