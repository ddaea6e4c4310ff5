"""What a request asks of the sampler: `SamplingParams`, validated on construction, and
`sampling_params()`, which builds one from a base and keyword overrides.

Plain Python (no jax), so `import grokcli` stays fast. The device-side samplers that apply these
settings are in `samplers.py`.
"""

from __future__ import annotations

import dataclasses
import math

from .errors import InvalidParameterError

# Bounds that keep a typo (--top-k 1e20, -n 10**12) a clear error instead of an overflow later.
_MAX_TOP_K = 1 << 20
_MAX_TOKENS = 1 << 24


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Validated on construction."""

    temperature: float = 0.8  # 0 means greedy argmax
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    top_p: float = 1.0  # nucleus: smallest set whose probability reaches top_p; 1 disables
    min_p: float = 0.0  # drop tokens less likely than min_p x the top token's probability; 0 disables
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output; 1 disables
    seed: int = 0  # same seed, parameters and batch position give the same tokens; rows draw independently
    max_tokens: int = 256  # at most this many new tokens
    stop: tuple[str, ...] = ()  # generation ends before any of these strings
    ignore_eos: bool = False  # keep going past the end-of-sequence token
    logprobs: int = 0  # also return the chosen token's logprob and this many top alternatives

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check("temperature", _is_number(self.temperature) and self.temperature >= 0,
               f"temperature must be a number >= 0, got {self.temperature!r}")
        _check("top_k", _is_int(self.top_k) and 0 <= self.top_k <= _MAX_TOP_K,
               f"top_k must be an integer in [0, {_MAX_TOP_K}], got {self.top_k!r}")
        _check("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check("min_p", _is_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        _check("repetition_penalty", _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        _check("seed", _is_int(self.seed) and 0 <= self.seed < 2**32,
               f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        _check("max_tokens", _is_int(self.max_tokens) and 1 <= self.max_tokens <= _MAX_TOKENS,
               f"max_tokens must be an integer in [1, {_MAX_TOKENS}], got {self.max_tokens!r}")
        _check("stop", all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check("logprobs", _is_int(self.logprobs) and 0 <= self.logprobs <= 20,
               f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(field: str, ok: bool, message: str) -> None:
    if not ok:
        raise InvalidParameterError(message, option=field)


def sampling_params(params: SamplingParams | None = None, **overrides) -> SamplingParams:
    """A SamplingParams from an optional base and keyword overrides (unknown names are an error)."""
    base = params or SamplingParams()
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}")
    return dataclasses.replace(base, **overrides)
