"""Prompt caches: the KV cache of a model's last request, kept for the next request that shares
a prefix of token ids, and saved to / loaded from a file (llama.cpp's `--prompt-cache`).

    cache = PromptCache()
    grokcli.generate(model, tok, transcript, prompt_cache=cache)           # prefills everything
    grokcli.generate(model, tok, transcript + more, prompt_cache=cache)    # prefills only `more`

The engine takes the cache's device arrays for the request (they are updated in place) and puts
them back when the request ends, holding the prompt and every token it fed. Only one request
at a time may use a PromptCache.

A file holds one prompt's keys and values with a JSON header: the checkpoint's identity and the
token ids. Loading refuses another model's file and a corrupt or truncated one with
`PromptCacheError`; a file is used only by prompts that start with its tokens.

    FILE = MAGIC (8 bytes) | header length (u64 little-endian) | header (UTF-8 JSON) | k | v
    k, v: [layers, tokens, kv_heads, key_size] in the activation dtype, C order, no padding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PromptCacheError
from .fsutil import NotRegularFileError, atomic_write, open_regular_file

MAGIC = b"GROKKV\x00\x01"
FORMAT = "grokcli-prompt-cache"
VERSION = 1
MAX_HEADER_BYTES = 16 * 2**20  # a header with 8192 token ids is ~60 KB
_DTYPES = ("float32", "bfloat16", "float16")
_READ_BYTES = 64 * 2**20


@dataclasses.dataclass
class _Entry:
    """What a PromptCache holds between requests."""

    model: weakref.ref  # the Model whose KV this is
    ids: tuple[tuple[int, ...], ...]  # per cache row: the token ids its first positions hold
    prompt_lengths: tuple[int, ...]  # per row: how many of `ids` were the request's prompt
    cache: object = None  # a model.KVCache on the devices, or None while only `host` holds it
    host: tuple[np.ndarray, np.ndarray] | None = None  # (k, v) [layers, tokens, kv, key] read from a file
    source: Path | None = None  # the file it came from: its tokens must start every prompt


class PromptCache:
    """The KV cache of the last request, reused by a next request that shares a prefix."""

    def __init__(self, context: int | None = None) -> None:
        """`context`: run every request of this cache in a KV cache of at least this many positions
        (rounded up to a cache size), so a growing session never changes size and compiles once;
        each step then attends over all of them. None: the smallest size each request needs."""
        if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
            raise ValueError(f"context must be a positive integer or None, got {context!r}")
        self.context = context
        self._entry: _Entry | None = None

    @property
    def tokens(self) -> tuple[int, ...]:
        """The token ids whose keys and values are cached (first row), () when empty."""
        return self._entry.ids[0] if self._entry is not None and self._entry.ids else ()

    @property
    def positions(self) -> int:
        """KV positions per row of the cached arrays (0 when empty): the cache size in use."""
        entry = self._entry
        if entry is None:
            return 0
        return int(entry.cache.valid.shape[1]) if entry.cache is not None else len(entry.ids[0])

    def clear(self) -> None:
        """Drop the cached arrays (frees their device memory)."""
        self._entry = None

    # -- used by the engine ----------------------------------------------------------------

    def check_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> None:
        """Raise PromptCacheError when a loaded file's tokens do not start the prompt."""
        entry = self._entry
        if entry is None or entry.source is None:
            return
        saved = entry.ids[0]
        ids = list(prompt_ids[0])
        if len(prompt_ids) != 1 or len(ids) < len(saved) or ids[: len(saved)] != list(saved):
            have = common_prefix(saved, ids)
            raise PromptCacheError(
                f"prompt cache {entry.source} was saved for another prompt: its {len(saved)} tokens "
                f"are not the start of this prompt ({have} match); delete the file or use another")

    def take(self, model) -> _Entry | None:
        """Remove and return the entry when it belongs to `model` (the engine donates its arrays)."""
        entry, self._entry = self._entry, None
        if entry is None or entry.model() is not model:
            return None
        return entry

    def store(self, model, cache, ids: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> None:
        """Keep `cache` (a KVCache on the devices) whose rows hold `ids`."""
        self._entry = _Entry(weakref.ref(model), tuple(tuple(int(i) for i in row) for row in ids),
                             tuple(int(n) for n in prompt_lengths), cache)

    # -- files -----------------------------------------------------------------------------

    def save(self, path: str | Path, model) -> Path:
        """Write the last request's prompt (first row) keys and values to `path`, atomically."""
        entry = self._entry
        if entry is None or entry.model() is not model or entry.cache is None:
            raise PromptCacheError("nothing to save: the prompt cache holds no request of this model")
        n = entry.prompt_lengths[0]
        ids = entry.ids[0][:n]
        try:
            k = np.asarray(entry.cache.k[:, 0, :n])
            v = np.asarray(entry.cache.v[:, 0, :n])
        except RuntimeError as e:  # arrays spread over several processes
            raise PromptCacheError(f"cannot save a prompt cache here: {e}") from None
        header = {"format": FORMAT, "version": VERSION, "checkpoint": checkpoint_identity(model),
                  "tokens": list(ids), "dtype": str(k.dtype), "shape": list(k.shape)}
        digest = hashlib.sha256()
        for array in (k, v):
            digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
        header["sha256"] = digest.hexdigest()
        head = json.dumps(header, separators=(",", ":")).encode()

        def write(f):
            f.write(MAGIC + struct.pack("<Q", len(head)) + head)
            for array in (k, v):
                f.write(memoryview(np.ascontiguousarray(array)).cast("B"))

        try:
            return atomic_write(path, write)
        except OSError as e:
            raise PromptCacheError(f"cannot write prompt cache {path}: {e.strerror or e}") from None

    @classmethod
    def load(cls, path: str | Path, model) -> "PromptCache":
        """A PromptCache holding the prompt saved in `path`; PromptCacheError when it is not usable."""
        path = Path(path)
        ids, k, v = _read(path, model)
        cache = cls()
        cache._entry = _Entry(weakref.ref(model), (ids,), (len(ids),), host=(k, v), source=path)
        return cache


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(differ[0]) if differ.size else n


def checkpoint_identity(model) -> dict:
    """What makes two models' KV caches interchangeable: config, activation dtype, weight files.

    The weights are named by the sha256 of the checkpoint's manifest.json when it has one, else
    by the names, sizes and modification times of its tensor files (stat only: no file is read),
    so a checkpoint written again, even with the same config, is another model.
    """
    from .layout import MANIFEST_NAME, tensor_folder

    cfg = dataclasses.asdict(model.config)
    identity = {"config": cfg, "dtype": str(np.dtype(model.dtype))}
    root = getattr(model, "path", None)
    if root is None:
        raise PromptCacheError("this model was not loaded from a checkpoint directory: its prompt cache "
                               "cannot name the weights it belongs to")
    root = Path(root)
    manifest = root / MANIFEST_NAME
    digest = hashlib.sha256()
    if manifest.is_file():
        with open_regular_file(manifest) as f:
            digest.update(f.read(64 * 2**20))
        identity["weights"] = "manifest:" + digest.hexdigest()
    else:
        for entry in sorted(os.scandir(tensor_folder(root)), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                digest.update(f"{entry.name} {st.st_size} {st.st_mtime_ns}\n".encode())
        identity["weights"] = "files:" + digest.hexdigest()
    return identity


def _bad(path: Path, why: str) -> PromptCacheError:
    return PromptCacheError(f"prompt cache {path} is not usable: {why}")


def _read(path: Path, model) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    try:
        with open_regular_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            start = f.read(len(MAGIC) + 8)
            if len(start) < len(MAGIC) + 8 or start[: len(MAGIC)] != MAGIC:
                raise _bad(path, "not a grokcli prompt cache file")
            (head_len,) = struct.unpack("<Q", start[len(MAGIC):])
            if head_len > min(MAX_HEADER_BYTES, size - len(start)):
                raise _bad(path, "truncated or corrupt (header length out of range)")
            try:
                header = json.loads(f.read(head_len).decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise _bad(path, "corrupt header") from None
            ids, shape, dtype, sha = _check_header(path, header, model)
            itemsize = np.dtype(dtype).itemsize
            nbytes = int(np.prod(shape)) * itemsize
            if size != len(start) + head_len + 2 * nbytes:
                raise _bad(path, f"truncated or corrupt ({size} bytes, the header describes "
                                 f"{len(start) + head_len + 2 * nbytes})")
            digest = hashlib.sha256()
            arrays = []
            for _ in range(2):
                array = np.empty(shape, dtype)
                view = memoryview(array).cast("B")
                done = 0
                while done < nbytes:
                    got = f.readinto(view[done: done + _READ_BYTES])
                    if not got:
                        raise _bad(path, "truncated while reading")
                    done += got
                digest.update(view)
                arrays.append(array)
    except NotRegularFileError:
        raise _bad(path, "not a regular file") from None
    except FileNotFoundError:
        raise PromptCacheError(f"prompt cache not found: {path}") from None
    except OSError as e:
        raise _bad(path, e.strerror or str(e)) from None
    if digest.hexdigest() != sha:
        raise _bad(path, "corrupt (checksum mismatch)")
    return ids, arrays[0], arrays[1]


def _check_header(path: Path, header, model):
    cfg = model.config
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _bad(path, "not a grokcli prompt cache file")
    if header.get("version") != VERSION:
        raise _bad(path, f"version {header.get('version')!r}; this grokcli reads version {VERSION}")
    mine = checkpoint_identity(model)
    theirs = header.get("checkpoint")
    if theirs != mine:
        what = ("another activation dtype" if isinstance(theirs, dict) and theirs.get("config") == mine["config"]
                and theirs.get("weights") == mine["weights"] else "another model")
        raise PromptCacheError(f"prompt cache {path} was made for {what}, not {model.path}; delete it or use another file")
    ids = header.get("tokens")
    if (not isinstance(ids, list) or not 1 <= len(ids) <= cfg.sequence_len
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg.vocab_size for i in ids)):
        raise _bad(path, "corrupt token ids")
    dtype = header.get("dtype")
    if dtype not in _DTYPES:
        raise _bad(path, f"unknown dtype {dtype!r}")
    shape = (cfg.num_layers, len(ids), cfg.num_kv_heads, cfg.key_size)
    if header.get("shape") != list(shape):
        raise _bad(path, f"shape {header.get('shape')!r}, expected {list(shape)}")
    sha = header.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise _bad(path, "no checksum")
    if dtype == "bfloat16":
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    return tuple(ids), shape, dtype, sha


__all__ = ["PromptCache", "PromptCacheError", "common_prefix", "checkpoint_identity", "MAGIC", "FORMAT", "VERSION"]
