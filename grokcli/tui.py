"""Rich rendering for the CLI: loading progress, compile status, streamed tokens, stats lines.

Everything decorative goes to stderr. stdout only ever receives model text (or JSON), written by
`TextSink`, which adds colour only when stdout is a terminal (or --color always) and NO_COLOR
is unset.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Optional

from rich.console import Console
from rich.text import Text

_color_mode = "auto"  # auto | always | never (set by --color)
_consoles: dict[str, Console] = {}


def set_color_mode(mode: str) -> None:
    """Apply --color: 'auto' follows the terminal and NO_COLOR; 'always'/'never' override both."""
    global _color_mode
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"color mode must be auto, always or never, got {mode!r}")
    _color_mode = mode
    _consoles.clear()


def color_mode() -> str:
    return _color_mode


def _wants_color(stream: IO) -> bool:
    if _color_mode == "always":
        return True
    if _color_mode == "never" or os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _console_for(stream: IO) -> Console:
    color = _wants_color(stream)
    width = None
    if os.environ.get("GROK_CONSOLE_WIDTH"):  # tests pin the width
        width = int(os.environ["GROK_CONSOLE_WIDTH"])
    return Console(
        file=stream,
        force_terminal=True if _color_mode == "always" else None,
        no_color=not color,
        color_system="auto" if color else None,
        highlight=False,
        width=width,
        soft_wrap=True,
    )


def stderr_console() -> Console:
    """The console for progress, status, stats and errors (stderr; created per stream object)."""
    key = f"err:{id(sys.stderr)}:{_color_mode}"
    if key not in _consoles:
        _consoles[key] = _console_for(sys.stderr)
    return _consoles[key]


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def format_bytes(n: float) -> str:
    """1.5 GB style sizes (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


class LoadProgress:
    """A progress display for loading a checkpoint: bytes, files, throughput, ETA (stderr).

    Use as a context manager and pass `update` to `grokcli.load(progress=...)`. In a terminal it is
    a live Rich progress bar; otherwise a single summary line is printed at the end.
    """

    def __init__(self, checkpoint: Path, *, quiet: bool = False):
        self.checkpoint = checkpoint
        self.quiet = quiet
        self.bytes_done = 0
        self.bytes_total = 0
        self.files_done = 0
        self.files_total = 0
        self._progress = None
        self._task = None
        self._t0 = 0.0

    def __enter__(self) -> "LoadProgress":
        self._t0 = time.perf_counter()
        console = stderr_console()
        if not self.quiet and console.is_terminal:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(
                TextColumn("[bold]loading[/] {task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=False),
                TextColumn("{task.fields[files]}"),
                TransferSpeedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.checkpoint.name or str(self.checkpoint), total=None,
                                                 files="")
        return self

    def update(self, bytes_done: int, bytes_total: int, files_done: int, files_total: int) -> None:
        """The `progress` callback of grokcli.load."""
        self.bytes_done, self.bytes_total = bytes_done, bytes_total
        self.files_done, self.files_total = files_done, files_total
        if self._progress is not None:
            self._progress.update(self._task, completed=bytes_done, total=bytes_total or None,
                                  files=f"{files_done}/{files_total} files")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._progress is not None:
            self._progress.stop()
        if exc_type is None and not self.quiet:
            seconds = time.perf_counter() - self._t0
            rate = self.bytes_done / seconds if seconds > 0 else 0.0
            stderr_console().print(
                f"[dim]loaded {self.checkpoint} ({format_bytes(self.bytes_done)}, {self.files_done} files) "
                f"in {seconds:.1f} s, {format_bytes(rate)}/s[/]")
