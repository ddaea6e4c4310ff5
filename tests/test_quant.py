"""qmatmul's three modes (dense, gathered, grouped) against a float64 numpy oracle on the dequantised weights,
in both CPU forms: the native kernel and the XLA loops (test_quant_paths.py: the accelerator form)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokcli import native, quant
from grokcli.quant import QuantizedWeight, qmatmul, quantize


@pytest.fixture(autouse=True, params=["native", "xla-loops"])
def cpu_form(request, monkeypatch):
    if request.param == "xla-loops":
        monkeypatch.setenv("GROK_NATIVE_KERNELS", "0")
    else:
        monkeypatch.setenv("GROK_NATIVE_KERNELS", "1")  # every shape class, whatever was measured faster
        if not native.usable():
            pytest.skip(native.status())  # test_native.py fails instead where a compiler exists
    return request.param


def _weight(rng, shape, row_blocks):
    return quantize(rng.standard_normal(shape).astype(np.float32), row_blocks)


def _oracle(w: QuantizedWeight) -> np.ndarray:
    """The dequantised weight in float64, computed here from the int8 values and bf16 scales."""
    q = np.asarray(w.weight).astype(np.float64)
    s = np.asarray(w.scales).astype(np.float32).astype(np.float64)
    *lead, n_in, n_out = q.shape
    b = s.shape[-2]
    return (q.reshape(*lead, b, n_in // b, n_out) * s[..., :, None, :]).reshape(q.shape)


def _device(w: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(jnp.asarray(w.weight), jnp.asarray(np.asarray(w.scales).astype(np.float32)))


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("row_blocks", [1, 8])
def test_dense(row_blocks):
    rng = np.random.default_rng(0)
    w = _weight(rng, (64, 48), row_blocks)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    _close(jax.jit(qmatmul)(jnp.asarray(x), _device(w)), x.astype(np.float64) @ _oracle(w))


@pytest.mark.parametrize("row_blocks", [1, 8])
def test_gathered_rows_use_their_own_expert(row_blocks):
    rng = np.random.default_rng(1)
    w = _weight(rng, (6, 64, 40), row_blocks)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    experts = np.array([5, 0, 5, 2], np.int32)
    got = jax.jit(lambda x, w, e: qmatmul(x, w, experts=e))(jnp.asarray(x), _device(w), jnp.asarray(experts))
    full = _oracle(w)
    _close(got, np.stack([x[n].astype(np.float64) @ full[e] for n, e in enumerate(experts)]))


@pytest.mark.parametrize("row_blocks", [1, 8])
@pytest.mark.parametrize("sizes", [(3, 0, 0, 9, 1, 0, 0, 27), (40, 0, 0, 0, 0, 0, 0, 0), (5, 5, 5, 5, 5, 5, 5, 5),
                                   (0, 0, 0, 0, 0, 0, 0, 1)])
def test_grouped_matches_a_per_expert_loop(sizes, row_blocks):
    """Groups empty, tiny, straddling tiles and filling everything; rows sorted by expert."""
    rng = np.random.default_rng(sum(sizes))
    _check_grouped(rng, _weight(rng, (8, 64, 24), row_blocks), sizes)


def _check_grouped(rng, w: QuantizedWeight, sizes):
    """qmatmul's grouped mode on random rows sorted by expert (`sizes` per expert) vs the oracle."""
    n, n_in = sum(sizes), w.weight.shape[1]
    x = rng.standard_normal((n, n_in)).astype(np.float32)
    experts = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    got = jax.jit(lambda x, w, g, e: qmatmul(x, w, group_sizes=g, experts=e))(
        jnp.asarray(x), _device(w), jnp.asarray(np.array(sizes, np.int32)), jnp.asarray(experts))
    full = _oracle(w)
    _close(got, np.stack([x[r].astype(np.float64) @ full[experts[r]] for r in range(n)]))


@pytest.mark.parametrize("chunk_elements", [24 * 32, 24 * 16, 24 * 5])
def test_grouped_chunks_that_cut_through_scale_blocks(monkeypatch, chunk_elements, cpu_form):
    """Chunks of 32, 16 or 8 input rows over row blocks of 12: a chunk starts mid-block, spans blocks."""
    if cpu_form == "native":
        pytest.skip("chunks are the XLA loops' (the native kernel has its own tiling, test_native.py)")
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(quant, "_grouped_chunk_elements", lambda tile: chunk_elements)
    rng = np.random.default_rng(7)
    _check_grouped(rng, _weight(rng, (4, 96, 24), 8), (7, 0, 30, 3))
