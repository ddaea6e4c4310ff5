"""The on-disk layout of a checkpoint directory: every file and folder name, declared once.

    DIR/ckpt-0/tensor00000_000 ... tensorNNNNN_000   one pickle per parameter leaf (the release)
    DIR/tokenizer.model                               SentencePiece model
    DIR/config.json                                   only for non-Grok-1 models of the architecture
    DIR/manifest.json                                 path, size, sha256 of every file, repo, revision
    DIR/SHA256SUMS                                    accepted by verify when there is no manifest
"""

from __future__ import annotations

import re
from pathlib import Path

TENSOR_FOLDER = "ckpt-0"  # the folder the loader reads tensors from
TOKENIZER_NAME = "tokenizer.model"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "manifest.json"
SHA256SUMS_NAME = "SHA256SUMS"

# The release names its files tensor{leaf:05d}_{shard:03d}; it ships shard 000 only.
TENSOR_NAME = re.compile(r"tensor(\d{5})_000")
ANY_SHARD_TENSOR_NAME = re.compile(r"tensor\d{5}_\d{3}")


def tensor_name(index: int) -> str:
    """The file name of leaf `index` ("tensor00042_000")."""
    return f"tensor{index:05d}_000"


def tensor_relpath(index: int) -> str:
    """The path of leaf `index` relative to the checkpoint directory ("ckpt-0/tensor00042_000")."""
    return f"{TENSOR_FOLDER}/{tensor_name(index)}"


def tensor_folder(checkpoint_dir: str | Path) -> Path:
    """The `ckpt-0/` folder of a checkpoint directory (not checked)."""
    return Path(checkpoint_dir) / TENSOR_FOLDER


def tensor_index(name: str) -> int | None:
    """The leaf index of a tensor file name, or None for any other name."""
    m = TENSOR_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether `path` holds a `ckpt-0/` folder."""
    return tensor_folder(path).is_dir()
