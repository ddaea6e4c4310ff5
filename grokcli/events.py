"""What generation yields: small immutable records the CLI and the REPL render."""

from __future__ import annotations

import dataclasses

FINISH_REASONS = ("stop", "length", "eos", "interrupted")


@dataclasses.dataclass(frozen=True)
class TopLogprob:
    """One alternative at a sampling step."""

    token_id: int
    text: str  # the token's piece as text ("" without a tokenizer)
    logprob: float


@dataclasses.dataclass(frozen=True)
class StatusEvent:
    """Something the user may want to see while no tokens flow (compiling, prefilling)."""

    # "truncated" | "preparing" (loading or compiling a step: which one is known only after) |
    # "compiling" (a compile, the compile cache being off) | "compiled" (done: says which) | "prefill"
    kind: str
    message: str  # e.g. "compiled (first run, cached for next time)" or "loaded compiled code"
    cache_hit: bool | None = None  # for "compiled": whether the persistent compile cache served it
    seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token of one batch row, with the text it adds to the stream."""

    row: int  # index of the prompt in the batch (0 for a single prompt)
    token_id: int
    text: str  # text delta: may be "" (incomplete UTF-8, held back for a stop string)
    logprob: float | None = None  # log-probability of the chosen token (when logprobs were asked)
    top_logprobs: tuple[TopLogprob, ...] | None = None  # the top-N alternatives (when asked)


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """Timings and counts of one request."""

    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    total_s: float
    peak_memory_bytes: int | None  # device (or process) peak, None when unknown
    cached_tokens: int = 0  # prompt tokens whose KV came from a prompt cache (not prefilled)


@dataclasses.dataclass(frozen=True)
class DoneEvent:
    """The last event of a row: why it finished, what it produced, and its stats."""

    row: int
    finish_reason: str  # one of FINISH_REASONS
    text: str  # the complete generated text (stop string excluded)
    token_ids: tuple[int, ...]  # every generated token id (the stop string's tokens included)
    stats: GenerationStats
    # Text released when the row ended that no TokenEvent carried (held back for a possible stop
    # string or an unfinished character, then freed by EOS or an interruption). Renderers print
    # it after the row's last token: the row's TokenEvent texts + final_delta == text.
    final_delta: str = ""


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished completion, as `generate` returns it."""

    prompt: str | None
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    stats: GenerationStats
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[TopLogprob, ...], ...] | None = None
