"""Where grokcli keeps things on the user's machine (XDG locations, overridable by environment)."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_checkpoint_dir() -> Path:
    """The checkpoint directory used when none is given: $GROK_CHECKPOINT, else where `grok download` puts Grok-1."""
    env = os.environ.get("GROK_CHECKPOINT")
    return Path(env) if env else _xdg("XDG_DATA_HOME", ".local/share") / "grokcli" / "grok-1"


def cache_dir() -> Path:
    """Per-user cache (the JAX persistent compilation cache lives under it)."""
    return _xdg("XDG_CACHE_HOME", ".cache") / "grokcli"


def state_dir() -> Path:
    """Per-user state (REPL history)."""
    return _xdg("XDG_STATE_HOME", ".local/state") / "grokcli"


def demo_model_dir() -> Path:
    """The small demo model shipped inside the package (`--model demo`)."""
    return Path(__file__).parent / "demo"
