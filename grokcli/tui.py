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
from rich.markup import escape
from rich.text import Text

from .fsutil import format_bytes, format_rate

_color_mode = "auto"  # auto | always | never (set by --color)
_stderr: list = [None, None]  # (stream, console): rebuilt when sys.stderr is replaced (tests do)


def set_color_mode(mode: str) -> None:
    """Apply --color: 'auto' follows the terminal and NO_COLOR; 'always'/'never' override both."""
    global _color_mode
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"color mode must be auto, always or never, got {mode!r}")
    _color_mode = mode
    _stderr[:] = [None, None]


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
    if _stderr[0] is not sys.stderr:
        _stderr[:] = [sys.stderr, _console_for(sys.stderr)]
    return _stderr[1]


class TransferProgress:
    """A progress display for byte transfers (load, download, verify): bytes, files, rate, ETA.

    Use as a context manager and pass `update` as the library's progress callback (thread-safe:
    Rich's Progress locks). A live bar only in a terminal and without quiet; `summary` prints one
    line at the end (for loading, where nothing else reports the rate).
    """

    def __init__(self, verb: str, subject: str | Path = "", *, quiet: bool = False, summary: bool = False):
        self.verb, self.subject = verb, subject
        self.quiet, self.summary = quiet, summary
        self.bytes_done = self.bytes_total = self.files_done = self.files_total = 0
        self._progress = self._task = None
        self._t0 = 0.0

    def __enter__(self) -> "TransferProgress":
        self._t0 = time.perf_counter()
        console = stderr_console()
        if not self.quiet and console.is_terminal:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(
                TextColumn(f"[bold]{escape(self.verb)}[/] {{task.description}}"), BarColumn(),
                DownloadColumn(binary_units=False), TextColumn("{task.fields[files]}"), TransferSpeedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
            self._progress.start()
            name = Path(self.subject).name if self.subject else ""
            self._task = self._progress.add_task(safe(name), total=None, files="")
        return self

    def update(self, bytes_done: int, bytes_total: int, files_done: int, files_total: int) -> None:
        """The `progress` callback: (bytes done, bytes total, files done, files total)."""
        self.bytes_done, self.bytes_total = bytes_done, bytes_total
        self.files_done, self.files_total = files_done, files_total
        if self._progress is not None:
            self._progress.update(self._task, completed=bytes_done, total=bytes_total or None,
                                  files=f"{files_done}/{files_total} files")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self.summary and exc_type is None and not self.quiet:
            seconds = time.perf_counter() - self._t0
            stderr_console().print(
                f"[dim]loaded {safe(self.subject)} ({format_bytes(self.bytes_done)}, {self.files_done} files) "
                f"in {seconds:.1f} s, {format_rate(self.bytes_done, seconds)}[/]")


def LoadProgress(checkpoint: Path, *, quiet: bool = False) -> TransferProgress:
    """The progress display of `grokcli.load(progress=...)`, with a summary line at the end."""
    return TransferProgress("loading", checkpoint, quiet=quiet, summary=True)


_CONTROL = dict.fromkeys([*range(0, 9), *range(11, 32), 127, *range(0x80, 0xA0)])


def safe(text) -> str:
    """Text from outside (file names, file contents, option values) made safe to print through Rich:
    control characters (ESC sequences that could clear the screen or fake output) dropped, markup escaped."""
    return escape(str(text).translate(_CONTROL))


def print_error(message: str) -> None:
    """`error: message` on stderr: one line, markup and control characters neutralised."""
    line = " ".join(str(message).split("\n")[0:1]).strip() or "unknown error"
    stderr_console().print(f"[bold red]error:[/] {safe(line)}", highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    stderr_console().print(f"[yellow]warning:[/] {safe(message)}", highlight=False, soft_wrap=True)


def print_note(message: str, *, style: str = "") -> None:
    """A plain status line on stderr (text from outside is escaped)."""
    stderr_console().print(f"[{style}]{safe(message)}[/]" if style else safe(message), highlight=False)


def format_seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def stats_line(stats, finish_reason: str, *, prefix: str = "") -> str:
    """The one-line summary printed after a completion (plain text, no markup)."""
    peak = format_bytes(stats.peak_memory_bytes) if stats.peak_memory_bytes else "n/a"
    cached = getattr(stats, "cached_tokens", 0)
    reused = f" ({cached} cached)" if cached else ""
    return (f"{prefix}prompt {stats.prompt_tokens} tok{reused}, {stats.prefill_tokens_per_s:.1f} tok/s | "
            f"first token {format_seconds(stats.time_to_first_token_s)} | "
            f"generated {stats.generated_tokens} tok, {stats.decode_tokens_per_s:.1f} tok/s | "
            f"peak mem {peak} | finish: {finish_reason}")


def prob_style(logprob: Optional[float]) -> str:
    """Colour a token by its probability: green likely, yellow unsure, red unlikely."""
    if logprob is None:
        return ""
    p = math.exp(logprob)
    if p >= 0.7:
        return "green"
    if p >= 0.3:
        return "yellow"
    return "red"


class TextSink:
    """Writes model text to stdout as it arrives, flushed per token; colour only when allowed."""

    def __init__(self, stream: Optional[IO] = None, *, show_probs: bool = False):
        self.stream = stream if stream is not None else sys.stdout
        self.color = _wants_color(self.stream)
        self.show_probs = show_probs and self.color
        self.wrote = ""  # the last characters written, to decide on a final newline
        self._console = _console_for(self.stream) if self.show_probs else None

    def write(self, text: str, logprob: Optional[float] = None) -> None:
        if not text:
            return
        if self._console is not None:
            self._console.print(Text(text, style=prob_style(logprob)), end="")
        else:
            self.stream.write(text)
        self.stream.flush()
        self.wrote = (self.wrote + text)[-1:]

    def end_line(self) -> None:
        """Finish the output with a newline when it does not already end with one."""
        if self.wrote and self.wrote != "\n":
            self.stream.write("\n")
            self.wrote = "\n"
        self.stream.flush()


class StatusDisplay:
    """Compile / prefill status on stderr: a spinner in a terminal, plain lines otherwise.

    The spinner must stop before any token is written (stdout and stderr often share a terminal).
    """

    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        self._status = None

    def show(self, event) -> None:
        if self.quiet and event.kind != "truncated":
            return
        console = stderr_console()
        if event.kind == "truncated":
            self.stop()
            console.print(f"[yellow]{safe(event.message)}[/]")
            return
        if event.kind == "compiled":
            self.stop()
            took = f" in {format_seconds(event.seconds)}" if event.seconds is not None else ""
            console.print(f"[dim]{safe(event.message)}{took}[/]")
            return
        if console.is_terminal:
            if self._status is None:
                self._status = console.status(safe(event.message), spinner="dots")
                self._status.start()
            else:
                self._status.update(safe(event.message))
        elif event.kind == "compiling":
            console.print(f"[dim]{safe(event.message)}[/]")

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def render_events(events, *, quiet: bool, on_token, on_done) -> None:
    """Drive one generation's events: status (a spinner in a terminal) on stderr, stopped before any
    text is written; each TokenEvent to `on_token`, each DoneEvent to `on_done`.

    On Ctrl-C the spinner stops, the generator is closed (the engine frees its buffers) and
    KeyboardInterrupt propagates to the caller, which decides what an interruption means.
    """
    from .events import DoneEvent, StatusEvent, TokenEvent

    status = StatusDisplay(quiet=quiet)
    try:
        for ev in events:
            if isinstance(ev, StatusEvent):
                status.show(ev)
                continue
            status.stop()
            if isinstance(ev, TokenEvent):
                on_token(ev)
            elif isinstance(ev, DoneEvent):
                on_done(ev)
    except KeyboardInterrupt:
        status.stop()
        close = getattr(events, "close", None)
        if close is not None:
            close()
        raise
    finally:
        status.stop()


def print_stats(stats, finish_reason: str, *, prefix: str = "") -> None:
    stderr_console().print(Text(stats_line(stats, finish_reason, prefix=prefix), style="dim"))


def print_probs(records, *, title: str = "token probabilities") -> None:
    """A table of each generated token's probability and its top alternatives (stderr)."""
    from rich.table import Table

    table = Table(title=title, show_lines=False, box=None, pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("id", justify="right", style="dim")
    table.add_column("text")
    table.add_column("p", justify="right")
    table.add_column("top alternatives")
    for i, ev in enumerate(records):
        p = math.exp(ev.logprob) if ev.logprob is not None else float("nan")
        alts = ", ".join(f"{t.text!r} {math.exp(t.logprob):.2f}" for t in (ev.top_logprobs or ()))
        table.add_row(str(i), str(ev.token_id), Text(repr(ev.text)), Text(f"{p:.3f}", style=prob_style(ev.logprob)), alts)
    stderr_console().print(table)


def print_info(info: dict, *, show_memory: bool = False, stream: Optional[IO] = None) -> None:
    """Render `grok info` (to stdout: it is what the user asked for)."""
    from rich.table import Table

    console = _console_for(stream if stream is not None else sys.stdout)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    cfg = info["config"]
    table.add_row("checkpoint", f"{safe(info['checkpoint'])}  ({safe(info['source'])})" if info["checkpoint"]
                  else safe(info["source"]))
    table.add_row("tokenizer", safe(info["tokenizer"] or "none (pass --tokenizer)"))
    table.add_row("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e9:.2f} B)")
    if not info.get("from_shapes"):
        table.add_row("on disk", f"{format_bytes(info['bytes_on_disk'])} in {info['files_found']} files "
                                 f"(expected {info['files_expected']})")
    table.add_row("architecture",
                  f"{cfg['num_layers']} layers, emb {cfg['emb_size']}, {cfg['num_q_heads']} q / "
                  f"{cfg['num_kv_heads']} kv heads x {cfg['key_size']}, {cfg['num_experts']} experts "
                  f"(top {cfg['num_selected_experts']}), ffn {cfg['ffn_size']}")
    table.add_row("vocabulary", f"{cfg['vocab_size']:,} (pad {cfg['pad_token']}, eos {cfg['eos_token']})")
    table.add_row("context", f"{cfg['sequence_len']:,} tokens")
    if info["backend"] is not None:
        table.add_row("backend", f"{info['backend']}: {len(info['devices'])} device(s) "
                                 f"{', '.join(info['devices'][:8])}{' ...' if len(info['devices']) > 8 else ''}")
    if info.get("cpu_matmul"):
        table.add_row("cpu matmul", safe(info["cpu_matmul"]))
    mem = info["memory"]
    fits = {True: "[green]fits[/]", False: "[red]does not fit[/]", None: "device memory unknown"}[mem["fits"]]
    table.add_row("memory needed",
                  f"{format_bytes(mem['total_bytes'])} on all {mem['devices']} device(s) together, "
                  f"{format_bytes(mem['per_device_bytes'])} per device "
                  f"on mesh {mem['mesh']} (batch {mem['batch']}, context {mem['context']:,}): {fits}")
    if show_memory:
        for label, key in (("weights", "weights"), ("KV cache", "kv_cache"), ("activations", "activations")):
            per_device = mem.get(f"{key}_per_device_bytes")
            whole = " (one copy)" if key == "weights" else " (all devices)" if key == "activations" else ""
            table.add_row(f"  {label}", format_bytes(mem[f"{key}_bytes"]) + whole + (
                f", {format_bytes(per_device)} per device" if per_device is not None else ""))
        if mem["device_memory_bytes"]:
            usable = mem.get("usable_bytes")
            table.add_row("  device memory", format_bytes(mem["device_memory_bytes"]) + (
                f" ({format_bytes(usable)} usable after the runtime's reserve)" if usable else ""))
    console.print(table)


def print_download_plan(plan) -> None:
    """`grok download --dry-run`: one line per file on stdout (what was asked for), a summary on stderr."""
    for f in plan.selected:
        state = "present" if f.path in plan.present else "fetch"
        src = "" if f.source == f.path else f"  <- {f.source}"
        sys.stdout.write(f"{state:8} {f.size:>16,}  {f.path}{src}\n")
    stderr_console().print(
        f"{safe(plan.repo_id)}@{safe(plan.revision[:12])}: {len(plan.to_fetch)} of {len(plan.selected)} files "
        f"to fetch, {format_bytes(plan.bytes_to_fetch)} into {safe(plan.local_dir)} (dry run: nothing fetched)")


def print_download_start(plan) -> None:
    stderr_console().print(f"downloading {len(plan.to_fetch)} files, {format_bytes(plan.bytes_to_fetch)}, "
                           f"from {safe(plan.repo_id)}@{safe(plan.revision[:12])} into {safe(plan.local_dir)}")


def print_download_result(plan, result, *, quiet: bool) -> None:
    """Warnings (always) and the summary line (unless quiet) of a download; `result` None: nothing to fetch."""
    console = stderr_console()
    if result is None:
        console.print(f"{safe(plan.local_dir)}: all {len(plan.selected)} files already present "
                      f"({safe(plan.repo_id)}@{safe(plan.revision[:12])})")
        return
    for w in result.warnings:
        print_warning(w)
    if not quiet:
        console.print(f"downloaded {len(result.fetched)} files ({format_bytes(plan.bytes_to_fetch)}) in "
                      f"{result.seconds:.1f} s, {format_rate(plan.bytes_to_fetch, result.seconds)}; "
                      f"check every byte with `grok verify-checkpoint {safe(plan.local_dir)}`")


def print_verify_report(report, directory: Path, *, quick: bool, quiet: bool) -> None:
    """The FAIL/warn table, the notes and the OK/FAILED line of `grok verify-checkpoint` (stderr)."""
    from rich.table import Table

    console = stderr_console()
    if report.problems and not (quiet and report.ok):
        table = Table(title=None, show_lines=False, highlight=False)
        for col in ("", "check", "file", "parameter", "problem"):
            table.add_column(col, overflow="fold")
        for p in report.problems:
            table.add_row("[red]FAIL[/]" if p.fatal else "[yellow]warn[/]", safe(p.check), safe(p.path),
                          safe(p.param or ""), safe(p.message))
        console.print(table)
    if not quiet:
        for note in report.notes:
            console.print(safe(note))
    what = "sizes" if quick else ("sizes, hashes, structure" if report.integrity_proven else "structure")
    against = f" against {safe(report.manifest)}" if report.manifest else ""
    speed = "" if quick else f", {format_bytes(report.bytes_read)} at {format_rate(report.bytes_read, report.seconds)}"
    if report.ok:
        if not quiet:
            note = "" if report.integrity_proven or quick else " [yellow](integrity not proven: no manifest)[/]"
            console.print(f"[bold green]OK[/] {safe(directory)}: {report.files_expected} files, {what}{against} "
                          f"in {report.seconds:.1f} s{speed}{note}")
        return
    files = len({p.path for p in report.failures})
    console.print(f"[bold red]FAILED[/] {safe(directory)}: {len(report.failures)} problem(s) in {files} file(s)"
                  f"{against}{speed}")
