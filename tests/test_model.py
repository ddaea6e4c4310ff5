"""The forward pass against xAI's reference outputs and against an independent numpy oracle."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grokcli
from grokcli import model as model_fn
from grokcli.config import GROK_1, ModelConfig
from grokcli.params import LAYER_PARAMS, param_specs
from grokcli.quant import QuantizedWeight, quantize

from numpy_reference import forward_row

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = ["tiny-a", "tiny-b"]


def fixture_dir(name: str) -> Path:
    path = SHARED / "fixtures" / name
    if not path.is_dir():
        pytest.skip(f"official fixtures not found at ../shared/fixtures/{name} (run from the project checkout)")
    return path


def small_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, pad_token=0, eos_token=2, sequence_len=64, embedding_multiplier_scale=4.0,
                output_multiplier_scale=0.5773502691896257, emb_size=32, key_size=8, num_q_heads=4,
                num_kv_heads=2, num_layers=2, widening_factor=2, attn_output_multiplier=0.35,
                num_experts=4, num_selected_experts=2)
    base.update(overrides)
    return ModelConfig(**base)


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """Random params of plausible scale, quantized like the release (built here, not by the writer)."""
    rng = np.random.default_rng(seed)
    leaves = {}
    for spec in param_specs(cfg):
        if spec.quantized:
            w = rng.normal(size=spec.shape).astype(np.float32) / np.sqrt(spec.shape[-2])
            leaf = quantize(w, spec.row_blocks)
        elif spec.name == "embed":
            leaf = rng.normal(size=spec.shape).astype(np.float32) * 2 / np.sqrt(cfg.emb_size)
        elif spec.name == "router":
            leaf = rng.normal(size=spec.shape).astype(np.float32) * 3 / np.sqrt(cfg.emb_size)
        else:
            gain = 6.0 if spec.name in ("attn_post_norm", "moe_post_norm") else 1.0
            leaf = (1 + 0.1 * rng.normal(size=spec.shape).astype(np.float32)) * gain
        leaves[(spec.name, spec.layer)] = leaf
    return {
        "embed": leaves[("embed", None)],
        "final_norm": leaves[("final_norm", None)],
        "layers": [{n: leaves[(n, i)] for n in LAYER_PARAMS} for i in range(cfg.num_layers)],
    }


def to_device(params):
    return jax.tree.map(jnp.asarray, params)


# --- parity with xAI's reference on the official fixtures -------------------------------------


def first_divergence(model, tokens: np.ndarray, intermediates) -> str:
    """Name the first layer whose output differs markedly from the reference's."""
    ours = np.asarray(model_fn.hidden_states(model.params, jnp.asarray(tokens), model.config, model.dtype))
    names = ["transformer/input"] + [f"transformer/decoder_layer_{i}/output" for i in range(model.config.num_layers)]
    report = []
    for i, name in enumerate(names):
        ref = intermediates[name]
        rel = np.abs(ours[i] - ref).mean() / (np.abs(ref).mean() + 1e-9)
        report.append(f"{name}: mean relative |diff| {rel:.4f}")
        if rel > 0.02:
            return f"first divergence at {name}\n" + "\n".join(report)
    return "no layer diverges markedly:\n" + "\n".join(report)


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_reference(name):
    path = fixture_dir(name)
    model, _ = grokcli.load(path)
    tokens = np.load(path / "tokens.npy")
    expected = np.load(path / "logits.npy")
    got = model.logits(tokens)
    assert got.shape == expected.shape and got.dtype == np.float32
    diff = np.abs(got - expected)
    agreement = (got.argmax(-1) == expected.argmax(-1)).mean()
    ok = diff.mean() <= 0.03 and diff.max() <= 0.4 and agreement >= 0.95
    if not ok:
        where = first_divergence(model, tokens, np.load(path / "intermediates.npz"))
        pytest.fail(f"{name}: mean |d| {diff.mean():.4f}, max |d| {diff.max():.4f}, argmax {agreement:.3f}\n{where}")


@pytest.mark.parametrize("name", FIXTURES)
def test_layer_outputs_track_reference(name):
    """Every layer's output is close to the reference's intermediates (catches compensating errors)."""
    path = fixture_dir(name)
    model, _ = grokcli.load(path)
    tokens = np.load(path / "tokens.npy")
    report = first_divergence(model, tokens, np.load(path / "intermediates.npz"))
    assert report.startswith("no layer diverges"), report


# --- an independent numpy implementation on random configs -----------------------------------

ORACLE_CONFIGS = {
    "gqa-top2-4experts": small_config(),
    "no-gqa-top1-8experts": small_config(num_q_heads=2, num_kv_heads=2, num_experts=8, num_selected_experts=1),
    "gqa-top2-8experts-12layers": small_config(num_layers=12, emb_size=24, key_size=4, num_q_heads=6,
                                               num_kv_heads=3, num_experts=8),
}


@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
def test_forward_matches_numpy_oracle(name):
    cfg = ORACLE_CONFIGS[name]
    params = random_params(cfg, seed=len(name))
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, cfg.vocab_size, size=(2, 11)).astype(np.int32)
    tokens[1, 3] = cfg.pad_token  # a pad token in the middle is masked as a key
    got = np.asarray(jax.jit(lambda p, t: model_fn.logits(p, t, cfg, dtype=jnp.float32))(to_device(params), tokens))
    for row in range(tokens.shape[0]):
        want = forward_row(params, tokens[row], cfg)
        np.testing.assert_allclose(got[row], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_moe_decode_and_prefill_paths_agree():
    """The gathered (few tokens) and grouped (many tokens) expert paths compute the same thing."""
    cfg = small_config(num_experts=8)
    params = to_device(random_params(cfg, seed=3))
    tokens = np.random.default_rng(2).integers(1, cfg.vocab_size, size=(1, 9)).astype(np.int32)
    full = np.asarray(jax.jit(lambda p, t: model_fn.logits(p, t, cfg, dtype=jnp.float32))(params, tokens))
    # Token by token through the cache: 2 (token, expert) pairs per step use the gathered path.
    cache = model_fn.init_cache(cfg, 1, 16, jnp.float32)
    step_fn = jax.jit(lambda p, t, c: model_fn.forward(p, t, cfg, c, dtype=jnp.float32))
    for t in range(tokens.shape[1]):
        h, cache = step_fn(params, jnp.asarray(tokens[:, t:t + 1]), cache)
        step = np.asarray(model_fn.lm_head(params, h, cfg))[0, 0]
        np.testing.assert_allclose(step, full[0, t], rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_cached_prefill_then_decode_equals_full_forward():
    cfg = small_config()
    params = to_device(random_params(cfg, seed=5))
    tokens = np.random.default_rng(4).integers(3, cfg.vocab_size, size=(2, 12)).astype(np.int32)
    full = np.asarray(jax.jit(lambda p, t: model_fn.logits(p, t, cfg, dtype=jnp.float32))(params, tokens))
    cache = model_fn.init_cache(cfg, 2, 32, jnp.float32)
    # Row 0 prefills 7 tokens, row 1 prefills 5 (right padding), then both decode one at a time.
    prompt = tokens[:, :7].copy()
    prompt[1, 5:] = 0
    lengths = jnp.asarray([7, 5], jnp.int32)
    h, cache = jax.jit(lambda p, t, c, n: model_fn.forward(p, t, cfg, c, input_lengths=n, dtype=jnp.float32,
                                                           fresh_cache=True))(params, jnp.asarray(prompt), cache, lengths)
    step_fn = jax.jit(lambda p, t, c: model_fn.forward(p, t, cfg, c, dtype=jnp.float32))
    pre = np.asarray(model_fn.lm_head(params, h, cfg))
    np.testing.assert_allclose(pre[0, 6], full[0, 6], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(pre[1, 4], full[1, 4], rtol=1e-4, atol=1e-3)
    pos = [7, 5]
    for _ in range(4):
        step_tokens = jnp.asarray([[tokens[0, pos[0]]], [tokens[1, pos[1]]]], jnp.int32)
        h, cache = step_fn(params, step_tokens, cache)
        out = np.asarray(model_fn.lm_head(params, h, cfg))[:, 0]
        for row in range(2):
            np.testing.assert_allclose(out[row], full[row, pos[row]], rtol=1e-4, atol=1e-3)
        pos = [p + 1 for p in pos]


def test_grok1_forward_shapes_without_allocating():
    """eval_shape of the full 314B config: params and logits shapes, nothing allocated."""
    cfg = GROK_1
    specs = param_specs(cfg)
    assert len(specs) == 770

    def abstract(spec):
        if spec.quantized:
            return QuantizedWeight(jax.ShapeDtypeStruct(spec.shape, jnp.int8),
                                   jax.ShapeDtypeStruct(spec.scales_shape, jnp.float32))
        return jax.ShapeDtypeStruct(spec.shape, jnp.float32)

    leaves = {(s.name, s.layer): abstract(s) for s in specs}
    params = {"embed": leaves[("embed", None)], "final_norm": leaves[("final_norm", None)],
              "layers": [{n: leaves[(n, i)] for n in LAYER_PARAMS} for i in range(cfg.num_layers)]}
    out = jax.eval_shape(lambda p, t: model_fn.logits(p, t, cfg, dtype=jnp.bfloat16),
                         params, jax.ShapeDtypeStruct((1, 8), jnp.int32))
    assert out.shape == (1, 8, 131072) and out.dtype == jnp.float32
    n_params = sum(int(np.prod(s.shape)) for s in specs)
    assert 310e9 < n_params < 320e9  # "314B parameters"
    ffn = dataclasses.replace(cfg).ffn_size
    assert ffn == 32768
