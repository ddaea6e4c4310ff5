"""The native CPU int8 matmul (grokcli/native): its build, its fallback, and its numbers against
a float64 numpy oracle; the whole model with and without it against the numpy reference forward."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokcli import native, quant
from grokcli.native import select
from grokcli.quant import quantize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel():
    """The native kernel; skipped only where no C++ compiler exists (then grokcli uses XLA loops)."""
    if native.compiler() is None:
        pytest.skip("no C++ compiler on this machine: grokcli falls back to its XLA loops")
    assert native.usable(), native.status()  # a compiler is there, so the build must work
    return native.qmatmul_rows


def _oracle(x, q, experts):
    w = np.asarray(q.weight).astype(np.float64)
    s = np.asarray(q.scales).astype(np.float32).astype(np.float64)
    e, k, m = w.shape
    b = s.shape[1]
    full = (w.reshape(e, b, k // b, m) * s[:, :, None, :]).reshape(e, k, m)
    return np.einsum("nk,nkm->nm", x.astype(np.float64), full[experts])


@pytest.fixture(scope="module")
def avx2_kernel(kernel):
    """On x86: the kernel built without AVX-512 (the AVX2+FMA code, what AMD EPYC machines run),
    registered under its own target; the CPU here must have AVX2 to run it."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64") or "avx2" not in native._cpu_flags():
        pytest.skip("the AVX2 variant needs an x86 CPU with AVX2")
    flags = [f for f in native.compile_flags() if not f.startswith("-mprefer-vector-width")] + ["-mno-avx512f"]
    native.register(native.build(flags), "grokcli_qmatmul_avx2")
    return lambda *args: native.qmatmul_rows(*args, target="grokcli_qmatmul_avx2")


ORACLE_SHAPES = [
    (8, 2, 64, 1100, 1),    # decode: two rows, columns over two 1024-wide tasks with a ragged end
    (8, 45, 96, 40, 8),     # rows of one expert over several 16-row tiles; 12-row scale blocks
    (3, 19, 40, 70, 4),     # depth 10 per block (not a multiple of 16), width not a multiple of 32
    (1, 5, 33, 7, 1),       # a dense matrix: one "expert", odd sizes everywhere
    (4, 0, 16, 32, 1),      # no rows at all
    (4, 3, 24, 1037, 8),    # decode-sized tiles (1-2 rows) on 3-row block depth, ragged strip
    (2, 1, 40, 13, 1),      # one row narrower than one strip
    (6, 9, 32, 600, 2),     # experts with 1, 2 and 3 rows in one call: both paths side by side
    (2, 1, 600, 40, 8),     # too few column strips: K sliced in two, cutting a 75-row scale block
    (3, 2, 1024, 70, 8),    # two rows, K in several slices, ragged strip
]


@pytest.mark.parametrize("experts_n_k_m_blocks", ORACLE_SHAPES)
def test_the_avx2_build_matches_the_float64_oracle(avx2_kernel, experts_n_k_m_blocks):
    _check_against_oracle(avx2_kernel, experts_n_k_m_blocks)


@pytest.mark.parametrize("experts_n_k_m_blocks", ORACLE_SHAPES)
def test_kernel_matches_the_float64_oracle(kernel, experts_n_k_m_blocks):
    _check_against_oracle(kernel, experts_n_k_m_blocks)


def _check_against_oracle(kernel, experts_n_k_m_blocks):
    e, n, k, m, blocks = experts_n_k_m_blocks
    rng = np.random.default_rng(n + k + m)
    q = quantize(rng.standard_normal((e, k, m)).astype(np.float32), blocks)
    x = rng.standard_normal((n, k)).astype(np.float32)
    experts = (rng.integers(0, e, n) if n != 45 else np.full(n, e - 1)).astype(np.int32)
    got = jax.jit(kernel)(jnp.asarray(x), jnp.asarray(q.weight), jnp.asarray(np.asarray(q.scales, np.float32)),
                          jnp.asarray(experts))
    want = _oracle(x, q, experts)
    assert got.shape == (n, m)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max(initial=0)))


def test_an_expert_index_out_of_range_is_an_error_not_a_wild_read(kernel):
    q = quantize(np.ones((2, 16, 32), np.float32))
    args = (jnp.ones((1, 16)), jnp.asarray(q.weight), jnp.asarray(np.asarray(q.scales, np.float32)))
    with pytest.raises(Exception, match="expert index out of range"):
        jax.block_until_ready(jax.jit(kernel)(*args, jnp.array([2], jnp.int32)))


def test_the_build_is_kept_in_the_cache_and_reused(kernel):
    path = native.build()
    assert path.is_file() and path.parent.parent == native.paths.cache_dir()
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert not list(path.parent.glob("*.tmp"))  # no leftovers of the atomic rename


def test_the_environment_switch_turns_it_off(kernel, monkeypatch):
    monkeypatch.setenv("GROK_NATIVE_KERNELS", "0")
    assert not native.usable() and not quant.native_kernel_in_use()
    assert "GROK_NATIVE_KERNELS=0" in native.status()
    x = jnp.ones((2, 64))
    q = quantize(np.ones((64, 40), np.float32))
    w = quant.QuantizedWeight(jnp.asarray(q.weight), jnp.asarray(np.asarray(q.scales, np.float32)))
    assert "custom_call" not in jax.jit(quant.qmatmul).lower(x, w).as_text()
    monkeypatch.setenv("GROK_NATIVE_KERNELS", "1")
    assert "custom_call" in jax.jit(lambda x, w: quant.qmatmul(x, w)).lower(x, w).as_text()


@pytest.mark.parametrize("form", ["native", "xla-loops"])
def test_whole_forward_matches_the_numpy_reference(form, monkeypatch, request):
    """Prefill (grouped experts) and token-by-token decode (gathered experts) in both CPU forms."""
    from conftest import TINY_CONFIG
    from numpy_reference import forward_row

    from grokcli import model as model_fn
    from grokcli.checkpoint import random_params
    from grokcli.config import ModelConfig

    monkeypatch.setenv("GROK_NATIVE_KERNELS", "1" if form == "native" else "0")
    if form == "native":
        request.getfixturevalue("kernel")
    cfg = ModelConfig(**TINY_CONFIG)
    params = random_params(cfg, 5)
    dev = jax.tree.map(jnp.asarray, params)
    tokens = np.random.default_rng(2).integers(1, cfg.vocab_size, size=(1, 9)).astype(np.int32)
    want = forward_row(params, tokens[0], cfg)
    tol = dict(rtol=2e-3, atol=2e-3 * np.abs(want).max())
    logits = jax.jit(lambda p, t: model_fn.logits(p, t, cfg, dtype=jnp.float32))
    assert ("custom_call" in logits.lower(dev, tokens).as_text()) == (form == "native")
    np.testing.assert_allclose(np.asarray(logits(dev, tokens))[0], want, **tol)
    step = jax.jit(lambda p, t, c: model_fn.forward(p, t, cfg, c, dtype=jnp.float32))
    cache = model_fn.init_cache(cfg, 1, 16, jnp.float32)
    for t in range(tokens.shape[1]):
        h, cache = step(dev, jnp.asarray(tokens[:, t:t + 1]), cache)
        np.testing.assert_allclose(np.asarray(model_fn.lm_head(dev, h, cfg))[0, 0], want[t], **tol)


def test_without_a_compiler_grok_falls_back_and_writes_the_same_text(kernel, tmp_path):
    """A machine without a C++ compiler: same greedy text from the XLA loops, no error."""
    from conftest import grok_command

    command, env = grok_command()
    args = ["complete", "--model", "demo", "It is a truth", "--max-tokens", "12", "--temp", "0", "--quiet"]
    runs = {}
    for name, extra in (("native", {}), ("no-compiler", {"CXX": str(tmp_path / "no-such-c++"),
                                                         "XDG_CACHE_HOME": str(tmp_path / "cache")})):
        proc = subprocess.run(command + args, capture_output=True, text=True, timeout=300,
                              env={**env, **extra}, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        runs[name] = proc.stdout
    assert runs["native"].strip() and runs["native"] == runs["no-compiler"]
    assert not (tmp_path / "cache" / "grokcli" / "native").exists() or not list(
        (tmp_path / "cache" / "grokcli" / "native").glob("*.so"))


def test_any_failure_to_set_it_up_means_the_xla_loops(monkeypatch):
    """E.g. a jax without jax.ffi: usable() is False with the reason, and nothing raises."""
    def broken():
        raise AttributeError("module 'jax' has no attribute 'ffi'")

    monkeypatch.setattr(native, "_load", broken)
    monkeypatch.setitem(native._state, "usable", None)
    assert native.usable() is False
    assert "has no attribute 'ffi'" in native.status()


# ---------------------------------------------------------------------------------------------
# Choosing by measurement (grokcli/native/select.py)

def _timings(slow_native=(), slow_xla=()):
    """Injected calibration timings: seconds per call, the named classes 10x slower on one side."""
    calls = []

    def timings():
        calls.append(1)
        return {c: {"native": 0.010 if c in slow_native else 0.001,
                    "xla": 0.010 if c in slow_xla else 0.001, "bytes": 8e6} for c in select.CLASSES}

    return timings, calls


def _uses_kernel(rows: int) -> bool:
    q = quantize(np.ones((64, 40), np.float32))
    w = quant.QuantizedWeight(jnp.asarray(q.weight), jnp.asarray(np.asarray(q.scales, np.float32)))
    return "custom_call" in jax.jit(lambda x, w: quant.qmatmul(x, w)).lower(jnp.ones((rows, 64)), w).as_text()


@pytest.fixture
def fresh_decision(kernel, monkeypatch):
    """No decision held by this process, none forced by the environment; restored afterwards."""
    monkeypatch.delenv("GROK_NATIVE_KERNELS", raising=False)
    select.reset()
    yield native._state["library"]
    select.reset()


def test_a_slower_native_path_loses_its_class_in_a_real_calibration(fresh_decision, monkeypatch, tmp_path):
    """The real measurement (compiled calls, alternated, bounded) with the kernel made slow for
    prefill and the XLA loops made slow for decode: each class goes to the faster side."""
    real_cases = select._cases

    def slowed(fn):
        def run():
            time.sleep(0.25)  # far above any real call here, even on a loaded machine
            return fn()
        return run

    def cases():
        out = real_cases()
        return {c: (slowed(n) if c == "prefill" else n, x if c == "prefill" else slowed(x), b)
                for c, (n, x, b) in out.items()}

    monkeypatch.setattr(select, "_cases", cases)
    library = tmp_path / "qmatmul-0123456789abcdef.so"
    t0 = time.perf_counter()
    d = select.decision(library)
    assert time.perf_counter() - t0 < 120  # bounded (incl. the sleeps: ~5 s on a quiet machine)
    assert {c: d["classes"][c]["choice"] for c in select.CLASSES} == {
        "decode-1": "native", "decode-8": "native", "prefill": "xla"}
    assert d["classes"]["prefill"]["native_ms"] > 250 and d["classes"]["decode-1"]["xla_ms"] > 250
    saved = json.loads(select.decision_path(library).read_text())
    assert saved["classes"] == d["classes"] and not list(tmp_path.glob("*.tmp"))  # atomic write


def test_each_class_follows_the_measurement_and_the_switch_overrides_it(fresh_decision, monkeypatch):
    timings, _ = _timings(slow_native=("prefill",), slow_xla=("decode-1",))
    select.calibrate(fresh_decision, timings)
    select.reset()
    assert _uses_kernel(1) and _uses_kernel(16) and not _uses_kernel(64)  # prefill: XLA loops won
    r = quant.cpu_matmul_report()
    assert r["kernel"] == "on" and r["forced"] is None
    assert r["classes"]["prefill"]["choice"] == "xla" and r["classes"]["decode-1"]["native_gb_s"] == 8.0
    assert "prefill xla" in quant.cpu_matmul_status() and "decode-1 native" in quant.cpu_matmul_status()
    monkeypatch.setenv("GROK_NATIVE_KERNELS", "1")  # forced: the kernel even where it lost
    assert _uses_kernel(64) and quant.cpu_matmul_report()["forced"] == "native"
    monkeypatch.setenv("GROK_NATIVE_KERNELS", "0")  # forced: the XLA loops even where it won
    assert not _uses_kernel(1) and quant.cpu_matmul_report()["kernel"] == "off"


def test_the_decision_is_cached_per_kernel_build(fresh_decision, monkeypatch, tmp_path):
    first, calls = _timings(slow_native=("decode-8",))
    library = tmp_path / "qmatmul-aaaaaaaaaaaaaaaa.so"
    assert select.decision(library, first)["classes"]["decode-8"]["choice"] == "xla" and len(calls) == 1
    select.reset()  # a new process: read from the file, not measured again
    assert select.decision(library, first)["classes"]["decode-8"]["choice"] == "xla" and len(calls) == 1
    # Another build (new source, compiler, flags, jaxlib or CPU: another library name) measures again.
    monkeypatch.setattr(native, "compile_flags", lambda real=native.compile_flags: [*real(), "-DREBUILT"])
    other = native.library_path(native.compiler(), native.compile_flags())
    assert other != fresh_decision and select.decision_path(other) != select.decision_path(fresh_decision)
    second, calls2 = _timings()
    assert select.decision(tmp_path / other.name, second)["classes"]["decode-8"]["choice"] == "native"
    assert len(calls2) == 1
    # A damaged or stale file is measured again, never trusted.
    select.reset()
    select.decision_path(library).write_text('{"version": 1, "library": "qmatmul-aaaaaaaaaaaaaaaa.so"')
    third, calls3 = _timings()
    assert select.decision(library, third)["classes"]["decode-8"]["choice"] == "native" and len(calls3) == 1


def test_a_decision_measured_on_a_busy_machine_is_measured_again_when_it_is_quiet(fresh_decision, monkeypatch,
                                                                                  tmp_path):
    library = tmp_path / "qmatmul-bbbbbbbbbbbbbbbb.so"
    monkeypatch.setattr(select, "_load_average", lambda: 40.0)
    busy, calls = _timings(slow_native=("prefill",))
    select.decision(library, busy)
    select.reset()
    assert select.decision(library, busy) and len(calls) == 1  # still busy: the file holds
    select.reset()
    monkeypatch.setattr(select, "_load_average", lambda: 0.1)
    quiet, calls2 = _timings()
    assert select.decision(library, quiet)["classes"]["prefill"]["choice"] == "native" and len(calls2) == 1
    select.reset()
    assert select.decision(library, quiet) and len(calls2) == 1  # measured quiet: kept for good
