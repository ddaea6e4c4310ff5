"""`grok serve`: an OpenAI-compatible HTTP server with continuous batching.

    from grokcli.server import serve
    serve(model, tokenizer, port=8000)

Modules: `scheduler` (the continuous-batching engine, no HTTP), `api` (the FastAPI app and
OpenAI wire format), `schemas` (request validation), `chat` (chat templates), `metrics`
(Prometheus), `serving` (uvicorn, signals, background loading). Needs the `serve` extra:
`pip install 'grokcli[serve]'`.
"""

from __future__ import annotations

import importlib
import importlib.util

EXTRA_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")
INSTALL_HINT = "pip install 'grokcli[serve]'"

_LAZY = {
    "Engine": "scheduler", "EngineConfig": "scheduler", "QueueFull": "scheduler", "EngineClosed": "scheduler",
    "create_app": "api", "ServerSettings": "api",
    "serve": "serving", "ServeError": "serving",
    "ChatTemplate": "chat", "TEMPLATES": "chat",
}

__all__ = ["missing_packages", "INSTALL_HINT", *_LAZY]


def missing_packages() -> list[str]:
    """The server's optional dependencies that are not installed (empty when it can run)."""
    return [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is None]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'grokcli.server' has no attribute {name!r}")
