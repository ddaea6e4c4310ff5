"""A real `grok serve` process on 127.0.0.1 for the server tests, and small HTTP helpers.

Every wait is bounded: the server must come up within STARTUP_TIMEOUT seconds (a cold compile on
a busy machine), and must exit within EXIT_TIMEOUT seconds of SIGTERM.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time

import httpx

from conftest import grok_command

STARTUP_TIMEOUT = 600.0  # a cold compile of every step on a machine shared by many jobs
EXIT_TIMEOUT = 60.0
API_KEY = "test-key-123"
# The one engine shape every test module uses, so later modules load it from the compile cache.
ENGINE_ARGS = ["--parallel", "16", "--prefill-chunk", "32"]


class ServerProcess:
    """`grok serve --model demo` on a free port of 127.0.0.1; stderr is collected in `self.log`."""

    def __init__(self, *extra: str, env: dict | None = None):
        cmd, base_env = grok_command()
        self.args = [*cmd, "serve", "--model", "demo", "--host", "127.0.0.1", "--port", "0", *ENGINE_ARGS, *extra]
        self.env = {**base_env, **(env or {})}
        self.log: list[str] = []
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.stdout: list[str] = []
        self.loading_answers: list[tuple[int, dict]] = []  # /health answers before the model was ready

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.args, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        listening = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    listening.set()

        threading.Thread(target=drain, daemon=True).start()
        threading.Thread(target=lambda: self.stdout.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        if not listening.wait(STARTUP_TIMEOUT):
            self.stop()
            raise AssertionError("server did not start listening:\n" + "".join(self.log[-30:]))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n" + "".join(self.log[-30:]))
            try:
                health = httpx.get(self.url + "/health", timeout=5)
                if health.status_code == 200:
                    return self
                self.loading_answers.append((health.status_code, health.json()))
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise AssertionError("server not ready in time:\n" + "".join(self.log[-30:]))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def terminate(self, timeout: float = EXIT_TIMEOUT) -> int:
        """SIGTERM, then wait (bounded) for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("server did not exit after SIGTERM:\n" + "".join(self.log[-30:]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (`name{labels} value`); 0 when absent."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    for line in text.splitlines():
        m = re.match(pattern, line)
        if m:
            return float(m.group(1))
    return 0.0


def wait_for_metric(url: str, name: str, want: float, timeout: float = 10.0) -> float:
    """Poll /metrics until `name` equals `want` (bounded); returns the last value seen."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = metric(httpx.get(url + "/metrics", timeout=5).text, name)
        if value == want:
            return value
        time.sleep(0.05)
    return value
