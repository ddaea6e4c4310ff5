"""Running the server: the socket, uvicorn, loading in the background, and a clean exit.

    grokcli.server.serve(model, tokenizer, port=8000)                  # a loaded model
    grokcli.server.serve(load=lambda: grokcli.load(path), port=8000)   # /health is 503 while it loads

Ctrl-C or SIGTERM: the listening socket closes, requests in flight finish (up to
`shutdown_timeout` seconds, then they are cancelled), the engine stops, and serve() returns.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import threading
import time
from typing import Callable

import uvicorn

from .. import errors
from .scheduler import Engine, EngineConfig

log = logging.getLogger("grokcli.server")


class ServeError(errors.GrokError):
    """The server cannot start as asked (address, security, multi-host)."""


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to expose an unauthenticated server beyond this machine unless told to."""
    if not is_loopback(host) and not api_key and not allow_unauthenticated:
        raise ServeError(f"refusing to serve on {host} without an API key: anyone who can reach it could use the "
                         "model; set --api-key (or GROK_API_KEY), or pass --allow-unauthenticated")


def check_single_host() -> None:
    """Multi-host (jax.distributed) serving is not implemented: refuse it plainly."""
    from .. import distributed

    if distributed.process_count() > 1:
        raise ServeError("grok serve runs on one host only (multi-host jax.distributed serving is not supported); "
                         "serve from one machine with its local devices (--mesh)")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free port. ServeError when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _log_config(level: str) -> dict:
    """uvicorn's logging, all on stderr (stdout is for model text only)."""
    fmt = {"()": "logging.Formatter", "fmt": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    handler = {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
    return {"version": 1, "disable_existing_loggers": False, "formatters": {"plain": fmt},
            "handlers": {"stderr": handler},
            "loggers": {name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "grokcli.server")}}


def serve(model=None, tokenizer=None, *, load: Callable[[], tuple] | None = None, host: str = "127.0.0.1",
          port: int = 8000, settings=None, engine_config: EngineConfig | None = None,
          allow_unauthenticated: bool = False, shutdown_timeout: float = 30.0, log_level: str = "info",
          on_listen: Callable[[str, int], None] | None = None) -> None:
    """Serve a model over HTTP until Ctrl-C / SIGTERM; returns after a graceful shutdown.

    Give `model, tokenizer`, or `load`, a function returning them, which runs in the background
    while the server already answers (/health 503 until the model is loaded and compiled). If
    loading fails, the server stops and serve() raises that error.
    """
    from .api import ServerSettings, create_app

    if (model is None) == (load is None):
        raise TypeError("give either model (and tokenizer) or load")
    settings = settings or ServerSettings()
    check_bind(host, settings.api_key, allow_unauthenticated)
    check_single_host()
    sock = bind_socket(host, port)
    app = create_app(settings)
    state = app.state.grok
    config = uvicorn.Config(app, log_config=_log_config(log_level), log_level=log_level,
                            timeout_graceful_shutdown=max(1, int(shutdown_timeout)), lifespan="off",
                            access_log=log_level == "debug")
    server = _Server(config)
    engine_box: list[Engine] = []
    failure: list[BaseException] = []

    def bring_up():
        try:
            lm, tok = (model, tokenizer) if load is None else load()
            if tok is None:
                raise ServeError("the model has no tokenizer (tokenizer.model); pass one")
            t0 = time.perf_counter()
            engine = Engine(lm, tok, engine_config, observer=state.metrics)
            engine_box.append(engine)
            engine.start()
            log.info("model ready: %d slots of %d tokens, compiled in %.1fs", engine.slots, engine.context,
                     time.perf_counter() - t0)
            state.ready(engine)
        except BaseException as e:  # noqa: BLE001 - reported by serve() in the caller's thread
            if not isinstance(e, errors.GrokError):
                log.exception("loading the model failed")
            state.failed(str(e) or type(e).__name__)
            failure.append(e)
            server.should_exit = True  # serve() re-raises it once the server has stopped

    server.on_exit = lambda: engine_box and engine_box[0].stop_accepting()
    loader = threading.Thread(target=bring_up, name="grok-loader", daemon=True)
    loader.start()
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("listening on http://%s:%d (model %s)", shown, bound_port, settings.model_name)
    if on_listen is not None:
        on_listen(bound_host, bound_port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if engine_box:
            engine_box[0].close()
    if failure:
        raise failure[0]


class _Server(uvicorn.Server):
    """uvicorn's Server, with signals that end serve() normally (exit status 0) instead of being
    re-raised after the graceful shutdown, and a hook that stops new work on the first signal."""

    on_exit: Callable[[], object] | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame):
        if not self.should_exit:
            log.info("shutting down: finishing the requests in flight (Ctrl-C again to stop now)")
            if self.on_exit is not None:
                self.on_exit()
        super().handle_exit(sig, frame)
