"""One prompt's host-side state while it generates: ids in, text deltas, stop strings, finish
reason and stats out. Knows nothing of devices; generation.py drives it one token at a time.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time

import jax

from .errors import PromptError, PromptTooLongError
from .events import DoneEvent, GenerationStats, TokenEvent, TopLogprob
from .sampling_params import SamplingParams


@dataclasses.dataclass
class Row:
    """Host-side state of one prompt."""

    index: int  # position in the caller's list of prompts (events carry it as `row`)
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: object | None
    detok: object | None
    stopper: object | None
    slot: int = 0  # row of the compiled batch it runs in
    cached: int = 0  # leading prompt tokens whose KV came from the prompt cache
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


def encode(tokenizer, prompt, vocab_size: int) -> list[int]:
    """A prompt (text or token ids) as checked token ids; PromptError when unusable."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise PromptError("a text prompt needs a tokenizer (or pass a list of token ids)")
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if not ids:
        raise PromptError("the prompt is empty: give at least one token")
    return ids


def fit_prompt(ids: list[int], context: int, max_tokens: int, truncate: str | None):
    """The prompt ids that fit the context (with room for one new token), and a note if cut."""
    if len(ids) + 1 <= context:
        return ids, None
    if truncate != "left":
        raise PromptTooLongError(
            f"prompt is {len(ids)} tokens but the context holds {context} (prompt + at least 1 new token); "
            f"shorten it or pass truncate='left' (--truncate left)")
    keep = max(context - max_tokens, context // 2, 1)
    return ids[-keep:], f"prompt truncated on the left from {len(ids)} to {keep} tokens to fit the {context}-token context"


def text_state(tokenizer, params: SamplingParams, continuation: bool):
    """A row's (detokenizer, stop matcher), or (None, None) without a tokenizer."""
    if tokenizer is None:
        return None, None
    from .stops import StopMatcher
    from .tokenizer import IncrementalDetokenizer

    return IncrementalDetokenizer(tokenizer, continuation), StopMatcher(list(params.stop))


class Times:
    """When a request started, began prefilling and had its first tokens."""

    def __init__(self, start: float):
        self.start = start
        self.prefill = start
        self.first: float | None = None
        self.prefilled = 0  # prompt tokens actually computed (not served from the prompt cache)


def advance(r: Row, token: int, lp_host, cfg, context: int) -> TokenEvent | None:
    """Add one sampled token to a row; sets its finish_reason when it is done."""
    if token == cfg.eos_token and not r.params.ignore_eos:
        r.finish_reason = "eos"
        return None
    r.token_ids.append(token)
    logprob = top = None
    if lp_host is not None and r.params.logprobs:
        logprob = float(lp_host[0][r.slot])
        ids, values = lp_host[1][r.slot][: r.params.logprobs], lp_host[2][r.slot][: r.params.logprobs]
        top = tuple(TopLogprob(int(i), r.tokenizer.token_text(int(i)) if r.tokenizer else "", float(v))
                    for i, v in zip(ids, values))
    delta = ""
    if r.detok is not None:
        delta, stopped = r.stopper.feed(r.detok.push(token))
        if stopped:
            r.finish_reason = "stop"
    if r.finish_reason is None:
        if len(r.token_ids) >= r.params.max_tokens or len(r.prompt_ids) + len(r.token_ids) >= context:
            r.finish_reason = "length"
    if r.finish_reason == "length" and r.detok is not None:
        delta += finish_text(r)
    r.text.append(delta)
    return TokenEvent(r.index, token, delta, logprob, top)


def finish_text(r: Row) -> str:
    """Text still held by the detokenizer and the stop matcher when a row ends."""
    tail, stopped = r.stopper.feed(r.detok.flush())
    if not stopped:
        tail += r.stopper.flush()  # may still complete an overlapping stop string
    if r.stopper.stopped and r.finish_reason in ("length", "eos"):
        r.finish_reason = "stop"  # the released text completed a stop string
    return tail


def done_event(r: Row, stats: GenerationStats) -> DoneEvent:
    """The row's last event (its remaining text released)."""
    final_delta = ""
    if r.finish_reason != "stop" and r.detok is not None:
        final_delta = finish_text(r)  # "" when advance already flushed at "length"
        r.text.append(final_delta)
    return DoneEvent(r.index, r.finish_reason, "".join(r.text), tuple(r.token_ids), stats, final_delta)


def row_stats(r: Row, times: Times) -> GenerationStats:
    """The row's timings and counts as of now."""
    now = time.perf_counter()
    first = times.first if times.first is not None else now
    prefill_s = max(first - times.prefill, 1e-9)
    decode_s = now - first
    n = len(r.token_ids)
    return GenerationStats(
        prompt_tokens=len(r.prompt_ids),
        generated_tokens=n,
        time_to_first_token_s=first - times.start,
        prefill_tokens_per_s=times.prefilled / prefill_s,
        decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        total_s=now - times.start,
        peak_memory_bytes=peak_memory_bytes(),
        cached_tokens=r.cached,
    )


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first local device, or the process's peak RSS on CPU."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
