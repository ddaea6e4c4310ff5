"""Prove a checkpoint directory is complete and intact: files, sizes, SHA-256, structure, tokenizer.

Each file is read once, sequentially, in large chunks into a per-thread buffer: every chunk goes
to SHA-256 as it arrives and the restricted unpickler parses the same stream as a cursor over it
(it reads the few hundred bytes of pickle opcodes and skips the payloads), so nothing from a file
runs and memory stays at one buffer per worker whatever the file sizes. Files are hashed in
parallel threads (hashlib and readinto release the GIL). The result is a report object; the CLI
renders it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from .config import GROK_1, ModelConfig, load_config
from .layout import (CONFIG_NAME, MANIFEST_NAME, SHA256SUMS_NAME, TENSOR_NAME, TOKENIZER_NAME, tensor_folder,
                     tensor_relpath)
from .download import (MAX_FILES, TOKENIZER_SHA256, Manifest, ManifestEntry, read_manifest, read_sha256sums,
                       write_manifest)
from .errors import CheckpointError, GrokError, UsageError
from .fsutil import NotRegularFileError, open_regular_file
from .params import LAYER_PARAMS, ParamSpec, param_specs
from .tokenizer import MAX_TOKENIZER_BYTES

# Bytes per read. Each chunk is copied from the page cache and then hashed: at 1 MiB it is still in
# the CPU cache when SHA-256 reads it. Measured here (2 vCPUs, warm page cache): 1.30 GB per
# CPU-second at 1 MiB vs 0.87 at 16 MiB; syscalls cost nothing at either size.
CHUNK = 1 << 20
_REPORT_EVERY = 16 << 20  # progress callback granularity (bytes)

# Names a checkpoint directory may hold besides its tensors and tokenizer.
_KNOWN_FILES = {CONFIG_NAME, MANIFEST_NAME, SHA256SUMS_NAME, TOKENIZER_NAME}

MAX_ROWS_PER_CHECK = 32  # missing/extra rows listed one by one; the rest become one summary row
_GLOBAL_LEAVES = 2  # embed, final_norm
# File systems whose "files" are kernel interfaces (reading /proc/self/mem aborts, pagemap never ends).
_KERNEL_FS_ROOTS = ("/proc", "/sys", "/dev")


class VerifyUsageError(UsageError):
    """The verification asked for cannot be done as requested (e.g. --write-manifest over a manifest)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint (or, when not `fatal`, worth a warning)."""

    check: str  # missing | unreadable | extra | size | sha256 | structure | unsafe | values | tokenizer | manifest | config
    path: str  # file, relative to the checkpoint directory
    param: str | None  # the parameter the file holds ("params/.../w (layer 3 moe/linear)"), if any
    message: str  # what is wrong, in words
    fatal: bool = True


@dataclasses.dataclass(frozen=True)
class VerifyProgress:
    """A snapshot of a running verification, passed to the progress callback."""

    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Everything `verify_checkpoint` found."""

    directory: Path
    quick: bool  # existence and sizes only
    manifest: str | None  # what the hashes were checked against ("manifest.json (xai-org/grok-1@abc)"), or None
    integrity_proven: bool  # every expected file's SHA-256 matched a published or recorded hash
    files_expected: int  # files the config requires (tensors + tokenizer)
    files_checked: int  # files read (0 with --quick)
    bytes_read: int
    seconds: float
    problems: tuple[Problem, ...]  # failures and warnings, in file order
    notes: tuple[str, ...] = ()  # informational lines (e.g. manifest written)

    @property
    def failures(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.fatal)

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if not p.fatal)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {
            "directory": str(self.directory), "ok": self.ok, "quick": self.quick,
            "manifest": self.manifest, "integrity_proven": self.integrity_proven,
            "files_expected": self.files_expected, "files_checked": self.files_checked,
            "bytes_read": self.bytes_read, "seconds": round(self.seconds, 3),
            "gb_per_s": round(self.bytes_read / self.seconds / 1e9, 3) if self.seconds > 0 else None,
            "failures": [_problem_json(p) for p in self.failures],
            "warnings": [_problem_json(p) for p in self.warnings],
            "notes": list(self.notes),
        }


def _problem_json(p: Problem) -> dict:
    return {"check": p.check, "path": p.path, "param": p.param, "message": p.message}


# -- reading a file once: hash and parse from the same chunks ---------------------------------


class _FiniteScan:
    """Counts NaN/Inf in one float payload of a file as its bytes stream past (f32 or bf16).

    A value is non-finite when its exponent bits are all ones; the payload may start at any
    offset, so an element split across two chunks is carried over.
    """

    _KINDS = {"float32": ("<u4", 0x7F800000), "bfloat16": ("<u2", 0x7F80)}

    def __init__(self, start: int, length: int, kind: str):
        self.start, self.end, self.kind = start, start + length, kind
        self._dtype, self._mask = self._KINDS[kind]
        self._item = np.dtype(self._dtype).itemsize
        self._carry = b""
        self.count = 0
        self.seen = 0

    def feed(self, pos: int, view: memoryview) -> None:
        """Take the part of `view` (the stream's bytes from offset `pos`) inside this payload."""
        lo, hi = max(self.start, pos), min(self.end, pos + len(view))
        if lo >= hi:
            return
        data = view[lo - pos:hi - pos]
        self.seen += len(data)
        if self._carry:
            need = self._item - len(self._carry)
            self._carry += bytes(data[:need])
            data = data[need:]
            if len(self._carry) == self._item:
                self._count(self._carry)
                self._carry = b""
        whole = len(data) // self._item * self._item
        if whole:
            self._count(data[:whole])
        if whole < len(data):
            self._carry = bytes(data[whole:])

    def _count(self, data) -> None:
        bits = np.frombuffer(data, dtype=self._dtype)
        self.count += int(np.count_nonzero((bits & self._mask) == self._mask))

    @property
    def complete(self) -> bool:
        return self.seen == self.end - self.start


class _HashingFile:
    """A read-only, forward-only file over one sequential pass of `CHUNK`-sized `readinto`s.

    Every chunk goes to SHA-256 as it arrives. The restricted unpickler (`read_header`) uses this
    as its seekable file: its forward seeks over payloads just move a cursor through the chunks,
    so the file is read exactly once, whether or not it parses. A payload skipped with a length
    in `float_payloads` (length -> "float32"/"bfloat16") is scanned for NaN/Inf on the way.
    Reads stop at `limit` bytes whatever the file claims (a sparse or growing file).
    """

    def __init__(self, f, size: int, buf: bytearray, on_bytes: Callable[[int], None], limit: int | None = None,
                 float_payloads: dict[int, str] | None = None):
        self._f, self._size, self._on_bytes = f, size, on_bytes
        self._limit = size if limit is None else min(size, limit)
        self._buf, self._view = buf, memoryview(buf)
        self._base = 0  # stream offset of buf[0]
        self._n = 0  # valid bytes in buf
        self._pos = 0  # the reader's position
        self.sha = hashlib.sha256()
        self.bytes_read = 0
        self._unreported = 0
        self._float_payloads = float_payloads or {}
        self.scans: dict[int, _FiniteScan] = {}  # payload offset -> scan

    def _fill(self) -> bool:
        self._base += self._n
        want = min(len(self._buf), self._limit - self._base)
        self._n = (self._f.readinto(self._view[:want]) or 0) if want > 0 else 0
        if not self._n:
            return False
        chunk = self._view[:self._n]
        self.sha.update(chunk)
        for scan in self.scans.values():
            scan.feed(self._base, chunk)
        self.bytes_read += self._n
        self._unreported += self._n
        if self._unreported >= _REPORT_EVERY:
            self._on_bytes(self._unreported)
            self._unreported = 0
        return True

    def read(self, k: int = -1) -> bytes:
        if k is None or k < 0:
            k = max(0, self._size - self._pos)
        parts = []
        while k > 0:
            if self._pos < self._base:
                raise OSError("backward seek past the read buffer")
            if self._pos >= self._base + self._n and not self._fill():
                break
            if self._pos >= self._base + self._n:
                continue  # still skipping forward
            lo = self._pos - self._base
            take = min(k, self._n - lo)
            parts.append(self._view[lo:lo + take].tobytes())
            self._pos += take
            k -= take
        return b"".join(parts)

    def readline(self, limit: int = -1) -> bytes:
        out = bytearray()
        while limit < 0 or len(out) < limit:
            c = self.read(1)
            out += c
            if not c or c == b"\n":
                break
        return bytes(out)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        new = base + offset
        kind = self._float_payloads.get(new - self._pos) if new > self._pos else None
        if kind is not None and self._pos not in self.scans:
            scan = self.scans[self._pos] = _FiniteScan(self._pos, new - self._pos, kind)
            if self._pos < self._base + self._n:  # the payload's first bytes are already in the buffer
                scan.feed(self._base, self._view[:self._n])
        self._pos = new
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def drain(self) -> None:
        """Hash whatever the parser did not read (up to the limit)."""
        while self._fill():
            pass
        if self._unreported:
            self._on_bytes(self._unreported)
            self._unreported = 0


@dataclasses.dataclass
class _FileResult:
    sha256: str | None = None  # None when the file was not hashed in full
    bytes_read: int = 0
    problems: list = dataclasses.field(default_factory=list)
    data: bytes | None = None  # kept only for the (small) tokenizer


_local = threading.local()


def _buffer() -> bytearray:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(CHUNK)
    return buf


def _kernel_fs_devices() -> set[int]:
    devs = set()
    for root in _KERNEL_FS_ROOTS:
        try:
            devs.add(os.stat(root).st_dev)
        except OSError:
            pass
    return devs


def _under_kernel_fs(real: str) -> bool:
    return any(real == r or real.startswith(r + "/") for r in _KERNEL_FS_ROOTS)


def _kernel_file(path: Path, st: os.stat_result) -> str | None:
    """Where `path` really is when that is a kernel interface (/proc, /sys, /dev), else None."""
    real = os.path.realpath(path)
    if _under_kernel_fs(real) or st.st_dev in _kernel_fs_devices():
        return real
    return None


def _float_payloads(spec: ParamSpec | None) -> dict[int, str]:
    """Payload lengths of the float arrays `spec` stores (the parser skips payloads of >= 4 KiB)."""
    if spec is None:
        return {}
    if spec.quantized:
        return {math.prod(spec.scales_shape) * 2: "bfloat16"}
    return {math.prod(spec.shape) * 4: "float32"}


def _nonfinite(header, stream: _HashingFile, fd: int) -> list[tuple[str, int]]:
    """(what, count) for each float array of a parsed leaf holding NaN/Inf."""
    arrays = [("scales", header.scales)] if header.quantized else [("values", header.array)]
    out = []
    for what, arr in arrays:
        kind = "bfloat16" if str(arr.dtype) == "bfloat16" else "float32" if arr.dtype == np.float32 else None
        if kind is None:
            continue
        if isinstance(arr.data, (bytes, bytearray, memoryview)):
            scan = _FiniteScan(0, len(arr.data), kind)
            scan.feed(0, memoryview(arr.data).cast("B"))
        else:
            scan = stream.scans.get(arr.data.offset)
            if scan is None or not scan.complete or scan.kind != kind:
                # Not seen in the pass (an unexpected layout): read just this payload once more.
                scan = _FiniteScan(arr.data.offset, arr.data.length, kind)
                pos, end = arr.data.offset, arr.data.offset + arr.data.length
                while pos < end and (piece := os.pread(fd, min(CHUNK, end - pos), pos)):
                    scan.feed(pos, memoryview(piece))
                    pos += len(piece)
        if scan.count:
            out.append((f"{what} {kind} {list(arr.shape)}", scan.count))
    return out


def _read_file(path: Path, rel: str, spec: ParamSpec | None, keep: bool,
               on_bytes: Callable[[int], None], limit: int | None = None) -> _FileResult:
    """Hash one file and, for a tensor file, parse and check its structure, in a single read.

    Regular files only (opened without blocking, checked on the open descriptor), never a kernel
    file; at most `limit` bytes are read, and a file is hashed only when read to its end. What goes
    wrong (an I/O error included) is a problem in the result, never an exception.
    """
    res = _FileResult()
    param = _param_label(spec)
    real = os.path.realpath(path)
    if _under_kernel_fs(real):  # decided by name first: a kernel file is never opened
        res.problems.append(Problem("unsafe", rel, param, f"refused: it is {real}, a kernel file"))
        return res
    try:
        with open_regular_file(path) as f:
            _read_open_file(f, path, rel, spec, keep, on_bytes, limit, res)
    except NotRegularFileError:
        res.problems.append(Problem("missing", rel, param, "not a regular file (a FIFO, device or folder)"))
    except OSError as e:
        verb = "cannot read" if res.bytes_read == 0 else f"read failed after {res.bytes_read:,} bytes"
        res.problems.append(Problem("unreadable", rel, param, f"{verb}: {e.strerror or e}"))
        res.sha256, res.data = None, None
    return res


def _read_open_file(f, path: Path, rel: str, spec: ParamSpec | None, keep: bool,
                    on_bytes: Callable[[int], None], limit: int | None, res: _FileResult) -> None:
    from .checkpoint import read_header, validate_leaf

    param = _param_label(spec)
    st = os.fstat(f.fileno())
    if where := _kernel_file(path, st):
        res.problems.append(Problem("unsafe", rel, param, f"refused: it is {where}, a kernel file"))
        return
    size = st.st_size
    if keep:  # the tokenizer: small, and SentencePiece wants the bytes
        if size > MAX_TOKENIZER_BYTES:
            res.problems.append(Problem("size", rel, param, f"{size:,} bytes, larger than any tokenizer "
                                        f"({MAX_TOKENIZER_BYTES:,} at most)"))
            return
        data = f.read(size)
        on_bytes(len(data))
        res.sha256, res.bytes_read, res.data = hashlib.sha256(data).hexdigest(), len(data), data
        return
    stream = _HashingFile(f, size, _buffer(), on_bytes, limit, _float_payloads(spec))
    try:
        if spec is not None:
            try:
                header = read_header(stream, rel)
                validate_leaf(header, spec, rel)
                for what, count in _nonfinite(header, stream, f.fileno()):
                    res.problems.append(Problem("values", rel, param, f"{count:,} NaN/Inf value(s) in its {what}"))
            except CheckpointError as e:
                text = str(e).removeprefix(f"{rel}: ").removeprefix(f"{rel} ({spec.path}): ")
                kind = "unsafe" if "refused" in text else "structure"
                res.problems.append(Problem(kind, rel, param, text))
            except OSError:
                raise
            except Exception as e:  # noqa: BLE001 - a config mismatch or parser surprise is a finding, not a crash
                res.problems.append(Problem("structure", rel, param, f"{type(e).__name__}: {e}"))
        stream.drain()
    finally:
        res.bytes_read = stream.bytes_read
    if stream.bytes_read == size:
        res.sha256 = stream.sha.hexdigest()


def _param_label(spec: ParamSpec | None) -> str | None:
    return None if spec is None else f"{spec.path} ({spec.where})"


# -- the checks -------------------------------------------------------------------------------


def _load_manifest(directory: Path, expected: list[str], problems: list[Problem]) -> tuple[Manifest | None, str | None]:
    path = directory / MANIFEST_NAME
    sums = directory / SHA256SUMS_NAME
    # A manifest lists the checkpoint's files and a few more (config.json, a model card): one
    # that lists far more is not this checkpoint's, and is refused before any table is built.
    cap = len(expected) + 64
    name = MANIFEST_NAME if os.path.lexists(path) else SHA256SUMS_NAME
    try:
        if os.path.lexists(path):
            m = read_manifest(path, max_entries=cap)
            where = f"{MANIFEST_NAME} ({m.repo_id}@{(m.revision or '?')[:12]})" if m.repo_id else MANIFEST_NAME
            return m, where
        if os.path.lexists(sums):
            return _align_paths(read_sha256sums(sums, max_entries=cap), expected), SHA256SUMS_NAME
    except CheckpointError as e:
        problems.append(Problem("manifest", name, None, str(e).split(": ", 1)[-1]))
    return None, None


def _align_paths(manifest: Manifest, expected: list[str]) -> Manifest:
    """Map sha256sum paths written from another root ("grok-1/ckpt-0/tensor..") onto ours."""
    want = set(expected)
    by_tail = {}
    for p in expected:
        by_tail.setdefault(p.rsplit("/", 1)[-1], []).append(p)
    out = []
    for e in manifest.files:
        path = e.path
        if path not in want:
            path = next((p for p in by_tail.get(path.rsplit("/", 1)[-1], ()) if path.endswith("/" + p)), path)
        out.append(dataclasses.replace(e, path=path))
    return dataclasses.replace(manifest, files=tuple(out))


def _extra_files(directory: Path, expected: set[str], listed: set[str], limit: int = MAX_FILES) -> tuple[list[str], bool]:
    """Files that neither the config nor the manifest accounts for (hidden files and folders aside).

    Looks at no more than `limit` directory entries; the flag says whether it stopped there.
    """
    extra, seen = [], 0
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        seen += len(dirs) + len(files)
        if seen > limit:
            return extra, True
        for name in sorted(files):
            if name.startswith("."):
                continue
            rel = Path(root, name).relative_to(directory).as_posix()
            if rel not in expected and rel not in listed and rel not in _KNOWN_FILES:
                extra.append(rel)
    return extra, False


def _check_tokenizer(rel: str, data: bytes, sha: str, cfg: ModelConfig) -> list[Problem]:
    from .tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_bytes(data)
    except Exception as e:  # noqa: BLE001 - a damaged model can make SentencePiece or our wrapper raise anything
        text = str(e) if isinstance(e, GrokError) else f"not a usable SentencePiece model ({type(e).__name__})"
        return [Problem("tokenizer", rel, "tokenizer", text)]
    out = []
    if tok.vocab_size != cfg.vocab_size:
        out.append(Problem("tokenizer", rel, "tokenizer",
                           f"has {tok.vocab_size} pieces, the model's vocab_size is {cfg.vocab_size}"))
    if cfg == GROK_1 and sha != TOKENIZER_SHA256:
        out.append(Problem("tokenizer", rel, "tokenizer",
                           f"not the Grok-1 tokenizer: sha256 {sha}, expected {TOKENIZER_SHA256}"))
    return out


def _count_tensor_files(directory: Path, limit: int) -> int:
    """Tensor files in ckpt-0/, counting no further than `limit` (a bounded scan, nothing opened)."""
    n = 0
    try:
        with os.scandir(tensor_folder(directory)) as it:
            for entry in it:
                if TENSOR_NAME.fullmatch(entry.name):
                    n += 1
                    if n >= limit:
                        break
    except OSError:
        pass
    return n


def _capped(problems: list[Problem], check: str, what: str) -> list[Problem]:
    """Keep MAX_ROWS_PER_CHECK rows of one check; the rest become one summary row."""
    rows = [p for p in problems if p.check == check]
    if len(rows) <= MAX_ROWS_PER_CHECK:
        return problems
    keep = set(map(id, rows[:MAX_ROWS_PER_CHECK]))
    out = [p for p in problems if p.check != check or id(p) in keep]
    last = rows[MAX_ROWS_PER_CHECK]
    out.append(Problem(check, "...", None, f"and {len(rows) - MAX_ROWS_PER_CHECK:,} more {what}, "
                       f"from {last.path}", fatal=last.fatal))
    return out


def default_jobs() -> int:
    """All the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def verify_checkpoint(directory: str | Path, *, jobs: int | None = None, quick: bool = False,
                      fail_on_extra: bool = False, write_manifest_file: bool = False,
                      on_progress: Callable[[VerifyProgress], None] | None = None) -> VerifyReport:
    """Check a checkpoint directory against its config and manifest; never raises for what it finds.

    Raises CheckpointError when `directory` is not a directory, ConfigError for an unreadable
    config.json, VerifyUsageError for `write_manifest_file` where a manifest exists.
    The manifest must cover config.json when there is one (its values change the model).
    """
    start = time.monotonic()
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory" if directory.exists()
                              else f"{directory} does not exist")
    cfg = load_config(directory)
    has_config = os.path.lexists(directory / CONFIG_NAME)
    if write_manifest_file and os.path.lexists(directory / MANIFEST_NAME):
        raise VerifyUsageError(f"{directory / MANIFEST_NAME} already exists; "
                               "remove it first to record a new one with --write-manifest")
    if write_manifest_file and quick:
        raise VerifyUsageError("--write-manifest needs the hashes: it cannot be combined with --quick")

    # Before anything is built per layer: the config must describe no more files than are there.
    n_tensors = _GLOBAL_LEAVES + len(LAYER_PARAMS) * cfg.num_layers
    on_disk = _count_tensor_files(directory, n_tensors + 1)
    if has_config and n_tensors > 2 * on_disk + 64:
        problem = Problem("config", CONFIG_NAME, None,
                          f"describes {cfg.num_layers:,} layers, {n_tensors:,} tensor files; {tensor_folder(directory).name}/ "
                          f"holds {on_disk:,}: not this checkpoint's config (or a download that barely started)")
        return VerifyReport(directory, quick, None, False, n_tensors + 1, 0, 0, time.monotonic() - start, (problem,))

    from .checkpoint.writer import expected_file_size

    specs = param_specs(cfg)
    tensors = {tensor_relpath(i): spec for i, spec in enumerate(specs)}
    expected = [*tensors, TOKENIZER_NAME]
    problems: list[Problem] = []
    notes: list[str] = []
    manifest, manifest_where = _load_manifest(directory, expected, problems)
    listed = manifest.by_path() if manifest else {}
    # config.json is part of the claim whenever it exists or the manifest lists it.
    covered = [*expected, CONFIG_NAME] if has_config or CONFIG_NAME in listed else expected
    if manifest is not None and has_config and CONFIG_NAME not in listed:
        problems.append(Problem("manifest", manifest_where.split(" ")[0], None,
                                f"does not cover {CONFIG_NAME}, whose values change the model; record a manifest "
                                "that lists it (--write-manifest from a known-good copy)"))

    # 1. completeness, and 2. sizes (against the manifest, and against the format for tensors).
    present: dict[str, int] = {}
    read_limit: dict[str, int] = {}  # rel -> bytes worth reading when the size is already wrong
    sizes_by_spec: dict[tuple, int] = {}
    for rel in [*covered, *(p for p in listed if p not in tensors and p not in covered)]:
        spec = tensors.get(rel)
        param = _param_label(spec) if spec else ("tokenizer" if rel == TOKENIZER_NAME else None)
        try:
            st = os.stat(directory / rel)
        except OSError:
            why = "" if rel in tensors or rel == TOKENIZER_NAME else " (listed in the manifest)"
            problems.append(Problem("missing", rel, param, f"file is missing{why}"))
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(Problem("missing", rel, param, "not a regular file (a FIFO, device or folder)"))
            continue
        present[rel] = st.st_size
        entry = listed.get(rel)
        want = None
        if spec is not None:
            key = (spec.shape, spec.quantized, spec.row_blocks)
            want = sizes_by_spec.get(key) or sizes_by_spec.setdefault(key, expected_file_size(spec))
        if entry is not None and entry.size >= 0 and entry.size != st.st_size:
            problems.append(Problem("size", rel, param, f"{st.st_size:,} bytes, the manifest says {entry.size:,}"))
            read_limit[rel] = (want if want is not None else 0) + CHUNK
        elif want is not None and st.st_size != want:
            problems.append(Problem("size", rel, param, f"{st.st_size:,} bytes, the format requires {want:,} "
                                    f"for {'int8' if spec.quantized else 'float32'} {list(spec.shape)}"))
            read_limit[rel] = want + CHUNK
    problems = _capped(problems, "missing", "files missing")
    extra, truncated = _extra_files(directory, set(covered), set(listed))
    for rel in extra:
        problems.append(Problem("extra", rel, None, "unexpected file", fatal=fail_on_extra))
    problems = _capped(problems, "extra", "unexpected files")
    if truncated:
        problems.append(Problem("extra", ".", None, f"more than {MAX_FILES:,} entries: stopped looking for extra files",
                                fatal=fail_on_extra))
    if manifest is None and not any(p.check == "manifest" for p in problems):
        problems.append(Problem("manifest", MANIFEST_NAME, None,
                                "no manifest.json or SHA256SUMS: integrity not proven, structure checks only "
                                "(record one from a known-good copy with --write-manifest)", fatal=False))

    files_checked = bytes_read = 0
    integrity = False
    if not quick:
        # 3. hashes and 4. structure, one read per file; 5. the tokenizer. A file whose size is
        # already wrong is read only as far as its structure check needs (never a sparse 1 TB).
        order = sorted(present, key=lambda r: -min(present[r], read_limit.get(r, present[r])))
        total = sum(min(present[r], read_limit.get(r, present[r])) for r in order)
        lock = threading.Lock()
        done = {"bytes": 0, "files": 0}

        def on_bytes(n: int) -> None:
            with lock:
                done["bytes"] += n
                if on_progress:
                    on_progress(VerifyProgress(done["bytes"], total, done["files"], len(order)))

        def work(rel: str) -> _FileResult:
            if rel in read_limit and rel not in tensors and rel != TOKENIZER_NAME:
                res = _FileResult()  # a wrong size says it all; nothing to parse
            else:
                res = _read_file(directory / rel, rel, tensors.get(rel), rel == TOKENIZER_NAME, on_bytes,
                                 read_limit.get(rel))
            with lock:
                done["files"] += 1
                if on_progress:
                    on_progress(VerifyProgress(done["bytes"], total, done["files"], len(order)))
            return res

        with ThreadPoolExecutor(max_workers=max(1, jobs or default_jobs()), thread_name_prefix="grok-verify") as pool:
            results = dict(zip(order, pool.map(work, order)))

        by_sha: dict[str, str] = {e.sha256: e.path for e in listed.values() if e.sha256}
        hashes: dict[str, str] = {}
        for rel in order:
            res = results[rel]
            files_checked += 1
            bytes_read += res.bytes_read
            problems.extend(res.problems)
            if res.data is not None:
                problems.extend(_check_tokenizer(rel, res.data, res.sha256, cfg))
            if res.sha256 is None or rel in read_limit:
                continue
            hashes[rel] = res.sha256
            param = _param_label(tensors.get(rel)) or ("tokenizer" if rel == TOKENIZER_NAME else None)
            entry = listed.get(rel)
            if entry is not None and entry.sha256 and entry.sha256 != res.sha256:
                twin = by_sha.get(res.sha256)
                hint = f"; its content is {twin} (files swapped or renamed?)" if twin and twin != rel else ""
                problems.append(Problem("sha256", rel, param, f"sha256 {res.sha256[:16]}... does not match "
                                        f"the manifest's {entry.sha256[:16]}...{hint}"))
        integrity = (manifest is not None and all(rel in present for rel in covered)
                     and all(listed.get(rel) is not None and listed[rel].sha256 == hashes.get(rel) for rel in covered))
        if manifest is not None and not integrity and not any(
                p.check in ("sha256", "missing", "size", "unreadable", "manifest") for p in problems):
            unlisted = [rel for rel in covered if rel not in listed or not listed[rel].sha256]
            if unlisted:
                problems.append(Problem("manifest", manifest_where.split(" ")[0], None,
                                        f"has no hash for {len(unlisted)} required file(s), e.g. {unlisted[0]}"))
        if write_manifest_file:
            if any(p.fatal for p in problems):
                notes.append("manifest not written: the checkpoint has failures")
            else:
                entries = tuple(ManifestEntry(rel, present[rel], hashes[rel], None) for rel in covered)
                write_manifest(directory, Manifest(entries, origin="local"))
                notes.append(f"wrote {directory / MANIFEST_NAME} ({len(entries)} files)")

    order_key = {rel: i for i, rel in enumerate(covered)}
    problems.sort(key=lambda p: (not p.fatal, order_key.get(p.path, len(order_key)), p.path))
    return VerifyReport(directory, quick, manifest_where, integrity, len(covered), files_checked, bytes_read,
                        time.monotonic() - start, tuple(problems), tuple(notes))
