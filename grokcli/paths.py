"""Where grokcli keeps things on the user's machine (XDG locations, overridable by environment)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .errors import CheckpointError, UsageError
from .layout import TENSOR_FOLDER, is_checkpoint_dir

MODEL_NAMES = ("demo", "grok-1")  # the named models: --model NAME


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


@dataclasses.dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a model and its tokenizer will be read from, and how that was decided."""

    checkpoint: Path
    tokenizer: Path | None  # an explicit tokenizer file, else None (the loader looks in the directory)
    source: str  # "--checkpoint", "--model demo", "--model PATH", "default"


def resolve_checkpoint(checkpoint: str | Path | None = None, model: str | None = None,
                       tokenizer: str | Path | None = None) -> ResolvedCheckpoint:
    """The checkpoint directory every command uses: a named model, a directory, or the default.

    `model` is a named model ("demo", "grok-1") or, as llama.cpp and mlx-lm users type it, a
    checkpoint directory. Raises UsageError (naming the option) for what cannot be right, before
    anything is read.
    """
    if model is not None and checkpoint is not None:
        raise UsageError("give either --model or --checkpoint (GROK_CHECKPOINT), not both", option="--model")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise UsageError(f"tokenizer file not found: {tokenizer} (--tokenizer)", option="--tokenizer")
    tok = Path(tokenizer) if tokenizer is not None else None
    if model == "demo":
        path = demo_model_dir()
        if not is_checkpoint_dir(path):
            raise CheckpointError(f"the demo model is not installed in this copy of grokcli (expected "
                                  f"{path}/{TENSOR_FOLDER}); reinstall grokcli or use --checkpoint")
        return ResolvedCheckpoint(path, tok, "--model demo")
    if model is not None and model != "grok-1":
        as_path = Path(model).expanduser()
        if not (as_path.is_dir() or os.sep in model or model.startswith(".")):
            raise UsageError(f"unknown --model {model!r}: choose one of {', '.join(MODEL_NAMES)}, "
                             "or give a checkpoint directory", option="--model")
        return ResolvedCheckpoint(_checked_dir(as_path, "--model"), tok, "--model PATH")
    if checkpoint is not None:
        return ResolvedCheckpoint(_checked_dir(Path(checkpoint).expanduser(), "--checkpoint"), tok, "--checkpoint")
    path = default_checkpoint_dir()
    if not path.exists():
        raise UsageError(
            f"no checkpoint at {path}: get Grok-1 with `grok download` (or pass --checkpoint DIR), "
            "or try the demo model: grok complete --model demo \"Once upon a time\"", option="--checkpoint")
    return ResolvedCheckpoint(_checked_dir(path, "--checkpoint"), tok, "default")


def _checked_dir(path: Path, option: str) -> Path:
    if not path.exists():
        raise UsageError(f"checkpoint directory not found: {path} does not exist ({option} / GROK_CHECKPOINT)",
                         option=option)
    if not path.is_dir():
        raise UsageError(f"not a directory: {path} ({option} expects the directory that holds {TENSOR_FOLDER}/)",
                         option=option)
    if not is_checkpoint_dir(path):
        hint = " (did you mean its parent?)" if path.name == TENSOR_FOLDER else ""
        raise UsageError(f"{path} is not a Grok-1 checkpoint directory: no {TENSOR_FOLDER}/ inside{hint}",
                         option=option)
    return path
