"""The persistent compilation cache (across processes) and no recompilation within a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GROK1_TOKENIZER = REPO.parent / "shared" / "grok1" / "tokenizer.model"

# Generates 3 tokens in a fresh process with the compile cache in argv[2]; prints the "compiled"
# status events' cache_hit values and jax's own count of persistent-cache hits.
_CHILD = textwrap.dedent("""
    import json, sys
    import jax
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    import grokcli
    assert grokcli.enable_compile_cache(sys.argv[2]) is True
    model, _ = grokcli.load(sys.argv[1])
    statuses, tokens = [], []
    for ev in grokcli.stream_generate(model, None, [5, 6, 7, 8], temperature=0.0, max_tokens=3, ignore_eos=True):
        if type(ev).__name__ == "StatusEvent" and ev.kind == "compiled":
            statuses.append(ev.cache_hit)
        elif type(ev).__name__ == "TokenEvent":
            tokens.append(ev.token_id)
    print(json.dumps({"compiled_cache_hits": statuses, "jax_cache_hits": len(hits), "tokens": tokens}))
""")


def _child(ckpt: Path, cache: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("GROK_NO_COMPILE_CACHE", None)
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt), str(cache)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_second_process_loads_compiled_code_from_the_cache(tiny_config, tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(tiny_config(num_layers=1))
    cache = tmp_path / "jax-cache"
    first = _child(ckpt, cache)
    assert first["compiled_cache_hits"] == [False, False]  # prefill and decode compiled
    assert any(cache.iterdir()), "nothing was written to the cache directory"
    second = _child(ckpt, cache)
    assert second["compiled_cache_hits"] == [True, True]  # both loaded from disk, not compiled
    assert second["jax_cache_hits"] >= 2
    assert second["tokens"] == first["tokens"] and len(first["tokens"]) == 3  # the cached code computes the same


def test_enable_compile_cache_reports_an_unusable_directory(tmp_path):
    from grokcli import runtime

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="compilation cache disabled"):
        assert runtime.enable_compile_cache(blocker / "jax") is False
    assert runtime.compile_cache_dir() is None


@pytest.fixture
def restore_jax_cache_config():
    """configure() changes process-wide jax settings: put them back afterwards."""
    import jax

    from grokcli import runtime

    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    state = dict(runtime._state)
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    runtime._state.update(state)
    runtime._reset_jax_cache()


def test_configure_turns_the_cache_on_by_default_and_off_on_request(tmp_path, monkeypatch,
                                                                     restore_jax_cache_config):
    import jax

    from grokcli import runtime

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("GROK_NO_COMPILE_CACHE", raising=False)
    runtime.configure()
    assert runtime.compile_cache_dir() == tmp_path / "grokcli" / "jax"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "grokcli" / "jax")
    assert jax.config.jax_enable_compilation_cache is True
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # small programs are cached too

    runtime.configure(compile_cache=False)
    assert runtime.compile_cache_dir() is None and jax.config.jax_enable_compilation_cache is False

    monkeypatch.setenv("GROK_NO_COMPILE_CACHE", "1")
    runtime.configure(compile_cache=True)
    assert runtime.compile_cache_dir() is None and jax.config.jax_enable_compilation_cache is False


def test_no_compilation_after_warm_up_within_a_bucket(tiny_config, tiny_checkpoint):
    """Prompts of several lengths in one bucket, many tokens, different sampling: nothing recompiles."""
    import jax

    import grokcli

    cfg = tiny_config(sequence_len=128)
    model, _ = grokcli.load(tiny_checkpoint(cfg))
    compiles = []

    def on_duration(event: str, duration: float, **_kw) -> None:
        # Fires for every XLA compilation (and every persistent-cache load) of any jitted program.
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        grokcli.generate(model, None, [5, 6, 7], temperature=0.0, max_tokens=4, ignore_eos=True)
        assert compiles, "the warm-up compiled nothing: the counter is not counting"
        warm = len(compiles)
        runs = [
            ([9] * 1, dict(temperature=0.0)),
            ([3, 4, 5, 6, 7, 8, 9, 10, 11], dict(temperature=0.8, top_k=5, seed=1)),
            (list(range(3, 19)), dict(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=2)),
        ]
        for prompt, sampling in runs:  # 1, 9 and 16 tokens: all in the 16-token bucket
            out = grokcli.generate(model, None, prompt, max_tokens=60, ignore_eos=True, **sampling)
            assert len(out.token_ids) == 60
        assert len(compiles) == warm, f"{len(compiles) - warm} compilation(s) after warm-up"
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)


@pytest.mark.skipif(not GROK1_TOKENIZER.is_file(), reason=f"Grok-1 tokenizer not found at {GROK1_TOKENIZER}")
def test_grok_complete_says_compiling_then_loaded_compiled_code(tiny_config, tiny_checkpoint, tmp_path):
    """The CLI: first process compiles and says it caches; the second loads; --no-compile-cache does neither."""
    cfg = tiny_config(vocab_size=131072, emb_size=16, key_size=8, num_q_heads=2, num_kv_heads=1, num_layers=1)
    ckpt = tiny_checkpoint(cfg, tokenizer_path=GROK1_TOKENIZER)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"), "JAX_PLATFORMS": "cpu", "COLUMNS": "200"}
    env.pop("GROK_NO_COMPILE_CACHE", None)

    def grok(*extra):
        cmd = [sys.executable, "-c", "from grokcli.cli import main; main()", "complete", "-c", str(ckpt),
               "--temp", "0", "-n", "2", "--ignore-eos", *extra, "Hello"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    first = grok()
    assert "cached for next time" in first.stderr and "loaded compiled code" not in first.stderr
    assert any((tmp_path / "xdg-cache" / "grokcli" / "jax").iterdir())
    second = grok()
    assert second.stderr.count("loaded compiled code") == 2 and "cached for next time" not in second.stderr
    assert second.stdout == first.stdout
    off = grok("--no-compile-cache")
    assert "compile cache off" in off.stderr and "loaded compiled code" not in off.stderr
    assert off.stdout == first.stdout
