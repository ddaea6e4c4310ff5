"""Shared pytest fixtures.

- `shared_dir`: the read-only shared data folder (`<repo>/../shared`); skips when absent.
- `fixtures_dir`: `shared_dir / "fixtures"` (the official-format tiny checkpoints).
- `tiny_config`: factory for small ModelConfigs (`tiny_config(num_layers=12, num_experts=4)`).
- `tiny_checkpoint`: factory writing a random checkpoint of a ModelConfig into tmp_path with
  the release-format writer; returns the checkpoint directory (holding ckpt-0/ and config.json).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def grok_command() -> tuple[list[str], dict]:
    """The installed `grok` entry point and an environment without GROK_* settings, as a user runs it."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("GROK_")}
    env["NO_COLOR"] = "1"
    script = Path(sys.executable).parent / "grok"
    return ([str(script)] if script.exists() else [sys.executable, "-m", "grokcli.cli"]), env
SHARED_DIR = REPO_ROOT.parent / "shared"

# A small Grok-1-shaped config: GQA, 8 experts with 2 active, 2 layers. Keys match ModelConfig.
TINY_CONFIG = dict(
    vocab_size=256, pad_token=0, eos_token=2, sequence_len=64,
    embedding_multiplier_scale=8.0, output_multiplier_scale=0.5773502691896257,
    emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=2, num_layers=2,
    widening_factor=2, attn_output_multiplier=0.25, num_experts=8, num_selected_experts=2,
)


@pytest.fixture(scope="session", autouse=True)
def isolated_user_dirs(tmp_path_factory):
    """Keep the user's cache, data and state directories out of reach of every test.

    The CLI enables the compile cache under the user cache dir and keeps REPL history under the
    state dir; tests (and the subprocesses they start, which inherit the environment) use a
    session temp dir instead. GROK_CHECKPOINT is cleared so no user checkpoint is picked up.
    """
    root = tmp_path_factory.mktemp("user-dirs")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
            mp.setenv(var, str(root / var.lower()))
        mp.delenv("GROK_CHECKPOINT", raising=False)
        yield root


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder next to the repository; the test is skipped when it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DIR} (it sits next to the repository)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    """The official-format fixtures (tiny-a, tiny-b); skipped when absent."""
    path = shared_dir / "fixtures"
    if not path.is_dir():
        pytest.skip(f"official fixtures not found at {path}")
    return path


@pytest.fixture
def tiny_config():
    """Factory: `tiny_config(**overrides) -> ModelConfig`, starting from TINY_CONFIG."""
    from grokcli.config import ModelConfig

    def make(**overrides) -> ModelConfig:
        return ModelConfig(**{**TINY_CONFIG, **overrides})

    return make


@pytest.fixture
def tiny_checkpoint(tmp_path: Path):
    """Factory: `tiny_checkpoint(cfg, seed=0, name="ckpt", params=None, tokenizer_path=None)`.

    Writes `params` (default: `random_params(cfg, seed)`) in the release's layout under
    `tmp_path / name` and returns that directory (ckpt-0/ and config.json inside). The params
    written are available as `tiny_checkpoint.params[name]` for comparisons.
    """
    from grokcli.checkpoint import random_params, write_checkpoint

    written: dict[str, dict] = {}

    def make(cfg, seed: int = 0, name: str = "ckpt", params: dict | None = None,
             tokenizer_path=None) -> Path:
        if params is None:
            params = random_params(cfg, seed)
        out = write_checkpoint(tmp_path / name, params, cfg, tokenizer_path=tokenizer_path)
        written[name] = params
        return out

    make.params = written
    return make


def config_replace(cfg, **changes):
    """`dataclasses.replace` for ModelConfig (re-validates the result)."""
    return dataclasses.replace(cfg, **changes)
