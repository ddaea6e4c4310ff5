"""Error types with messages a user can act on; the CLI turns each into one line and an exit code."""


class GrokError(Exception):
    """Base class of every error grokcli raises on purpose."""


class ConfigError(GrokError, ValueError):
    """A model config is missing a field, has a bad value, or disagrees with the tensors."""


class CheckpointError(GrokError):
    """A checkpoint file is missing, truncated, unsafe, or not what the config requires."""


class TokenizerError(GrokError):
    """The tokenizer is missing, unreadable, or does not fit the model."""


class PromptError(GrokError, ValueError):
    """A prompt cannot be used: empty, text without a tokenizer, token ids outside the vocabulary."""


class PromptTooLongError(PromptError):
    """A prompt does not fit in the context window with room for one new token."""
