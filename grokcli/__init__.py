"""grokcli: run xAI's Grok-1 (and any model of its architecture) from Python or the `grok` command."""

__version__ = "0.1.0"
