"""The generation engine: parity with the reference's greedy runs, cache vs recompute, sampling,
stop strings, EOS, batches, interruption and errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grokcli
from grokcli import model as model_fn
from grokcli import samplers
from grokcli.checkpoint import random_params, write_checkpoint
from grokcli.config import ModelConfig
from grokcli.events import DoneEvent, StatusEvent, TokenEvent
from grokcli.loader import Model
from grokcli.sampling_params import SamplingParams

from conftest import TINY_CONFIG

# --- models shared by the module (loading and compiling once keeps the suite fast) -------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = ModelConfig(**{**TINY_CONFIG, "sequence_len": 128})
    path = write_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt", random_params(cfg, 7), cfg)
    model, tok = grokcli.load(path)
    assert tok is None
    return model


@pytest.fixture(scope="module")
def tiny_a(fixtures_dir):
    return grokcli.load(fixtures_dir / "tiny-a")


def run(model, tok, prompt, **kw):
    events = list(grokcli.stream_generate(model, tok, prompt, **kw))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    done = [e for e in events if isinstance(e, DoneEvent)]
    assert len(done) == 1 and events[-1] is done[0]
    return tokens, done[0]


# --- acceptance: the reference's greedy continuations ------------------------------------------


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_greedy_reproduces_reference_from_ids(fixtures_dir, name):
    path = fixtures_dir / name
    greedy = json.loads((path / "greedy.json").read_text())
    model, _ = grokcli.load(path)
    done = grokcli.generate(model, None, greedy["prompt_ids"], temperature=0, ignore_eos=True,
                            max_tokens=len(greedy["generated_ids"]))
    assert list(done.token_ids) == greedy["generated_ids"]
    assert done.finish_reason == "length"


def test_greedy_from_text_streams_reference_text(tiny_a, fixtures_dir):
    model, tok = tiny_a
    greedy = json.loads((fixtures_dir / "tiny-a" / "greedy.json").read_text())
    tokens, done = run(model, tok, greedy["prompt_text"], temperature=0, ignore_eos=True,
                       max_tokens=len(greedy["generated_ids"]))
    assert [e.token_id for e in tokens] == greedy["generated_ids"]
    assert "".join(e.text for e in tokens) == greedy["text"] == done.text
    s = done.stats
    assert s.prompt_tokens == len(greedy["prompt_ids"]) and s.generated_tokens == len(greedy["generated_ids"])
    assert s.time_to_first_token_s > 0 and s.decode_tokens_per_s > 0 and s.prefill_tokens_per_s > 0
    assert s.peak_memory_bytes and s.peak_memory_bytes > 0


# --- the KV cache path against full recomputation ------------------------------------------------


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_q_heads=3, num_kv_heads=3, num_experts=4, num_selected_experts=1, num_layers=3),
    dict(emb_size=48, key_size=16, num_q_heads=6, num_kv_heads=2, num_experts=4),
])
def test_cache_matches_full_recompute_over_64_steps(tmp_path, overrides):
    cfg = ModelConfig(**{**TINY_CONFIG, "sequence_len": 128, **overrides})
    model, _ = grokcli.load(write_checkpoint(tmp_path / "c", random_params(cfg, 11), cfg))
    prompt = [5, 17, 99, 3, 42]
    steps = 64
    done = grokcli.generate(model, None, prompt, temperature=0, ignore_eos=True, max_tokens=steps)
    # Recompute: the full causal forward over a fixed-size, right-padded sequence; future
    # positions cannot influence earlier ones, so one compiled shape serves every step.
    full = jax.jit(lambda p, t: model_fn.logits(p, t, cfg, dtype=model.dtype))
    seq = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, len(prompt) + steps), np.int32)
        padded[0, :len(seq)] = seq
        seq.append(int(np.asarray(full(model.params, padded))[0, len(seq) - 1].argmax()))
    assert list(done.token_ids) == seq[len(prompt):]


# --- sampling -----------------------------------------------------------------------------------


def test_top_k_one_equals_greedy(tiny):
    greedy = grokcli.generate(tiny, None, [9, 8, 7], temperature=0, max_tokens=12, ignore_eos=True)
    top1 = grokcli.generate(tiny, None, [9, 8, 7], temperature=1.5, top_k=1, seed=3, max_tokens=12,
                            ignore_eos=True)
    assert top1.token_ids == greedy.token_ids


def test_same_seed_repeats_and_other_seed_differs(tiny):
    kw = dict(temperature=1.0, max_tokens=24, ignore_eos=True)
    a = grokcli.generate(tiny, None, [1, 2, 3], seed=1, **kw)
    b = grokcli.generate(tiny, None, [1, 2, 3], seed=1, **kw)
    c = grokcli.generate(tiny, None, [1, 2, 3], seed=2, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_batch_rows_get_independent_streams(tiny):
    a, b = grokcli.generate_batch(tiny, None, [[1, 2, 3], [1, 2, 3]], temperature=1.0, seed=5,
                                  max_tokens=24, ignore_eos=True)
    assert a.token_ids != b.token_ids


def _np_top_p(logits, top_p):
    """Oracle: the smallest set of most likely tokens whose probability reaches top_p."""
    order = np.argsort(-logits)
    p = np.exp(logits[order] - logits.max())
    p /= p.sum()
    n = int(np.searchsorted(np.cumsum(p), top_p - 1e-6) + 1)
    keep = np.zeros(logits.shape, bool)
    keep[order[:n]] = True
    return keep


def test_top_p_keeps_the_smallest_nucleus():
    rng = np.random.default_rng(0)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        logits = rng.normal(size=(4, 50)).astype(np.float32) * 2
        got = np.asarray(samplers.top_p_filter(jnp.asarray(logits), jnp.full((4,), top_p))) > samplers.FILTERED
        for row in range(4):
            np.testing.assert_array_equal(got[row], _np_top_p(logits[row], top_p))


def test_top_k_and_min_p_filters():
    logits = jnp.asarray([[3.0, 2.0, 1.0, 0.0, -1.0]])
    kept = np.asarray(samplers.top_k_filter(logits, jnp.asarray([2]))) > samplers.FILTERED
    assert kept.tolist() == [[True, True, False, False, False]]
    # p(token)/p(top) = exp(logit - 3): 1, .37, .14, .05, .02 -> min_p 0.1 keeps the first three.
    kept = np.asarray(samplers.min_p_filter(logits, jnp.asarray([0.1]))) > samplers.FILTERED
    assert kept.tolist() == [[True, True, True, False, False]]


def test_sampling_draws_follow_the_filtered_distribution():
    logits = jnp.tile(jnp.asarray([[2.0, 1.5, 1.0, -3.0]]), (2000, 1))
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    params = samplers.row_params([SamplingParams(temperature=1.0, top_k=2)] * 2000)
    seen = jnp.zeros((2000, 4), bool)
    draws = np.asarray(samplers.sample(logits, keys, params, seen))
    assert set(draws.tolist()) == {0, 1}
    expected = np.exp(0.5) / (1 + np.exp(0.5))  # p(0 | top-2)
    assert abs((draws == 0).mean() - expected) < 0.04


def test_repetition_penalty_lowers_seen_tokens():
    logits = jnp.asarray([[2.0, -2.0, 2.0, -2.0]])
    seen = jnp.asarray([[True, True, False, False]])
    out = np.asarray(samplers.apply_repetition_penalty(logits, seen, jnp.asarray([2.0])))
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_repetition_penalty_changes_greedy_choice(tiny):
    plain = grokcli.generate(tiny, None, [9, 8, 7], temperature=0, max_tokens=30, ignore_eos=True)
    penalised = grokcli.generate(tiny, None, [9, 8, 7], temperature=0, max_tokens=30, ignore_eos=True,
                                 repetition_penalty=5.0)
    def repeats(ids):
        return len(ids) - len(set(ids))
    assert repeats(penalised.token_ids) < repeats(plain.token_ids)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(min_p=2), dict(max_tokens=0), dict(repetition_penalty=0),
                                 dict(stop=[""]), dict(logprobs=-1)])
def test_invalid_sampling_values_fail_before_work(tiny, bad):
    with pytest.raises(ValueError):
        grokcli.stream_generate(tiny, None, [1, 2], **bad)


def test_logprobs_are_log_probabilities(tiny):
    tokens, _ = run(tiny, None, [4, 5, 6], temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    for e in tokens:
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token_id == e.token_id  # greedy picks the most likely
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


# --- stop strings and EOS -------------------------------------------------------------------------


def test_stop_string_across_token_boundaries(tiny_a):
    model, tok = tiny_a
    kw = dict(temperature=0, ignore_eos=True, max_tokens=16)
    full = grokcli.generate(model, tok, "The answer to life the universe and everything is of course", **kw)
    ids = full.token_ids
    # A stop string made of the end of token 3's text and the start of token 4's.
    piece3, piece4 = tok.decode(list(ids[:4])), tok.decode(list(ids[:5]))
    stop = piece3[-2:] + piece4[len(piece3):len(piece3) + 2]
    assert len(stop) == 4
    cut = full.text.find(stop)
    tokens, done = run(model, tok, "The answer to life the universe and everything is of course", stop=[stop], **kw)
    assert done.finish_reason == "stop"
    assert done.text == full.text[:cut] == "".join(e.text for e in tokens)
    assert stop not in done.text


def test_eos_ends_generation(tiny):
    probe = grokcli.generate(tiny, None, [9, 8, 7], temperature=0, max_tokens=6, ignore_eos=True)
    eos = probe.token_ids[3]
    first = probe.token_ids.index(eos)
    cfg = dataclasses.replace(tiny.config, eos_token=eos)
    with_eos = Model(config=cfg, params=tiny.params, dtype=tiny.dtype)
    stopped = grokcli.generate(with_eos, None, [9, 8, 7], temperature=0, max_tokens=6)
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == probe.token_ids[:first]
    ignored = grokcli.generate(with_eos, None, [9, 8, 7], temperature=0, max_tokens=6, ignore_eos=True)
    assert ignored.token_ids == probe.token_ids and ignored.finish_reason == "length"


# --- batches --------------------------------------------------------------------------------------


def test_batch_equals_single_and_rows_finish_independently(tiny):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)]
    events = list(grokcli.stream_generate_batch(tiny, None, prompts, params))
    done = {e.row: e for e in events if isinstance(e, DoneEvent)}
    per_row = {r: [e.token_id for e in events if isinstance(e, TokenEvent) and e.row == r] for r in range(3)}
    for r, (prompt, p) in enumerate(zip(prompts, params)):
        alone = grokcli.generate(tiny, None, prompt, p)
        assert done[r].token_ids == alone.token_ids == tuple(per_row[r])
        assert len(alone.token_ids) == p.max_tokens
    # Row 1 finished after 3 tokens: none of its tokens come after its DoneEvent.
    row1_done = events.index(done[1])
    assert not any(isinstance(e, TokenEvent) and e.row == 1 for e in events[row1_done:])
    assert any(isinstance(e, TokenEvent) and e.row == 0 for e in events[row1_done:])


# --- context, interruption -------------------------------------------------------------------------


def test_prompt_too_long_says_the_lengths(tiny):
    prompt = list(range(3, 3 + tiny.config.sequence_len))
    with pytest.raises(grokcli.PromptTooLongError, match=rf"{len(prompt)} tokens.*{tiny.config.sequence_len}"):
        grokcli.generate(tiny, None, prompt)


def test_truncate_left_keeps_the_newest_tokens(tiny):
    prompt = [3 + (i % 200) for i in range(tiny.config.sequence_len + 10)]
    events = list(grokcli.stream_generate(tiny, None, prompt, truncate="left", temperature=0, max_tokens=4))
    notes = [e for e in events if isinstance(e, StatusEvent) and e.kind == "truncated"]
    assert notes and "truncated" in notes[0].message
    done = events[-1]
    kept = done.stats.prompt_tokens
    assert kept < len(prompt)
    alone = grokcli.generate(tiny, None, prompt[-kept:], temperature=0, max_tokens=4)
    assert alone.token_ids == done.token_ids


def test_context_is_the_full_sequence_len(tiny):
    """Unlike the reference's 1024-token cut, a prompt near the context end still generates."""
    n = tiny.config.sequence_len - 3
    done = grokcli.generate(tiny, None, [3 + (i % 200) for i in range(n)], temperature=0, max_tokens=50,
                            ignore_eos=True)
    assert done.stats.prompt_tokens == n
    assert 1 <= len(done.token_ids) <= 4 and done.finish_reason == "length"


def test_closing_the_stream_early_leaves_the_model_usable(tiny):
    expected = grokcli.generate(tiny, None, [7, 7, 7], temperature=0, max_tokens=8, ignore_eos=True)
    stream = grokcli.stream_generate(tiny, None, [7, 7, 7], temperature=0, max_tokens=200, ignore_eos=True)
    got = [e.token_id for e, _ in zip((e for e in stream if isinstance(e, TokenEvent)), range(3))]
    stream.close()
    assert tuple(got) == expected.token_ids[:3]
    again = grokcli.generate(tiny, None, [7, 7, 7], temperature=0, max_tokens=8, ignore_eos=True)
    assert again.token_ids == expected.token_ids


def test_keyboard_interrupt_finishes_with_interrupted(tiny):
    stream = grokcli.stream_generate(tiny, None, [7, 7, 7], temperature=0, max_tokens=200, ignore_eos=True)
    seen = 0
    for event in stream:
        if isinstance(event, TokenEvent):
            seen += 1
            if seen == 2:
                break
    done = stream.throw(KeyboardInterrupt)
    assert isinstance(done, DoneEvent) and done.finish_reason == "interrupted"
    assert len(done.token_ids) == 2
    with pytest.raises(StopIteration):
        next(stream)


def test_continuation_text_reads_on_from_the_prompt(tiny_a):
    """With continuation=True the text is what follows the prompt in decode(prompt + generated)."""
    model, tok = tiny_a
    prompt = "Once upon a time"
    kw = dict(temperature=1.0, seed=4, max_tokens=12, ignore_eos=True)
    plain = grokcli.generate(model, tok, prompt, **kw)
    cont = grokcli.generate(model, tok, prompt, continuation=True, **kw)
    assert cont.token_ids == plain.token_ids
    prompt_ids = tok.encode(prompt)
    whole = tok.decode(prompt_ids + list(cont.token_ids))
    assert cont.text == whole[len(tok.decode(prompt_ids)):]
    assert plain.text == tok.decode(list(plain.token_ids))
    starts_with_space = tok.id_to_piece(cont.token_ids[0]).startswith("\u2581")
    assert cont.text == (" " if starts_with_space else "") + plain.text


def test_eos_releases_text_held_for_a_stop_string(tiny_a):
    """Text held back as a possible stop-string start is released in DoneEvent.final_delta at EOS."""
    model, tok = tiny_a
    prompt = "The answer to life the universe and everything is of course"
    probe = grokcli.generate(model, tok, prompt, temperature=0, max_tokens=8, ignore_eos=True)
    eos = probe.token_ids[4]
    first = probe.token_ids.index(eos)
    before = tok.decode(list(probe.token_ids[:first]))
    stop = before[-3:] + "\u2603never"  # starts with the text's tail, never completes
    with_eos = Model(config=dataclasses.replace(model.config, eos_token=eos), params=model.params, dtype=model.dtype)
    tokens, done = run(with_eos, tok, prompt, temperature=0, max_tokens=8, stop=[stop])
    assert done.finish_reason == "eos"
    assert done.final_delta == before[-3:]
    assert "".join(e.text for e in tokens) + done.final_delta == done.text == before


def test_prompts_must_be_a_list_and_empty_prompts_are_prompt_errors(tiny):
    with pytest.raises(TypeError, match="list of prompts"):
        grokcli.stream_generate_batch(tiny, None, "hello")
    with pytest.raises(grokcli.PromptError, match="empty"):
        grokcli.generate(tiny, None, [])
    with pytest.raises(grokcli.PromptError, match="outside the vocabulary"):
        grokcli.generate(tiny, None, [1, 10**6])
    with pytest.raises(ValueError, match="seed"):
        grokcli.generate(tiny, None, [1, 2], seed=2**32)


def test_sampling_params_keep_their_old_import_path():
    from grokcli import sampling

    assert sampling.SamplingParams is SamplingParams is grokcli.SamplingParams
