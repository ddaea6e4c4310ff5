"""Error types with messages a user can act on; the CLI turns each into one line and an exit code.

Two kinds, told apart by type (never by parsing a message):
- `UsageError` and its subclasses: what was asked for is impossible; changing the command line or
  the call fixes it (exit code 2). `option` names the offending option or parameter when known.
- every other `GrokError`: something failed while doing the work (exit code 1).
"""

from __future__ import annotations


class GrokError(Exception):
    """Base class of every error grokcli raises on purpose."""

    exit_code = 1


class UsageError(GrokError, ValueError):
    """A request that cannot be satisfied as given: a bad option, parameter or prompt (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, *, option: str | None = None):
        super().__init__(message)
        self.option = option  # the option/parameter at fault ("--mesh", "temperature"), if known


class InvalidParameterError(UsageError):
    """A generation parameter out of range or of the wrong type; `option` is its field name."""


class ConfigError(GrokError, ValueError):
    """A model config is missing a field, has a bad value, or disagrees with the tensors."""


class CheckpointError(GrokError):
    """A checkpoint file is missing, truncated, unsafe, or not what the config requires."""


class TokenizerError(GrokError):
    """The tokenizer is missing, unreadable, or does not fit the model."""


class PromptError(UsageError):
    """A prompt cannot be used: empty, text without a tokenizer, token ids outside the vocabulary."""


class PromptTooLongError(PromptError):
    """A prompt does not fit in the context window with room for one new token."""


class PromptCacheError(GrokError):
    """A prompt cache file that cannot be used: another model or prompt, truncated or corrupt."""


class MemoryPlanError(GrokError):
    """The model will not fit the devices; the message carries the numbers."""


class DownloadError(GrokError):
    """A download failed: network, Hub, disk space or a file that is not what was advertised."""


class NativeBuildError(GrokError):
    """The native CPU kernel could not be built or loaded (grokcli falls back to XLA)."""


class CoordinatorError(GrokError):
    """Multi-host: the coordinator (process 0) could not be reached in time."""
