"""The Typer application, its root options, and the one place that turns errors into exit codes.

Nothing here imports jax (or the modules that do) at import time, so `grok --help` and
`grok --version` stay fast; each command imports the library when it runs.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import sys
import traceback
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup, TyperOption

from .. import __version__
from ..errors import GrokError, UsageError

EXIT_RUNTIME = 1  # something failed while doing the work (bad file, out of memory, ...)
EXIT_USAGE = 2  # the command line asks for something impossible; fixing the command fixes it
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


@dataclasses.dataclass
class _State:
    """Process-wide switches set by eager options before any command body runs."""

    debug: bool = False  # show tracebacks instead of one-line errors
    color: str = "auto"  # auto | always | never


_state = _State()


def usage_error(message: str, option: Optional[str] = None) -> UsageError:
    """An error the user fixes by changing the command line (exit 2)."""
    return UsageError(message, option=option)


def exit_code_for(exc: BaseException) -> int:
    """The exit code the CLI uses for an exception (2 usage, 1 runtime, 130 interrupted)."""
    from typer._click import exceptions as click_exc

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, click_exc.ClickException):
        return exc.exit_code
    if isinstance(exc, GrokError):
        return exc.exit_code
    return EXIT_RUNTIME


def describe_error(exc: BaseException) -> str:
    """A one-line message for an exception the CLI is about to report."""
    from typer._click import exceptions as click_exc

    if isinstance(exc, click_exc.UsageError):
        msg = exc.format_message()
        cmd = exc.ctx.command_path if exc.ctx is not None else "grok"
        return f"{msg} (see '{cmd} --help')"
    if isinstance(exc, click_exc.ClickException):
        return exc.format_message()
    if isinstance(exc, GrokError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of host memory (try a smaller --batch/--context, or a machine with more RAM)"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or exc}{where}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return f"out of accelerator memory: {text} (see `grok info --memory`)"
    name = type(exc).__name__
    return f"{name}: {text} (internal error; rerun with --debug for the traceback)"


class GrokGroup(TyperGroup):
    """The top-level command group: turns every exception into one line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from typer._click import exceptions as click_exc

        from .. import tui

        # Fresh switches for every invocation (tests run many in one process).
        _state.debug, _state.color = bool(os.environ.get("GROK_DEBUG")), "auto"
        tui.set_color_mode("auto")
        try:
            rv = super().main(args=args, prog_name=prog_name or "grok", complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click_exc.NoArgsIsHelpError as exc:
            exc.show()  # `grok` alone: the help, exit 2 as click does
            code = EXIT_USAGE
        except typer.Abort:
            code = EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`grok complete ... | head`): stop quietly, as `cat` does.
            _silence_stdout()
            code = EXIT_RUNTIME
        except Exception as exc:  # noqa: BLE001 - this is the one place that reports errors
            if _state.debug and not isinstance(exc, click_exc.ClickException):
                traceback.print_exc(file=sys.stderr)
            tui.print_error(describe_error(exc))
            code = exit_code_for(exc)
        except KeyboardInterrupt:
            if _state.debug:
                traceback.print_exc(file=sys.stderr)
            tui.print_error("interrupted")
            code = EXIT_INTERRUPTED
        if not standalone_mode:
            return code
        sys.exit(code)


def _silence_stdout() -> None:
    # After EPIPE, Python would complain again while flushing stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class ColorMode(str, enum.Enum):
    auto = "auto"
    always = "always"
    never = "never"


def _set_debug(value: bool) -> bool:
    if value:
        _state.debug = True
    return value


def _set_color(value: Optional[ColorMode]) -> Optional[ColorMode]:
    if value is not None:
        _state.color = value.value
        from .. import tui

        tui.set_color_mode(value.value)
    return value


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"grok {__version__}")
        raise typer.Exit()


# Accepted by the root and by every command, so they work before or after the command name.
DebugOpt = Annotated[bool, typer.Option(
    "--debug", envvar="GROK_DEBUG", is_eager=True, callback=_set_debug,
    help="Show the full traceback when something fails.")]
ColorOpt = Annotated[Optional[ColorMode], typer.Option(
    "--color", is_eager=True, callback=_set_color, case_sensitive=False,
    help="Colour in the terminal: auto (when writing to a terminal and NO_COLOR is unset), always, never.",
    show_default=False)]

def _flag_type_hidden(display_type_rich):
    """Help shows `--quiet`, not `--quiet <bool>` (which invites `--quiet true`, an error)."""

    @functools.wraps(display_type_rich)
    def display(self, ctx):
        return None if self.is_flag and not self.count else display_type_rich(self, ctx)

    return display


TyperOption.display_type_rich = _flag_type_hidden(TyperOption.display_type_rich)

app = typer.Typer(
    name="grok",
    cls=GrokGroup,
    help="Run xAI's open-weights Grok-1 (or any model of its architecture): complete, repl, info.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", is_eager=True, callback=_version_callback,
                                          help="Print the version and exit.")] = False,
    debug: DebugOpt = False,
    color: ColorOpt = None,
) -> None:
    """Run xAI's open-weights Grok-1 (or any model of its architecture) from the terminal.

    Model text goes to stdout; progress, status and statistics go to stderr.
    """
