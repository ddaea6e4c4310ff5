"""Fetch a Grok-1 checkpoint from the Hugging Face Hub into the layout the loader reads.

The bytes move through `huggingface_hub`'s own machinery (HEAD + GET with in-run `Range` resume and
retries, `HF_ENDPOINT`, `HF_TOKEN`, `hf_xet` when installed; 2.x dropped `hf_transfer`). This
module decides *what* to fetch and *where* it goes, checks disk space, and records a manifest; it
reports progress through a callback and prints nothing. huggingface_hub 2.x deletes a partial file
when a transfer fails for good, so across runs resumption is per file: complete files are kept.

Nothing from the Hub is trusted: every remote name is checked before anything is written (plain
relative paths only, see `relative_path_problem`); each file lands in a staging folder
(`DIR/.cache/grokcli-download/`), is hashed there (huggingface_hub offers no hook on the bytes, so
the finished temp file is read once more, from the page cache) and moves into place only when
its SHA-256 (LFS files) or git blob id (small files) matches what the Hub published; a mismatch
is fetched once more, then refused. The manifest records only hashes computed from the bytes on
disk, with the size and mtime they were computed at, so a later run trusts a file without
re-hashing it only while both are unchanged. A transfer that receives less than one
huggingface_hub block (10 MiB) in `stall_timeout` seconds is abandoned with a message.

Local layout (what `grokcli.checkpoint` reads)::

    DIR/ckpt-0/tensor00000_000 ... tensorNNNNN_000   one pickle per parameter leaf
    DIR/tokenizer.model                               SentencePiece model
    DIR/config.json                                   only for non-Grok-1 models of the architecture
    DIR/manifest.json                                 path, size, sha256 of every file, repo, revision
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import queue
import re
import shutil
import socket
import stat
import threading
import time
import urllib.parse
import uuid
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from .layout import ANY_SHARD_TENSOR_NAME, CONFIG_NAME, MANIFEST_NAME, TENSOR_FOLDER, TOKENIZER_NAME
from .errors import CheckpointError, ConfigError, DownloadError
from .fsutil import FileTooLargeError, atomic_write_text, format_bytes, open_regular_file, read_regular_file

DEFAULT_REPO = "xai-org/grok-1"
DEFAULT_REVISION = "main"
# The Grok-1 SentencePiece model as published in github.com/xai-org/grok-1 (fallback source when
# the Hub repo lacks it); $GROK_TOKENIZER_URL overrides the URL (mirrors, tests).
TOKENIZER_URL = "https://raw.githubusercontent.com/xai-org/grok-1/main/tokenizer.model"
TOKENIZER_SHA256 = "5c69d7cbad192fa2c9d14e2a77fbfdc11597c68907b043ddb0260e3d28eddd7f"
TOKENIZER_SIZE = 2_229_219

_MANIFEST_FORMAT = 1

# Bounds on what a listing or a manifest may hold (Grok-1: 770 tensor files, a 150 KB manifest).
MAX_FILES = 100_000  # files in one checkpoint
MAX_MANIFEST_BYTES = 64 << 20  # manifest.json / SHA256SUMS size
MAX_NAME_LENGTH = 512  # characters in one relative path
MAX_NAME_DEPTH = 8  # folders in one relative path
DEFAULT_STALL_TIMEOUT = 120.0  # seconds a transfer may go without a completed block
STALL_TIMEOUT_ENV = "GROK_DOWNLOAD_STALL_TIMEOUT"
STAGING_FOLDER = ".cache/grokcli-download"  # under DIR: files wait here until their hash matches
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


class DownloadInterrupted(DownloadError):
    """Ctrl-C during a download; the message says what remains (exit code 130, as for SIGINT)."""

    exit_code = 130


def relative_path_problem(name: object) -> str | None:
    """Why `name` is not a plain relative path inside a directory ('a/b/c'), or None when it is.

    Refused: absolute paths, '..' and '.' parts, empty parts, backslashes, drive letters, control
    characters, more than MAX_NAME_DEPTH parts or MAX_NAME_LENGTH characters.
    """
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if len(name) > MAX_NAME_LENGTH:
        return f"longer than {MAX_NAME_LENGTH} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        return "an absolute path"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' part"
    if len(parts) > MAX_NAME_DEPTH:
        return f"deeper than {MAX_NAME_DEPTH} folders"
    return None


def read_small_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (never blocks on a FIFO, never reads more)."""
    try:
        return read_regular_file(path, limit)
    except FileTooLargeError:
        raise CheckpointError(f"{path}: {what} larger than the {format_bytes(limit)} grokcli accepts here") from None
    except OSError as e:  # NotRegularFileError (a FIFO, a folder) included
        raise CheckpointError(f"{path}: {what} unreadable ({e.strerror or 'not a regular file'})") from None


# -- manifest --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """What one file of a checkpoint must be."""

    path: str  # relative to the checkpoint directory, '/'-separated
    size: int  # bytes
    sha256: str | None  # lowercase hex, computed from the bytes on disk; None when not (yet) known
    source: str | None = None  # where it came from: a path in the Hub repo, or a URL
    mtime_ns: int | None = None  # the file's mtime when sha256 was computed (a later run re-hashes if it changed)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The expected size and hash of every file of a checkpoint, and where they came from."""

    files: tuple[ManifestEntry, ...]
    repo_id: str | None = None  # Hub repository the files were published in
    revision: str | None = None  # commit the files were taken from
    origin: str = "hub"  # "hub" (grok download), "local" (--write-manifest) or "sha256sums"

    def by_path(self) -> dict[str, ManifestEntry]:
        return {e.path: e for e in self.files}

    def to_json(self) -> dict:
        return {"format": _MANIFEST_FORMAT, "repo_id": self.repo_id, "revision": self.revision,
                "origin": self.origin, "files": [_entry_json(e) for e in self.files]}


def _entry_json(e: ManifestEntry) -> dict:
    out = dataclasses.asdict(e)
    if out["mtime_ns"] is None:
        del out["mtime_ns"]
    return out


def read_manifest(path: str | Path, *, max_entries: int = MAX_FILES) -> Manifest:
    """Read a `manifest.json`; a malformed one raises CheckpointError naming what is wrong.

    Bounded: at most MAX_MANIFEST_BYTES and `max_entries` entries, regular files only, and every
    path must be a plain relative path (no absolute paths, no '..').
    """
    path = Path(path)
    raw = read_small_file(path, _byte_limit(max_entries), "manifest")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise CheckpointError(f"{path}: corrupted manifest, not valid JSON ({why})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise CheckpointError(f"{path}: corrupted manifest, no 'files' list")
    if len(data["files"]) > max_entries:
        raise CheckpointError(f"{path}: lists {len(data['files']):,} files, more than the {max_entries:,} "
                              "this checkpoint can have")
    entries = []
    for i, f in enumerate(data["files"]):
        ok = (isinstance(f, dict) and isinstance(f.get("path"), str) and f["path"]
              and _is_count(f.get("size"))
              and (f.get("sha256") is None or (isinstance(f["sha256"], str) and _SHA256_HEX.fullmatch(f["sha256"])))
              and (f.get("mtime_ns") is None or _is_count(f["mtime_ns"]))
              and (f.get("source") is None or isinstance(f["source"], str)))
        if not ok:
            raise CheckpointError(f"{path}: corrupted manifest, bad entry #{i}: {json.dumps(f)[:200]}")
        if why := relative_path_problem(f["path"]):
            raise CheckpointError(f"{path}: refused, entry #{i} names {f['path'][:100]!r} ({why}); "
                                  "a manifest lists only files inside its directory")
        entries.append(ManifestEntry(f["path"], f["size"], f.get("sha256"), f.get("source"), f.get("mtime_ns")))
    origin = data.get("origin") if isinstance(data.get("origin"), str) else "hub"
    repo_id = data.get("repo_id") if isinstance(data.get("repo_id"), str) else None
    revision = data.get("revision") if isinstance(data.get("revision"), str) else None
    return Manifest(tuple(entries), repo_id, revision, origin)


def _byte_limit(max_entries: int) -> int:
    """Bytes a listing of `max_entries` files can need (names, hashes, sizes), so that an
    oversized one is refused before it is parsed."""
    return min(MAX_MANIFEST_BYTES, (64 << 10) + max_entries * (2 * MAX_NAME_LENGTH + 256))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def read_sha256sums(path: str | Path, *, max_entries: int = MAX_FILES) -> Manifest:
    """Read a `sha256sum`-format file (`<hex>  <path>` per line) as a manifest without sizes.

    Sizes are unknown in that format; entries carry size -1, meaning "not published". Bounded
    like `read_manifest`; paths must be plain relative paths.
    """
    path = Path(path)
    entries = []
    try:
        lines = read_small_file(path, _byte_limit(max_entries), "SHA256SUMS").decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.rstrip("\r"))
        if not m:
            raise CheckpointError(f"{path}:{n}: not a sha256sum line: {line[:80]!r}")
        rel = m.group(2).removeprefix("./")
        if why := relative_path_problem(rel):
            raise CheckpointError(f"{path}:{n}: refused, names {rel[:100]!r} ({why}); "
                                  "only files inside the directory can be listed")
        entries.append(ManifestEntry(rel, -1, m.group(1).lower(), None))
        if len(entries) > max_entries:
            raise CheckpointError(f"{path}: lists more than the {max_entries:,} files this checkpoint can have")
    return Manifest(tuple(entries), origin="sha256sums")


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write `DIR/manifest.json` atomically (temp file + os.replace)."""
    return atomic_write_text(Path(directory) / MANIFEST_NAME, json.dumps(manifest.to_json(), indent=1) + "\n")


# -- planning --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file the model needs, where it comes from and where it goes."""

    path: str  # destination, relative to the checkpoint directory
    source: str  # path in the Hub repo, or an http(s) URL for files from elsewhere
    size: int  # bytes, as published
    sha256: str | None  # as published (LFS metadata, or the pinned tokenizer hash); None for small git files
    blob_id: str | None = None  # git blob id of a small (non-LFS) file, checked before it is moved into place

    @property
    def from_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))


@dataclasses.dataclass(frozen=True)
class DownloadPlan:
    """What a download would fetch: the repo's files mapped to the local layout, and what is already there."""

    repo_id: str
    revision: str  # the commit the files are taken from (the requested revision resolved)
    requested_revision: str  # what the user asked for ("main", a tag, a commit)
    local_dir: Path
    endpoint: str | None  # Hub URL; None means huggingface_hub's default ($HF_ENDPOINT or huggingface.co)
    files: tuple[RemoteFile, ...]  # every file the model needs at this revision (goes into the manifest)
    selected: tuple[RemoteFile, ...]  # the subset chosen by --include/--exclude
    present: frozenset[str]  # selected paths already complete on disk
    known: dict = dataclasses.field(default_factory=dict)  # path -> FileHash of files proven on disk

    @property
    def to_fetch(self) -> tuple[RemoteFile, ...]:
        return tuple(f for f in self.selected if f.path not in self.present)

    @property
    def bytes_to_fetch(self) -> int:
        return sum(f.size for f in self.to_fetch)

    @property
    def bytes_selected(self) -> int:
        return sum(f.size for f in self.selected)


def _hub_errors():
    from huggingface_hub import errors as e

    return e


def _wrap_hub_error(err: BaseException, what: str, repo_id: str, revision: str) -> DownloadError:
    """One actionable line for the errors the Hub client raises."""
    e = _hub_errors()
    if isinstance(err, e.GatedRepoError):
        return DownloadError(f"{repo_id} is gated: accept its terms on the Hub, then set HF_TOKEN ({what})")
    if isinstance(err, e.RepositoryNotFoundError):
        return DownloadError(f"repository {repo_id} not found (or private: set HF_TOKEN)")
    if isinstance(err, e.RevisionNotFoundError):
        return DownloadError(f"revision {revision!r} not found in {repo_id}")
    if isinstance(err, e.RemoteEntryNotFoundError):
        return DownloadError(f"{what}: not found in {repo_id}@{revision}")
    response = getattr(err, "response", None)
    if isinstance(err, e.HfHubHTTPError) and response is not None:
        return DownloadError(f"{what}: HTTP {response.status_code} {response.reason_phrase} from {response.url.host}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if _is_connection_error(err):
        host = urllib.parse.urlsplit(_endpoint(None) or "https://huggingface.co").hostname
        return DownloadError(f"{what}: cannot reach {host} ({first}); check the network, set HF_ENDPOINT to a "
                             "mirror, or copy a checkpoint here and pass its directory with --local-dir")
    return DownloadError(f"{what}: {first}")


def _is_connection_error(err: BaseException) -> bool:
    """Whether a failure (or what caused it) is the network: DNS, refused, unreachable, timed out."""
    seen = 0
    while err is not None and seen < 16:  # bounded: exception chains can be cyclic
        if isinstance(err, (ConnectionError, TimeoutError, socket.gaierror)) or type(err).__name__ in (
                "ConnectError", "ConnectTimeout", "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _endpoint(endpoint: str | None) -> str | None:
    # Read at call time: huggingface_hub reads $HF_ENDPOINT once, at import.
    value = endpoint or os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _layout(repo_id: str, revision: str, siblings: Iterable) -> list[RemoteFile]:
    """Map the repo's files to the local layout: tensors into ckpt-0/, the tokenizer, a config.json.

    Every name the Hub lists is checked first (a hostile endpoint could list '../x'): one that is
    not a plain relative path refuses the whole listing, before anything is written.
    """
    by_folder: dict[str, list] = {}
    tokenizers, configs = [], []
    count = 0
    for s in siblings:
        count += 1
        if count > 4 * MAX_FILES:
            raise DownloadError(f"{repo_id}@{revision} lists more than {4 * MAX_FILES:,} files; refusing it")
        name = s.rfilename
        if why := relative_path_problem(name):
            raise DownloadError(f"{repo_id}@{revision} lists a file named {str(name)[:100]!r} ({why}); "
                                "refusing to download from it")
        p = PurePosixPath(name)
        if ANY_SHARD_TENSOR_NAME.fullmatch(p.name):
            by_folder.setdefault(str(p.parent), []).append(s)
        elif p.name == TOKENIZER_NAME:
            tokenizers.append(s)
        elif name == CONFIG_NAME:
            configs.append(s)
    if not by_folder:
        raise DownloadError(f"{repo_id}@{revision} holds no checkpoint tensor files (tensorNNNNN_000)")
    if len(by_folder) > 1:
        if TENSOR_FOLDER not in by_folder:
            raise DownloadError(f"{repo_id}@{revision} holds tensor files in several folders "
                                f"({', '.join(sorted(by_folder)[:5])}); cannot tell which is the checkpoint")
        folder = TENSOR_FOLDER
    else:
        folder = next(iter(by_folder))
    if len(by_folder[folder]) > MAX_FILES:
        raise DownloadError(f"{repo_id}@{revision} lists {len(by_folder[folder]):,} tensor files, "
                            f"more than the {MAX_FILES:,} grokcli accepts")
    # The release used ckpt-0/; whatever the Hub folder is called, the files land in ckpt-0/.
    files = [_remote(s, f"{TENSOR_FOLDER}/{PurePosixPath(s.rfilename).name}")
             for s in sorted(by_folder[folder], key=lambda s: s.rfilename)]
    if tokenizers:
        best = min(tokenizers, key=lambda s: (s.rfilename.count("/"), s.rfilename))
        files.append(_remote(best, TOKENIZER_NAME))
    else:
        url = os.environ.get("GROK_TOKENIZER_URL") or TOKENIZER_URL
        files.append(RemoteFile(TOKENIZER_NAME, url, TOKENIZER_SIZE, TOKENIZER_SHA256))
    files += [_remote(s, CONFIG_NAME) for s in configs]
    return files


def _remote(sibling, dest: str) -> RemoteFile:
    lfs = sibling.lfs
    if lfs is not None:
        sha = str(lfs.sha256).lower()
        if not _SHA256_HEX.fullmatch(sha) or not _is_count(lfs.size):
            raise DownloadError(f"the Hub published a malformed LFS sha256/size for {sibling.rfilename}")
        return RemoteFile(dest, sibling.rfilename, int(lfs.size), sha)
    if sibling.size is None or not _is_count(sibling.size):
        raise DownloadError(f"the Hub published no valid size for {sibling.rfilename}")
    if not isinstance(sibling.blob_id, str) or not re.fullmatch(r"[0-9a-f]{40}", sibling.blob_id):
        raise DownloadError(f"the Hub published no valid git blob id for {sibling.rfilename}")
    return RemoteFile(dest, sibling.rfilename, int(sibling.size), None, sibling.blob_id)


def _matches(f: RemoteFile, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns for name in (f.path, f.source))


@dataclasses.dataclass(frozen=True)
class FileHash:
    """What hashing a file found: its SHA-256 and git blob id, and the size and mtime it had then."""

    sha256: str
    blob_id: str
    size: int
    mtime_ns: int


def hash_file(path: str | Path, chunk: int = 16 << 20) -> FileHash:
    """SHA-256 and git blob id of a regular file, in one read of at most its size at open time."""
    with open_regular_file(path) as f:
        st = os.fstat(f.fileno())
        sha, blob = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % st.st_size)
        buf = bytearray(chunk)
        view = memoryview(buf)
        left = st.st_size
        while left > 0 and (n := f.readinto(view[:min(chunk, left)])):
            sha.update(view[:n])
            blob.update(view[:n])
            left -= n
    return FileHash(sha.hexdigest(), blob.hexdigest(), st.st_size - left, st.st_mtime_ns)


def sha256_file(path: str | Path, chunk: int = 16 << 20) -> str:
    """Hex SHA-256 of a regular file, read in large chunks."""
    return hash_file(path, chunk).sha256


def _matches_published(f: RemoteFile, h: FileHash) -> bool:
    """Whether hashed bytes are what the Hub (or the pinned tokenizer) published for `f`."""
    if h.size != f.size:
        return False
    if f.sha256 is not None:
        return h.sha256 == f.sha256
    return f.blob_id is not None and h.blob_id == f.blob_id


def _proven_on_disk(f: RemoteFile, dest: Path, recorded: ManifestEntry | None) -> FileHash | None:
    """The hash of `dest` when it holds exactly `f` (trusting a recorded hash while size and mtime hold)."""
    try:
        st = os.stat(dest)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
        return None
    if (recorded is not None and recorded.sha256 and f.sha256 is not None and recorded.sha256 == f.sha256
            and recorded.size == st.st_size and recorded.mtime_ns == st.st_mtime_ns):
        return FileHash(recorded.sha256, "", st.st_size, st.st_mtime_ns)
    try:
        h = hash_file(dest)
    except OSError:
        return None
    return h if _matches_published(f, h) else None


def plan_download(repo_id: str = DEFAULT_REPO, *, revision: str | None = None, local_dir: str | Path | None = None,
                  include: Iterable[str] = (), exclude: Iterable[str] = (), endpoint: str | None = None,
                  token: str | bool | None = None) -> DownloadPlan:
    """List the repo on the Hub and decide what to fetch; writes nothing.

    A file already on disk counts as present when its size and hash match what the Hub
    publishes; its hash is taken from the manifest only while the file's size and mtime are those
    recorded with it, otherwise the file is hashed again.
    """
    from huggingface_hub import HfApi

    from .paths import default_checkpoint_dir

    requested = revision or DEFAULT_REVISION
    local = Path(local_dir).expanduser() if local_dir is not None else default_checkpoint_dir()
    endpoint = _endpoint(endpoint)
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=requested, files_metadata=True)
    except Exception as err:  # noqa: BLE001 - every Hub/network failure becomes one line
        raise _wrap_hub_error(err, "listing files", repo_id, requested) from None
    commit = info.sha if isinstance(info.sha, str) and re.fullmatch(r"[0-9a-f]{40}", info.sha) else requested
    files = _layout(repo_id, commit, info.siblings or [])

    include, exclude = list(include), list(exclude)
    selected = [f for f in files if (not include or _matches(f, include)) and not _matches(f, exclude)]
    if not selected:
        raise DownloadError("--include/--exclude select none of the checkpoint's files")

    recorded: dict[str, ManifestEntry] = {}
    if (local / MANIFEST_NAME).exists():
        try:
            recorded = read_manifest(local / MANIFEST_NAME).by_path()
        except CheckpointError:
            recorded = {}  # unreadable: every file is hashed again
    present, known = set(), {}
    for f in files:
        h = _proven_on_disk(f, local / f.path, recorded.get(f.path))
        if h is not None:
            known[f.path] = h
            if f in selected:
                present.add(f.path)
    return DownloadPlan(repo_id, commit, requested, local, endpoint, tuple(files), tuple(selected),
                        frozenset(present), known)


# -- downloading -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DownloadProgress:
    """A snapshot of a running download, passed to the progress callback."""

    bytes_done: int  # bytes received in this run
    bytes_total: int  # bytes this run fetches
    files_done: int  # files completed in this run
    files_total: int  # files this run fetches
    file: str | None  # the file that just advanced or completed


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    """What a download did."""

    plan: DownloadPlan
    fetched: tuple[str, ...]  # paths fetched in this run
    manifest_path: Path
    warnings: tuple[str, ...]
    seconds: float


class _Cancelled(Exception):
    """Raised inside a worker's progress hook to abort its transfer."""


class _ByteRelay:
    """Stands in for the tqdm bar huggingface_hub drives, forwarding byte counts to a sink.

    Subclassed per file with `_sink` set; having `update_transfer` makes hf_xet report through this
    one object instead of opening a second bar.
    """

    _sink: Callable[[int], None]

    def __init__(self, *args, **kwargs):
        self.n = kwargs.get("initial", 0) or 0
        self.total = kwargs.get("total")
        self.format_dict: dict = {}
        self.disable = True

    def update(self, n: int = 1) -> None:
        if n:
            self.n += n
            type(self)._sink(n)

    def update_transfer(self, n: int = 1) -> None:  # network bytes; we count bytes written
        pass

    def set_postfix_str(self, *a, **k) -> None:
        pass

    set_transfer_postfix_str = set_postfix_str
    set_description = set_postfix_str
    refresh = set_postfix_str

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would hold it, once created)."""
    for p in [path, *path.parents]:
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage(Path.cwd()).free


def stall_timeout_default() -> float:
    """Seconds a transfer may go without completing a block: $GROK_DOWNLOAD_STALL_TIMEOUT, else 120."""
    raw = os.environ.get(STALL_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_STALL_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e7:
        raise DownloadError(f"${STALL_TIMEOUT_ENV}={raw[:40]!r}: expected a number of seconds > 0")
    return value


def download(plan: DownloadPlan, *, force: bool = False, max_workers: int = 8,
             on_progress: Callable[[DownloadProgress], None] | None = None,
             free_space: Callable[[Path], int] | None = None, token: str | bool | None = None,
             stall_timeout: float | None = None) -> DownloadResult:
    """Fetch the plan's missing files into its local directory and write the manifest.

    Refuses (DownloadError) when the missing bytes do not fit on the disk, unless `force`;
    `free_space(dir)` says how many bytes are free (default: `free_bytes`).
    Each file is hashed in the staging folder and moved into place only when it matches what the
    Hub published (fetched once more on a mismatch), so an interrupted run loses nothing already
    complete, never leaves a corrupt file in place, and the same call continues where it stopped.
    A transfer that completes no block in `stall_timeout` seconds (default `stall_timeout_default()`)
    is abandoned. Raises DownloadError naming the files that failed after fetching every other
    one; DownloadInterrupted on Ctrl-C, saying what remains.
    """
    start = time.monotonic()
    stall_timeout = stall_timeout_default() if stall_timeout is None else float(stall_timeout)
    if not 0 < stall_timeout < float("inf"):
        raise DownloadError(f"stall timeout must be a positive number of seconds, got {stall_timeout}")
    todo = plan.to_fetch
    need = plan.bytes_to_fetch
    if need and not force:
        free = (free_space or free_bytes)(plan.local_dir)
        if free < need:
            raise DownloadError(f"not enough disk space in {plan.local_dir}: {format_bytes(need)} still to download, "
                                f"{format_bytes(free)} free (free some space, choose --local-dir, or --force)")
    plan.local_dir.mkdir(parents=True, exist_ok=True)
    staging = plan.local_dir / STAGING_FOLDER
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's leftovers: never trusted
    verified: dict[str, FileHash] = dict(plan.known)
    dropped: set[str] = set()
    lock = threading.Lock()

    def manifest() -> Manifest:
        with lock:
            entries = tuple(ManifestEntry(f.path, f.size, h.sha256 if h else None, f.source, h.mtime_ns if h else None)
                            for f in plan.files if f.path not in dropped for h in [verified.get(f.path)])
        return Manifest(entries, plan.repo_id, plan.revision)

    manifest_path = write_manifest(plan.local_dir, manifest())

    stop = threading.Event()
    abandoned: set[str] = set()
    active: dict[str, float] = {}  # path -> when it last completed a block (or started)
    state = {"bytes": 0, "files": 0}
    warnings: list[str] = []

    def report(file: str | None, nbytes: int = 0, done: bool = False) -> None:
        with lock:
            state["bytes"] += nbytes
            state["files"] += done
            if file in active:
                active[file] = time.monotonic()
            if on_progress is not None:
                on_progress(DownloadProgress(state["bytes"], need, state["files"], len(todo), file))

    def cancelled(f: RemoteFile) -> bool:
        return stop.is_set() or f.path in abandoned

    def fetch(f: RemoteFile) -> str:
        received = 0

        def sink(n: int) -> None:
            nonlocal received
            if cancelled(f):
                raise _Cancelled()
            received += n
            report(f.path, n)

        relay = type("_FileRelay", (_ByteRelay,), {"_sink": staticmethod(sink)})
        mismatch = None
        for _attempt in range(2):  # a mismatching file is fetched once more, then refused
            try:
                staged = _fetch_url(f, staging, relay) if f.from_url else _fetch_hub(plan, f, staging, relay, token)
                got = hash_file(staged)
            except BaseException:
                report(f.path, -received)  # those bytes are gone with the partial file
                received = 0
                raise
            if cancelled(f):
                staged.unlink(missing_ok=True)
                raise _Cancelled()
            if _matches_published(f, got):
                break
            staged.unlink(missing_ok=True)
            report(f.path, -received)
            received = 0
            mismatch = got
        else:
            kind, want, found = (("sha256", f.sha256, mismatch.sha256) if f.sha256
                                 else ("git blob id", f.blob_id, mismatch.blob_id))
            source = "pinned" if f.from_url else "Hub's"
            raise DownloadError(f"{f.path}: the bytes served twice ({mismatch.size:,} bytes, {kind} {found[:16]}...) "
                                f"are not the {source} {f.size:,} bytes with {kind} {want[:16]}...; not installed")
        if f.path == CONFIG_NAME and not _config_usable(staged, warnings):
            staged.unlink(missing_ok=True)
            with lock:
                dropped.add(f.path)
        else:
            dest = plan.local_dir / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, dest)
            st = os.stat(dest)
            with lock:
                verified[f.path] = FileHash(got.sha256, got.blob_id, st.st_size, st.st_mtime_ns)
        report(f.path, 0, done=True)
        return f.path

    jobs: queue.SimpleQueue = queue.SimpleQueue()
    for f in todo:
        jobs.put(f)
    results: queue.SimpleQueue = queue.SimpleQueue()

    def worker() -> None:
        while not stop.is_set():
            try:
                f = jobs.get_nowait()
            except queue.Empty:
                return
            with lock:
                active[f.path] = time.monotonic()
            try:
                results.put((f, fetch(f), None))
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                results.put((f, None, err))
            finally:
                with lock:
                    active.pop(f.path, None)

    def start_worker() -> None:
        # Daemon threads: a transfer stuck in a socket read must not keep the process alive.
        threading.Thread(target=worker, name="grok-download", daemon=True).start()

    fetched: list[str] = []
    failures: list[tuple[str, BaseException]] = []
    finished: set[str] = set()
    try:
        for _ in range(min(max(1, max_workers), len(todo))):
            start_worker()
        while len(finished) < len(todo):
            try:
                f, path, err = results.get(timeout=0.2)
            except queue.Empty:
                for f in _stalled(active, lock, stall_timeout):
                    abandoned.add(f)
                    finished.add(f)
                    failures.append((f, DownloadError(
                        f"{f}: stalled, less than {format_bytes(_block_size())} received in {stall_timeout:g} s "
                        f"(a stuck or very slow server; the limit is --stall-timeout or ${STALL_TIMEOUT_ENV})")))
                    start_worker()  # the stuck thread is left to die with the process
                continue
            if f.path in finished:
                continue  # an abandoned transfer that came back late
            finished.add(f.path)
            if err is None:
                fetched.append(path)
            elif not isinstance(err, _Cancelled):
                failures.append((f.path, err))
    except KeyboardInterrupt:
        stop.set()  # transfers in flight stop at their next block (their partial files are removed)
        write_manifest(plan.local_dir, manifest())
        shutil.rmtree(staging, ignore_errors=True)
        with lock:  # a file moved into place counts as done even if its result was not collected yet
            left = [f for f in todo if f.path not in verified]
        raise DownloadInterrupted(
            f"interrupted: {len(left)} of {len(todo)} files ({format_bytes(sum(f.size for f in left))}) not "
            f"downloaded yet, {len(todo) - len(left)} complete and kept; run the same command again to continue"
        ) from None
    stop.set()
    write_manifest(plan.local_dir, manifest())
    shutil.rmtree(staging, ignore_errors=True)
    _remove_empty_parents(staging.parent, plan.local_dir)
    if failures:
        path, err = failures[0]
        msg = err if isinstance(err, DownloadError) else _wrap_hub_error(err, path, plan.repo_id, plan.revision)
        first = "first: " if len(failures) > 1 else ""
        raise DownloadError(f"{len(failures)} of {len(todo)} files failed ({first}{msg}); "
                            "run the same command again to continue")
    return DownloadResult(plan, tuple(fetched), manifest_path, tuple(warnings), time.monotonic() - start)


def _stalled(active: dict[str, float], lock: threading.Lock, limit: float) -> list[str]:
    """Remove and return the transfers that completed no block in `limit` seconds."""
    now = time.monotonic()
    with lock:
        stuck = [p for p, t in active.items() if now - t > limit]
        for p in stuck:
            del active[p]
    return stuck


def _block_size() -> int:
    from huggingface_hub import constants

    return int(getattr(constants, "DOWNLOAD_CHUNK_SIZE", 10 << 20))


def _fetch_hub(plan: DownloadPlan, f: RemoteFile, staging: Path, relay: type, token) -> Path:
    """Fetch a Hub file into the staging folder; returns where it landed (checked to be inside it)."""
    from huggingface_hub import hf_hub_download

    # hf_hub_download writes to a temp file under staging/.cache/huggingface/ and renames it to
    # staging/<source> when complete; pinning the commit keeps every file from the same revision.
    got = Path(hf_hub_download(plan.repo_id, f.source, revision=plan.revision, local_dir=staging,
                               endpoint=plan.endpoint, token=token, tqdm_class=relay, force_download=True))
    if not got.resolve().is_relative_to(staging.resolve()):
        got.unlink(missing_ok=True)
        raise DownloadError(f"{f.source}: huggingface_hub wrote it outside the staging folder ({got}); removed")
    return got


def _fetch_url(f: RemoteFile, staging: Path, relay: type) -> Path:
    """Fetch a file from outside the Hub (the Grok-1 tokenizer on GitHub) into the staging folder."""
    from huggingface_hub.file_download import http_get

    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"url-{PurePosixPath(f.path).name}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as out:
            http_get(f.source, out, headers={}, expected_size=f.size, tqdm_class=relay)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _config_usable(path: Path, warnings: list[str]) -> bool:
    """A config.json that is not a grokcli model config (e.g. a transformers port's) would break loading: drop it."""
    from .config import load_config

    try:
        load_config(path.parent)
    except ConfigError as e:
        warnings.append(f"ignored the repo's config.json: not a Grok-1-architecture config ({e})")
        return False
    return True


def _remove_empty_parents(folder: Path, root: Path) -> None:
    """Remove `folder` and its parents up to (not including) `root` while they are empty."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent
