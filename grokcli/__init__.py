"""grokcli: run xAI's Grok-1 (and any model of its architecture) from Python or the `grok` command.

    model, tokenizer = grokcli.load("path/to/checkpoint")
    for event in grokcli.stream_generate(model, tokenizer, "The answer is", max_tokens=32):
        ...

Heavy modules (jax) are imported on first use, so `import grokcli` stays fast.
"""

from __future__ import annotations

import importlib

from .config import GROK_1, ModelConfig, load_config
from .errors import CheckpointError, ConfigError, GrokError, PromptError, PromptTooLongError, TokenizerError
from .events import Completion, DoneEvent, GenerationStats, StatusEvent, TokenEvent, TopLogprob
from .sampling_params import SamplingParams

__version__ = "0.1.0"

_LAZY = {
    "load": "loader",
    "Model": "loader",
    "stream_generate": "generation",
    "stream_generate_batch": "generation",
    "generate": "generation",
    "generate_batch": "generation",
    "enable_compile_cache": "runtime",
    "PromptCache": "prompt_cache",
    "PromptCacheError": "prompt_cache",
    "RequestShape": "request_shape",
}

__all__ = [
    "GROK_1", "ModelConfig", "load_config", "SamplingParams",
    "GrokError", "ConfigError", "CheckpointError", "TokenizerError", "PromptError", "PromptTooLongError",
    "Completion", "DoneEvent", "GenerationStats", "StatusEvent", "TokenEvent", "TopLogprob",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'grokcli' has no attribute {name!r}")
