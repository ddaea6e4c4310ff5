"""Fetch a Grok-1 checkpoint from the Hugging Face Hub into the layout the loader reads.

The bytes move through `huggingface_hub`'s own machinery (HEAD + GET with in-run `Range` resume and
retries, `HF_ENDPOINT`, `HF_TOKEN`, `hf_xet` when installed; 2.x dropped `hf_transfer`). This
module decides *what* to fetch and *where* it goes, checks disk space, and records a manifest; it
reports progress through a callback and prints nothing. huggingface_hub 2.x deletes a partial file
when a transfer fails for good, so across runs resumption is per file: complete files are kept.

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
import re
import shutil
import socket
import threading
import time
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from .layout import ANY_SHARD_TENSOR_NAME, CONFIG_NAME, MANIFEST_NAME, TENSOR_FOLDER, TOKENIZER_NAME
from .errors import CheckpointError, ConfigError, DownloadError
from .fsutil import atomic_write_text, format_bytes

DEFAULT_REPO = "xai-org/grok-1"
DEFAULT_REVISION = "main"
# The Grok-1 SentencePiece model as published in github.com/xai-org/grok-1 (fallback source when
# the Hub repo lacks it); $GROK_TOKENIZER_URL overrides the URL (mirrors, tests).
TOKENIZER_URL = "https://raw.githubusercontent.com/xai-org/grok-1/main/tokenizer.model"
TOKENIZER_SHA256 = "5c69d7cbad192fa2c9d14e2a77fbfdc11597c68907b043ddb0260e3d28eddd7f"
TOKENIZER_SIZE = 2_229_219

_MANIFEST_FORMAT = 1


# -- manifest --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """What one file of a checkpoint must be."""

    path: str  # relative to the checkpoint directory, '/'-separated
    size: int  # bytes
    sha256: str | None  # lowercase hex; None when the source did not publish one
    source: str | None = None  # where it came from: a path in the Hub repo, or a URL


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
                "origin": self.origin, "files": [dataclasses.asdict(e) for e in self.files]}


def read_manifest(path: str | Path) -> Manifest:
    """Read a `manifest.json`; a malformed one raises CheckpointError naming what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted manifest, not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise CheckpointError(f"{path}: corrupted manifest, no 'files' list")
    entries = []
    for i, f in enumerate(data["files"]):
        ok = (isinstance(f, dict) and isinstance(f.get("path"), str) and f["path"]
              and isinstance(f.get("size"), int) and not isinstance(f.get("size"), bool) and f["size"] >= 0
              and (f.get("sha256") is None
                   or (isinstance(f["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", f["sha256"]))))
        if not ok:
            raise CheckpointError(f"{path}: corrupted manifest, bad entry #{i}: {json.dumps(f)[:200]}")
        entries.append(ManifestEntry(f["path"], f["size"], f.get("sha256"), f.get("source")))
    return Manifest(tuple(entries), data.get("repo_id"), data.get("revision"), data.get("origin", "hub"))


def read_sha256sums(path: str | Path, sizes_from: Path | None = None) -> Manifest:
    """Read a `sha256sum`-format file (`<hex>  <path>` per line) as a manifest without sizes.

    Sizes are unknown in that format; entries carry size -1, meaning "not published".
    """
    path = Path(path)
    entries = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.rstrip("\r"))
        if not m:
            raise CheckpointError(f"{path}:{n}: not a sha256sum line: {line[:80]!r}")
        rel = m.group(2).removeprefix("./")
        entries.append(ManifestEntry(rel, -1, m.group(1).lower(), None))
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
    blob_id: str | None = None  # git blob id of a small (non-LFS) file, checked after download

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
    known_sha256: dict = dataclasses.field(default_factory=dict)  # path -> sha256 learnt from an earlier run

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
    """Map the repo's files to the local layout: tensors into ckpt-0/, the tokenizer, a config.json."""
    by_folder: dict[str, list] = {}
    tokenizers, configs = [], []
    for s in siblings:
        p = PurePosixPath(s.rfilename)
        if ANY_SHARD_TENSOR_NAME.fullmatch(p.name):
            by_folder.setdefault(str(p.parent), []).append(s)
        elif p.name == TOKENIZER_NAME:
            tokenizers.append(s)
        elif s.rfilename == CONFIG_NAME:
            configs.append(s)
    if not by_folder:
        raise DownloadError(f"{repo_id}@{revision} holds no checkpoint tensor files (tensorNNNNN_000)")
    if len(by_folder) > 1:
        if TENSOR_FOLDER not in by_folder:
            raise DownloadError(f"{repo_id}@{revision} holds tensor files in several folders "
                                f"({', '.join(sorted(by_folder))}); cannot tell which is the checkpoint")
        folder = TENSOR_FOLDER
    else:
        folder = next(iter(by_folder))
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
        return RemoteFile(dest, sibling.rfilename, int(lfs.size), str(lfs.sha256).lower())
    if sibling.size is None:
        raise DownloadError(f"the Hub published no size for {sibling.rfilename}")
    return RemoteFile(dest, sibling.rfilename, int(sibling.size), None, sibling.blob_id)


def _matches(f: RemoteFile, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns for name in (f.path, f.source))


def sha256_file(path: str | Path, chunk: int = 16 << 20) -> str:
    """Hex SHA-256 of a file, read in large chunks."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def plan_download(repo_id: str = DEFAULT_REPO, *, revision: str | None = None, local_dir: str | Path | None = None,
                  include: Iterable[str] = (), exclude: Iterable[str] = (), endpoint: str | None = None,
                  token: str | bool | None = None) -> DownloadPlan:
    """List the repo on the Hub and decide what to fetch; touches nothing on disk."""
    from huggingface_hub import HfApi

    from .paths import default_checkpoint_dir

    requested = revision or DEFAULT_REVISION
    local = Path(local_dir).expanduser() if local_dir is not None else default_checkpoint_dir()
    endpoint = _endpoint(endpoint)
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=requested, files_metadata=True)
    except Exception as err:  # noqa: BLE001 - every Hub/network failure becomes one line
        raise _wrap_hub_error(err, "listing files", repo_id, requested) from None
    commit = info.sha or requested
    files = _layout(repo_id, commit, info.siblings or [])

    include, exclude = list(include), list(exclude)
    selected = [f for f in files if (not include or _matches(f, include)) and not _matches(f, exclude)]
    if not selected:
        raise DownloadError("--include/--exclude select none of the checkpoint's files")

    # What an earlier run recorded lets us trust complete files without re-hashing them.
    known: dict[str, str] = {}
    old_manifest = local / MANIFEST_NAME
    if old_manifest.is_file():
        try:
            known = {e.path: e.sha256 for e in read_manifest(old_manifest).files if e.sha256}
        except CheckpointError:
            known = {}
    present = set()
    for f in selected:
        dest = local / f.path
        try:
            if not dest.is_file() or dest.stat().st_size != f.size:
                continue
        except OSError:
            continue
        if f.sha256 is None:  # a small git file: compare with its blob id
            if f.blob_id is not None and _git_blob_id(dest) == f.blob_id:
                present.add(f.path)
                known[f.path] = sha256_file(dest)
            continue
        if known.get(f.path) == f.sha256 or sha256_file(dest) == f.sha256:
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


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def download(plan: DownloadPlan, *, force: bool = False, max_workers: int = 8,
             on_progress: Callable[[DownloadProgress], None] | None = None,
             free_space: Callable[[Path], int] | None = None, token: str | bool | None = None) -> DownloadResult:
    """Fetch the plan's missing files into its local directory and write the manifest.

    Refuses (DownloadError) when the missing bytes do not fit on the disk, unless `force`;
    `free_space(dir)` says how many bytes are free (default: `free_bytes`).
    Complete files are moved into place atomically, so an interrupted run loses nothing already
    complete and the same call continues where it stopped. Raises DownloadError naming the files
    that failed after fetching every other one.
    """
    start = time.monotonic()
    todo = plan.to_fetch
    need = plan.bytes_to_fetch
    if need and not force:
        free = (free_space or free_bytes)(plan.local_dir)
        if free < need:
            raise DownloadError(f"not enough disk space in {plan.local_dir}: {format_bytes(need)} still to download, "
                                f"{format_bytes(free)} free (free some space, choose --local-dir, or --force)")
    plan.local_dir.mkdir(parents=True, exist_ok=True)
    sha: dict[str, str | None] = {f.path: f.sha256 or plan.known_sha256.get(f.path) for f in plan.files}

    dropped: set[str] = set()

    def manifest() -> Manifest:
        entries = tuple(ManifestEntry(f.path, f.size, sha[f.path], f.source) for f in plan.files
                        if f.path not in dropped)
        return Manifest(entries, plan.repo_id, plan.revision)

    manifest_path = write_manifest(plan.local_dir, manifest())

    lock = threading.Lock()
    stop = threading.Event()
    state = {"bytes": 0, "files": 0}
    warnings: list[str] = []

    def report(file: str | None, nbytes: int = 0, done: bool = False) -> None:
        with lock:
            state["bytes"] += nbytes
            state["files"] += done
            if on_progress is not None:
                on_progress(DownloadProgress(state["bytes"], need, state["files"], len(todo), file))

    def fetch(f: RemoteFile) -> str:
        received = 0

        def sink(n: int) -> None:
            nonlocal received
            if stop.is_set():
                raise _Cancelled()
            received += n
            report(f.path, n)

        relay = type("_FileRelay", (_ByteRelay,), {"_sink": staticmethod(sink)})
        dest = plan.local_dir / f.path
        try:
            if f.from_url:
                _fetch_url(f, dest, relay)
            else:
                _fetch_hub(plan, f, dest, relay, token)
        except BaseException:
            report(f.path, -received)  # those bytes are gone with the partial file
            raise
        if f.blob_id is not None:
            if _git_blob_id(dest) != f.blob_id:
                dest.unlink(missing_ok=True)
                raise DownloadError(f"{f.path}: content does not match the Hub's git blob id {f.blob_id}")
            sha[f.path] = sha256_file(dest)
        if f.path == CONFIG_NAME and not _config_usable(dest, warnings):
            dropped.add(f.path)
        report(f.path, 0, done=True)
        return f.path

    fetched: list[str] = []
    failures: list[tuple[str, BaseException]] = []
    pool = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="grok-download")
    try:
        futures: dict[Future, RemoteFile] = {pool.submit(fetch, f): f for f in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                err = fut.exception()
                if err is None:
                    fetched.append(fut.result())
                elif not isinstance(err, _Cancelled):
                    failures.append((futures[fut].path, err))
    except BaseException:
        stop.set()  # Ctrl-C: abort transfers in flight (their partial files are removed)
        pool.shutdown(wait=True, cancel_futures=True)
        write_manifest(plan.local_dir, manifest())
        raise
    pool.shutdown(wait=True)
    write_manifest(plan.local_dir, manifest())
    _tidy(plan)
    if failures:
        path, err = failures[0]
        msg = err if isinstance(err, DownloadError) else _wrap_hub_error(err, path, plan.repo_id, plan.revision)
        first = "first: " if len(failures) > 1 else ""
        raise DownloadError(f"{len(failures)} of {len(todo)} files failed ({first}{msg}); "
                            "run the same command again to continue")
    return DownloadResult(plan, tuple(fetched), manifest_path, tuple(warnings), time.monotonic() - start)


def _fetch_hub(plan: DownloadPlan, f: RemoteFile, dest: Path, relay: type, token) -> None:
    from huggingface_hub import hf_hub_download

    # hf_hub_download writes to a temp file under DIR/.cache/huggingface/ and renames it into
    # place when complete; pinning the commit keeps every file from the same revision.
    got = Path(hf_hub_download(plan.repo_id, f.source, revision=plan.revision, local_dir=plan.local_dir,
                               endpoint=plan.endpoint, token=token, tqdm_class=relay, force_download=True))
    if got.resolve() != dest.resolve():
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, dest)


def _fetch_url(f: RemoteFile, dest: Path, relay: type) -> None:
    """Fetch a file from outside the Hub (the Grok-1 tokenizer on GitHub); keep it only with the pinned hash."""
    from huggingface_hub.file_download import http_get

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.incomplete")
    try:
        with open(tmp, "wb") as out:
            http_get(f.source, out, headers={}, expected_size=f.size, tqdm_class=relay)
        got = sha256_file(tmp)
        if f.sha256 is not None and got != f.sha256:
            raise DownloadError(f"{f.path} from {f.source} has sha256 {got}, not the pinned {f.sha256}; not installed")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _config_usable(path: Path, warnings: list[str]) -> bool:
    """A config.json that is not a grokcli model config (e.g. a transformers port's) would break loading: drop it."""
    from .config import load_config

    try:
        load_config(path.parent)
    except ConfigError as e:
        path.unlink(missing_ok=True)
        warnings.append(f"ignored the repo's config.json: not a Grok-1-architecture config ({e})")
        return False
    return True


def _tidy(plan: DownloadPlan) -> None:
    """Remove Hub folders left empty after their files moved into ckpt-0/."""
    for f in plan.files:
        if f.from_url or f.source == f.path:
            continue
        parent = (plan.local_dir / f.source).parent
        while parent != plan.local_dir and plan.local_dir in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
