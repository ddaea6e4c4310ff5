"""The `grok` command: parses options, calls the library, renders what it yields.

    app.py          the Typer app, --version/--debug/--color, errors -> one line + exit code
    options.py      options shared by commands (declared once) and the load helper
    generate.py     complete, repl
    info.py         info
    checkpoints.py  download, verify-checkpoint
    serve.py        serve (the OpenAI-compatible server, grokcli.server)
"""

from __future__ import annotations

from typing import Any, Optional

from . import checkpoints, generate, info, serve  # noqa: F401 - importing a command module registers its commands
from .app import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, app, describe_error, exit_code_for

__all__ = ["app", "main", "describe_error", "exit_code_for", "EXIT_USAGE", "EXIT_RUNTIME", "EXIT_INTERRUPTED"]


def main(argv: Optional[list[str]] = None) -> Any:
    """Console-script entry point (`grok = "grokcli.cli:main"`)."""
    return app(args=argv, prog_name="grok")
