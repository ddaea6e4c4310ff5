"""A local fake Hugging Face Hub for tests: the endpoints `huggingface_hub` calls, on 127.0.0.1.

Two HTTP servers in one object, like the real service:

* the Hub (`endpoint`): `GET /api/models/{repo}/revision/{rev}` (model info with LFS metadata, as
  `HfApi.model_info(files_metadata=True)` asks for it), and `HEAD`/`GET /{repo}/resolve/{rev}/{path}`:
  small files are served directly with `ETag` = git blob id; LFS files answer `302` with
  `X-Linked-Etag` (the sha256), `X-Linked-Size` and a `Location` on the CDN. Every answer carries
  `X-Repo-Commit`; errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`).
* the CDN (another origin, so the client does not follow the redirect on HEAD nor send its token):
  `GET /blobs/{sha256}` with `Range` support, and `GET /raw/{name}` for files standing in for other
  hosts (the Grok-1 tokenizer on GitHub).

Xet is never advertised (no `X-Xet-Hash`), so the client uses plain HTTP. Faults for tests:
`drop_after[path] = n` sends the first n bytes of the file's next download then drops the
connection (once); `fail_status[path] = code` answers that status to every download of the file;
`corrupt[path] = data` serves `data` instead of the file's content while the listing still
advertises the real size and hash; `drip[path] = seconds` sends the file one byte every `seconds`
(the rest at once when the hub is closed).
Every request is logged in `requests` as (method, url path, Range header or None).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Files at least this big are stored "in LFS" (the real Hub uses LFS for anything large or binary).
LFS_THRESHOLD = 1024


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as `blobId` and `ETag` of non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """One model repository served like huggingface.co, plus a CDN. Use as a context manager."""

    def __init__(self, repo_id: str, files: dict[str, bytes], *, commit: str = "c0ffee" * 6 + "c0de",
                 raw: dict[str, bytes] | None = None):
        self.repo_id = repo_id
        self.files = dict(files)  # path in the repo -> content
        self.commit = commit  # the commit "main" points at
        self.raw = dict(raw or {})  # name -> content, served at {cdn}/raw/{name}
        self.drop_after: dict[str, int] = {}
        self.fail_status: dict[str, int] = {}
        self.corrupt: dict[str, bytes] = {}
        self.drip: dict[str, float] = {}
        self._closing = threading.Event()
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(self._serve_hub))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(self._serve_cdn))
        self._hub.daemon_threads = self._cdn.daemon_threads = True
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
                         for s in (self._hub, self._cdn)]

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "FakeHub":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def raw_url(self, name: str) -> str:
        return f"{self.cdn}/raw/{name}"

    def downloads(self) -> list[str]:
        """Repo paths (or raw names) whose content was requested with GET, in order."""
        by_sha = {hashlib.sha256(d).hexdigest(): p for p, d in self.files.items()}
        out = []
        for method, path, _ in self.requests:
            if method != "GET":
                continue
            if path.startswith("/blobs/"):
                out.append(by_sha.get(path[len("/blobs/"):], path))
            elif path.startswith("/raw/"):
                out.append(path[len("/raw/"):])
            elif "/resolve/" in path:
                out.append(path.split("/resolve/", 1)[1].split("/", 1)[1])
        return out

    # -- request handling ----------------------------------------------------------------------

    def _handler(self, serve):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                hub._log(self)
                serve(self, head=False)

            def do_HEAD(self):
                hub._log(self)
                serve(self, head=True)

            def log_message(self, *args):  # keep pytest output clean
                pass

        return Handler

    def _log(self, req: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append((req.command, unquote(urlsplit(req.path).path), req.headers.get("Range")))

    def _reply(self, req, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def _error(self, req, status: int, code: str | None, message: str, head: bool) -> None:
        headers = {"Content-Type": "application/json", "X-Repo-Commit": self.commit}
        if code:
            headers["X-Error-Code"] = code
        self._reply(req, status, headers, json.dumps({"error": message}).encode(), head)

    def _siblings(self) -> list[dict]:
        out = []
        for path, data in sorted(self.files.items()):
            sib = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
            if len(data) >= LFS_THRESHOLD:
                sib["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(sib)
        return out

    def _revision_ok(self, rev: str) -> bool:
        return rev in ("main", self.commit)

    def _serve_hub(self, req, head: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        m = re.fullmatch(r"/api/models/(.+?)/revision/([^/]+)", path)
        if m:
            repo, rev = m.groups()
            if repo != self.repo_id:
                return self._error(req, 404, "RepoNotFound", "Repository not found", head)
            if not self._revision_ok(rev):
                return self._error(req, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            info = {"id": repo, "modelId": repo, "sha": self.commit, "private": False, "siblings": self._siblings()}
            return self._reply(req, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head)
        m = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if m:
            repo, rev, file = m.groups()
            if repo != self.repo_id:
                return self._error(req, 404, "RepoNotFound", "Repository not found", head)
            if not self._revision_ok(rev):
                return self._error(req, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            if file not in self.files:
                return self._error(req, 404, "EntryNotFound", f"{file} does not exist", head)
            data = self.files[file]
            if len(data) >= LFS_THRESHOLD:
                sha = hashlib.sha256(data).hexdigest()
                headers = {"X-Repo-Commit": self.commit, "ETag": f'"{git_blob_id(data)}"',
                           "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                           "Location": f"{self.cdn}/blobs/{sha}"}
                return self._reply(req, 302, headers, b"", head)
            if not head and file in self.fail_status:
                return self._error(req, self.fail_status[file], None, "injected failure", head)
            headers = {"X-Repo-Commit": self.commit, "ETag": f'"{git_blob_id(data)}"',
                       "Content-Type": "application/octet-stream"}
            return self._reply(req, 200, headers, self.corrupt.get(file, data), head)
        self._error(req, 404, None, "not found", head)

    def _serve_cdn(self, req, head: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        name = None
        if path.startswith("/blobs/"):
            wanted = path[len("/blobs/"):]
            name = next((p for p, d in self.files.items() if hashlib.sha256(d).hexdigest() == wanted), None)
            data = self.files.get(name) if name else None
        elif path.startswith("/raw/"):
            name = path[len("/raw/"):]
            data = self.raw.get(name)
        else:
            data = None
        if data is None:
            return self._reply(req, 404, {"Content-Type": "text/plain"}, b"not found", head)
        if not head and name in self.fail_status:
            return self._reply(req, self.fail_status[name], {"Content-Type": "text/plain"}, b"injected failure")
        data = self.corrupt.get(name, data)
        if not head and name in self.drip:
            return self._drip(req, data, self.drip[name])
        start = 0
        rng = req.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            if not m or int(m.group(1)) >= len(data):
                return self._reply(req, 416, {"Content-Range": f"bytes */{len(data)}"}, b"", head)
            start = int(m.group(1))
        body = data[start:]
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "ETag": f'"{len(data)}"'}
        status = 200
        if rng:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        with self._lock:
            drop = None if head else self.drop_after.pop(name, None)
        if drop is None:
            return self._reply(req, status, headers, body, head)
        # Promise the whole body, send part of it, then cut the connection like a network failure.
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body[:drop])
        req.wfile.flush()
        req.close_connection = True
        try:
            req.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _drip(self, req, data: bytes, seconds: float) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.close_connection = True
        try:
            for i in range(len(data)):
                req.wfile.write(data[i:i + 1])
                req.wfile.flush()
                if self._closing.wait(seconds):
                    # Closing: finish the body at once, so an abandoned client ends quietly
                    # instead of retrying against a closed server.
                    req.wfile.write(data[i + 1:])
                    req.wfile.flush()
                    break
        except OSError:
            pass
