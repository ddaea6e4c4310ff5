"""Chunked prefill, few compiled shapes, KV prefix reuse and prompt cache files.

Every reuse is checked against a fresh computation: a run without the cache (greedy ids equal,
log-probabilities within float noise) and, for the chunked prefill, the full causal forward.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import grokcli
from grokcli import generation, request_shape
from grokcli.checkpoint import random_params, write_checkpoint
from grokcli.config import ModelConfig
from grokcli.memory import MemoryPlanError
from grokcli.prompt_cache import PromptCache, PromptCacheError
from grokcli.repl import ReplSession
from grokcli.request_shape import batch_size, cache_sizes, fit_request
from grokcli.sampling_params import SamplingParams

from conftest import TINY_CONFIG

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig(**{**TINY_CONFIG, "sequence_len": 2048})
    return write_checkpoint(tmp_path_factory.mktemp("pc") / "ckpt", random_params(cfg, 3), cfg)


@pytest.fixture(scope="module")
def tiny(ckpt):
    return grokcli.load(ckpt)[0]


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 250, n).tolist()


class CompileCounter:
    """Counts jax's backend compiles (persistent-cache loads included) while active."""

    def __enter__(self):
        self.count = 0

        def on_duration(event, duration, **_kw):
            if event == "/jax/core/compile/backend_compile_duration":
                self.count += 1

        self._listener = on_duration
        jax.monitoring.register_event_duration_secs_listener(on_duration)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def top_logprobs(completion) -> np.ndarray:
    return np.array([[t.logprob for t in step] for step in completion.top_logprobs])


def assert_same(got, fresh):
    assert got.token_ids == fresh.token_ids
    np.testing.assert_allclose(top_logprobs(got), top_logprobs(fresh), atol=2e-5)


# --- shapes -------------------------------------------------------------------------------------


def test_request_shapes_come_from_small_fixed_sets():
    cfg = ModelConfig(**{**TINY_CONFIG, "sequence_len": 8192})
    assert cache_sizes(cfg) == (512, 2048, 8192)
    assert cache_sizes(dataclasses.replace(cfg, sequence_len=128)) == (128,)
    assert [batch_size(n) for n in (1, 2, 3, 5, 64)] == [1, 2, 4, 8, 64]
    shape = request_shape.request_shape(cfg, rows=3, prompt_tokens=300, max_tokens=256)
    assert (shape.batch, shape.prefill_chunk, shape.context) == (4, 128, 2048)  # 512 tokens a step in all
    assert request_shape.request_shape(cfg, rows=64, prefill_chunk=512).prefill_chunk == 16
    assert request_shape.request_shape(cfg, rows=2, prefill_chunk=8).prefill_chunk == 8
    assert request_shape.request_shape(cfg, prompt_tokens=100, max_tokens=100).context == 512
    assert request_shape.request_shape(cfg, prompt_tokens=100, max_tokens=100, min_context=2048).context == 2048
    assert request_shape.request_shape(cfg, prompt_tokens=1, max_tokens=None).context == 8192
    assert request_shape.request_shape(cfg, prompt_tokens=9000, max_tokens=9).context == 8192
    with pytest.raises(ValueError, match="prefill_chunk"):
        request_shape.request_shape(cfg, prefill_chunk=0)


def test_too_many_prompts_are_split_or_refused_before_any_work(tiny, monkeypatch):
    cfg = tiny.config
    big = fit_request(cfg, rows=1000, prompt_tokens=10, max_tokens=10)
    assert big.batch == request_shape.MAX_BATCH
    eight = request_shape.plan_request(cfg, dataclasses.replace(big, batch=8))
    free = eight.kv_cache_per_device + eight.activations_per_device
    assert fit_request(cfg, rows=1000, prompt_tokens=10, max_tokens=10, free_memory=free).batch == 8
    assert fit_request(cfg, rows=1000, prompt_tokens=10, max_tokens=10, free_memory=free - 1).batch == 4
    with pytest.raises(MemoryPlanError, match="one prompt"):
        fit_request(cfg, rows=1000, prompt_tokens=10, max_tokens=10, free_memory=1000)
    monkeypatch.setattr(generation, "free_host_memory", lambda: 1000)
    if jax.default_backend() == "cpu":
        with pytest.raises(MemoryPlanError):
            grokcli.stream_generate_batch(tiny, None, [[5, 6]] * 1000, max_tokens=4)


def test_more_prompts_than_a_batch_run_in_groups(tiny, monkeypatch):
    monkeypatch.setattr(request_shape, "MAX_BATCH", 2)
    prompts = [ids(n, n) for n in (3, 9, 4)]  # groups of 2 and 1
    batch = grokcli.generate_batch(tiny, None, prompts, max_tokens=5, logprobs=2, **GREEDY)
    for prompt, got in zip(prompts, batch):
        assert_same(got, grokcli.generate(tiny, None, prompt, max_tokens=5, logprobs=2, **GREEDY))
    batches = {key[1] for key in tiny.compiled if key[0] == "prefill"}
    assert batches <= {1, 2}


# --- chunked prefill ----------------------------------------------------------------------------


def test_chunked_prefill_matches_the_full_forward_and_one_prefill_serves_all_lengths(tiny):
    prompt = ids(150, 1)
    # The oracle: the first new token's log-probabilities from the plain causal forward, no cache.
    logits = tiny.logits(np.asarray([prompt]))[0, -1]
    expected = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    for chunk in (16, 64, None):
        out = grokcli.generate(tiny, None, prompt, max_tokens=6, logprobs=5, prefill_chunk=chunk, **GREEDY)
        first = out.top_logprobs[0]
        assert first[0].token_id == int(np.argmax(logits)) == out.token_ids[0]
        np.testing.assert_allclose([t.logprob for t in first], np.sort(expected)[::-1][:5], atol=2e-5)
        if chunk is not None:
            assert_same(out, grokcli.generate(tiny, None, prompt, max_tokens=6, logprobs=5, **GREEDY))
    with CompileCounter() as compiles:
        for n in (1, 15, 16, 17, 100, 400):
            grokcli.generate(tiny, None, ids(n, n), max_tokens=3, prefill_chunk=16, **GREEDY)
            grokcli.generate(tiny, None, ids(n, n), max_tokens=3, prefill_chunk=16, logprobs=3, **GREEDY)
    assert compiles.count == 0  # every length and logprobs on or off: the executables compiled above


def test_batch_rows_of_different_lengths_end_in_the_same_chunk(tiny):
    prompts = [ids(3, 4), ids(37, 5), ids(20, 6)]
    batch = grokcli.generate_batch(tiny, None, prompts, max_tokens=4, logprobs=3, prefill_chunk=16, **GREEDY)
    for prompt, got in zip(prompts, batch):
        assert_same(got, grokcli.generate(tiny, None, prompt, max_tokens=4, logprobs=3, **GREEDY))


# --- prefix reuse ---------------------------------------------------------------------------------


def test_reused_prefix_equals_a_fresh_run_for_turns_regen_and_undo(tiny):
    kw = dict(max_tokens=8, logprobs=4, **GREEDY)
    cache = PromptCache()
    base = ids(40, 7)
    first = grokcli.generate(tiny, None, base, prompt_cache=cache, **kw)
    assert first.stats.cached_tokens == 0
    assert cache.tokens == tuple(base) + first.token_ids[:-1]  # the last token was never fed
    turn = base + list(first.token_ids) + ids(10, 8)
    second = grokcli.generate(tiny, None, turn, prompt_cache=cache, **kw)
    assert second.stats.cached_tokens == len(base) + len(first.token_ids) - 1
    assert_same(second, grokcli.generate(tiny, None, turn, **kw))
    regen = grokcli.generate(tiny, None, turn, prompt_cache=cache, **kw)
    assert regen.stats.cached_tokens == len(turn) - 1
    assert_same(regen, second)
    undo = base + ids(5, 9)
    after_undo = grokcli.generate(tiny, None, undo, prompt_cache=cache, **kw)
    assert after_undo.stats.cached_tokens == len(base)
    assert_same(after_undo, grokcli.generate(tiny, None, undo, **kw))


def test_batch_rows_reuse_their_own_prefix(tiny):
    kw = dict(max_tokens=4, logprobs=2, **GREEDY)
    cache = PromptCache()
    prompts = [ids(12, 10), ids(30, 11)]
    firsts = grokcli.generate_batch(tiny, None, prompts, prompt_cache=cache, **kw)
    longer = [p + list(f.token_ids) + ids(6, 12 + i) for i, (p, f) in enumerate(zip(prompts, firsts))]
    seconds = grokcli.generate_batch(tiny, None, longer, prompt_cache=cache, **kw)
    for prompt, first, got, fresh in zip(prompts, firsts, seconds, grokcli.generate_batch(tiny, None, longer, **kw)):
        assert got.stats.cached_tokens == len(prompt) + len(first.token_ids) - 1
        assert_same(got, fresh)


def test_a_growing_session_compiles_only_in_its_first_turn_per_cache_size(tiny):
    cache = PromptCache()
    transcript = ids(30, 20)
    sizes, compiles_per_turn = [], []
    for turn in range(14):
        transcript += ids(40, 100 + turn)
        with CompileCounter() as compiles:
            out = grokcli.generate(tiny, None, transcript, prompt_cache=cache, max_tokens=8,
                                   temperature=0.7, seed=turn, logprobs=turn % 3, ignore_eos=True)
        transcript += list(out.token_ids)
        sizes.append(request_shape.request_shape(tiny.config, prompt_tokens=len(transcript), max_tokens=8).context)
        compiles_per_turn.append(compiles.count)
        assert out.stats.cached_tokens == (0 if turn == 0 else len(transcript) - len(out.token_ids) - 40 - 1)
    # Turns 1-10 stay in the 512-token cache; from turn 12 the session is in the 2048-token one.
    assert sizes[0] == 512 and sizes[-1] == 2048
    grown = sizes.index(2048) + 1  # the first turn that needed the bigger cache
    assert compiles_per_turn[1:grown] == [0] * (grown - 1)
    assert compiles_per_turn[grown + 1:] == [0] * (len(sizes) - grown - 1)
    fresh = grokcli.generate(tiny, None, transcript[:-8], max_tokens=8, temperature=0.7, seed=13, ignore_eos=True)
    assert fresh.token_ids == tuple(transcript[-8:])


def test_a_reserved_context_keeps_one_cache_size_from_the_first_turn(tiny):
    cache = PromptCache(context=2000)
    prompt = ids(20, 40)
    out = grokcli.generate(tiny, None, prompt, prompt_cache=cache, max_tokens=4, logprobs=2, **GREEDY)
    assert cache.positions == 2048  # rounded up to a cache size
    assert_same(out, grokcli.generate(tiny, None, prompt, max_tokens=4, logprobs=2, **GREEDY))
    with pytest.raises(ValueError, match="context"):
        PromptCache(context=0)


def test_repl_turns_prefill_only_their_new_text(tiny_a_model):
    model, tok = tiny_a_model
    done = []

    def stream(*args, **kwargs):
        for event in grokcli.stream_generate(*args, **kwargs):
            if isinstance(event, grokcli.DoneEvent):
                done.append(event)
            yield event

    session = ReplSession(model, tok, SamplingParams(temperature=0, max_tokens=6), stream=stream,
                          prompt_cache=PromptCache(), write=lambda s: None, info=lambda s: None, quiet=True)
    session.send("Once upon a time")
    session.send("there was a dragon who")
    session.regen()
    session.undo()
    session.send("a knight rode out")
    prompts = [len(tok.encode(session.render(session.turns[:-1], pending=session.turns[-1].input)))]
    cached = [d.stats.cached_tokens for d in done]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])
    assert done[2].stats.cached_tokens == done[2].stats.prompt_tokens - 1  # /regen: the same prompt
    fresh = grokcli.generate(model, tok, session.render(session.turns[:-1], pending=session.turns[-1].input),
                             temperature=0, max_tokens=6, continuation=True)
    assert fresh.token_ids == done[-1].token_ids and prompts[0] == done[-1].stats.prompt_tokens


@pytest.fixture(scope="module")
def tiny_a_model(fixtures_dir):
    return grokcli.load(fixtures_dir / "tiny-a")


# --- prompt cache files ------------------------------------------------------------------------------


def test_prompt_cache_file_skips_the_prefill_and_refuses_what_does_not_match(tiny, ckpt, tmp_path):
    kw = dict(max_tokens=6, logprobs=3, **GREEDY)
    prompt = ids(60, 30)
    cache = PromptCache()
    first = grokcli.generate(tiny, None, prompt, prompt_cache=cache, **kw)
    path = cache.save(tmp_path / "p.kv", tiny)
    loaded = PromptCache.load(path, tiny)
    assert loaded.tokens == tuple(prompt)
    again = grokcli.generate(tiny, None, prompt, prompt_cache=loaded, **kw)
    assert again.stats.cached_tokens == len(prompt) - 1
    assert_same(again, first)
    longer = prompt + ids(9, 31)
    extended = grokcli.generate(tiny, None, longer, prompt_cache=PromptCache.load(path, tiny), **kw)
    assert extended.stats.cached_tokens == len(prompt)
    assert_same(extended, grokcli.generate(tiny, None, longer, **kw))

    with pytest.raises(PromptCacheError, match="another prompt"):
        grokcli.stream_generate(tiny, None, ids(60, 32), prompt_cache=PromptCache.load(path, tiny))
    other_cfg = ModelConfig(**{**TINY_CONFIG, "sequence_len": 2048})
    other = grokcli.load(write_checkpoint(tmp_path / "other", random_params(other_cfg, 3), other_cfg))[0]
    with pytest.raises(PromptCacheError, match="another model"):
        PromptCache.load(path, other)  # same config and sizes, but not the same files

    data = path.read_bytes()
    for name, bad in (("truncated", data[:-100]), ("corrupt", data[:-50] + bytes(50)),
                      ("not a grokcli", b"hello world, not a cache" * 4), ("corrupt header", data[:16] + b"[" + data[17:])):
        broken = tmp_path / "broken.kv"
        broken.write_bytes(bad)
        with pytest.raises(PromptCacheError, match=name):
            PromptCache.load(broken, tiny)
    with pytest.raises(PromptCacheError, match="not found"):
        PromptCache.load(tmp_path / "missing.kv", tiny)
    with pytest.raises(PromptCacheError, match="not a regular file"):
        PromptCache.load(tmp_path, tiny)
    assert not list(tmp_path.glob(".p.kv.*"))  # the atomic write left no temp file


def test_grok_complete_prompt_cache_file(fixtures_dir, tmp_path, monkeypatch):
    """The CLI: the first run saves the file, the second skips the prefill, a mismatch is one error line."""
    from typer.testing import CliRunner

    from grokcli import cli

    for var in [v for v in __import__("os").environ if v.startswith("GROK_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "prompt.kv"

    def grok(*extra):
        return CliRunner().invoke(cli.app, ["complete", "-c", str(fixtures_dir / "tiny-a"), "--temp", "0", "-n", "4",
                                            "--ignore-eos", "--prompt-cache", str(path), "--prefill-chunk", "8",
                                            *extra], catch_exceptions=False)

    first = grok("Once upon a time there was")
    assert first.exit_code == 0, first.stderr
    assert "saved the prompt's KV cache" in first.stderr and path.is_file()
    second = grok("Once upon a time there was")
    assert second.exit_code == 0, second.stderr
    assert second.stdout == first.stdout and " cached)" in second.stderr and "saved" not in second.stderr
    other = grok("A completely different prompt")
    assert other.exit_code == 1 and "another prompt" in other.stderr and other.stdout == ""
    assert len([line for line in other.stderr.splitlines() if line.startswith("error")]) == 1
    assert "Traceback" not in other.stderr


def test_an_explicit_one_by_one_mesh_runs_the_default_code(ckpt, tiny):
    """--mesh 1x1 is the default layout: same executables (and persistent-cache entries), same tokens."""
    model = grokcli.load(ckpt, mesh="1x1")[0]
    assert model.mesh is None
    prompt = ids(9, 50)
    assert (grokcli.generate(model, None, prompt, max_tokens=3, **GREEDY).token_ids
            == grokcli.generate(tiny, None, prompt, max_tokens=3, **GREEDY).token_ids)
