"""The interactive `grok repl`: a prompt_toolkit session over a growing document or a chat.

`ReplSession` holds the state (turns, settings, template) and runs one turn by rendering what
`grokcli.stream_generate` yields; `run_repl` adds the terminal: history, completion, key bindings.
Nothing here knows how the model works.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

from .errors import GrokError, UsageError
from .fsutil import atomic_write_text
from .stops import expand_escapes
from .sampling_params import SamplingParams

TEMPLATES = ("document", "chat")
CHAT_USER, CHAT_BOT = "Human:", "Assistant:"
SAVE_FORMAT = "grokcli-repl-session"

COMMANDS = {
    "/help": "show this help",
    "/set": "/set <param> <value>: change a sampling option (e.g. /set temp 0, /set stop none)",
    "/show": "current settings and context usage",
    "/clear": "forget the transcript and start over",
    "/regen": "regenerate the last answer",
    "/undo": "remove the last turn (your input and the model's answer)",
    "/save": "/save <file>: write the transcript and settings as JSON",
    "/load": "/load <file>: read a transcript and settings saved with /save",
    "/exit": "leave (Ctrl-D works too)",
}

# /set names -> SamplingParams field (flag names and common aliases both work).
SETTABLE = {
    "temp": "temperature", "temperature": "temperature", "top-k": "top_k", "top_k": "top_k",
    "top-p": "top_p", "top_p": "top_p", "min-p": "min_p", "min_p": "min_p",
    "repeat-penalty": "repetition_penalty", "repeat_penalty": "repetition_penalty",
    "repetition_penalty": "repetition_penalty", "seed": "seed", "max-tokens": "max_tokens",
    "max_tokens": "max_tokens", "n": "max_tokens", "stop": "stop", "ignore-eos": "ignore_eos",
    "ignore_eos": "ignore_eos",
}
_SET_NAMES = ("temp", "top-k", "top-p", "min-p", "repeat-penalty", "seed", "max-tokens", "stop", "ignore-eos",
              "template")


class ReplError(UsageError):
    """A slash command that cannot be done; shown as one line, the session continues."""


@dataclasses.dataclass
class Turn:
    """One exchange: what the user typed and what the model wrote after it."""

    input: str
    output: str = ""
    finish_reason: str = ""


def _parse_bool(value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ReplError(f"expected on/off, got {value!r}")


def _parse_value(field: str, value: str):
    if field == "stop":
        if value.lower() in ("none", "off", ""):
            return ()
        # Escapes let a stop string hold a newline: /set stop \n\n
        return (expand_escapes(value),)
    if field == "ignore_eos":
        return _parse_bool(value)
    kind = {f.name: f.type for f in dataclasses.fields(SamplingParams)}[field]
    try:
        return int(value) if kind in ("int", int) else float(value)
    except ValueError:
        raise ReplError(f"{field} expects {'an integer' if kind in ('int', int) else 'a number'}, "
                        f"got {value!r}") from None


class ReplSession:
    """The state of a REPL session and one turn's generation.

    `stream` is `grokcli.stream_generate` (or a stand-in with the same signature); `write` receives
    model text (stdout), `info` receives status lines (stderr). `prompt_cache` (a
    grokcli.PromptCache; made by default with the real stream) keeps the KV of the transcript,
    so each turn, /regen and /undo prefill only the text that differs from the last request.
    """

    def __init__(self, model, tokenizer, sampling: SamplingParams, *, template: str = "document",
                 stream: Optional[Callable] = None, context_len: Optional[int] = None,
                 write: Optional[Callable[[str], None]] = None, info: Optional[Callable[[str], None]] = None,
                 quiet: bool = False, prompt_cache=None):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        if stream is None:
            import grokcli

            stream = grokcli.stream_generate
            prompt_cache = prompt_cache if prompt_cache is not None else grokcli.PromptCache()
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.template = template
        self.turns: list[Turn] = []
        self.generations = 0  # bumps the seed so /regen gives a new answer
        self.context_len = context_len or getattr(getattr(model, "config", None), "sequence_len", None) or 8192
        self._stream = stream
        self._write = write or _stdout_write
        self._info = info or _stderr_info
        self.quiet = quiet
        self.prompt_cache = prompt_cache

    # -- the document the model sees --------------------------------------------------------

    def render(self, turns: Iterable[Turn], pending: Optional[str] = None) -> str:
        """The transcript of `turns`, followed by the prompt for `pending` input when given."""
        parts: list[str] = []
        for t in turns:
            parts.append(self._render_input(t.input, first=not parts) + self._render_output(t.output))
        if pending is not None:
            parts.append(self._render_input(pending, first=not parts))
        return "".join(parts)

    def _render_input(self, text: str, *, first: bool) -> str:
        if self.template == "chat":
            return f"{CHAT_USER} {text}\n\n{CHAT_BOT}"
        # A growing document: each input starts on a new line unless the text already broke it.
        return text if first else "\n" + text

    def _render_output(self, text: str) -> str:
        return f" {text.strip()}\n\n" if self.template == "chat" else text

    def transcript(self) -> str:
        return self.render(self.turns)

    def context_used(self, text: Optional[str] = None) -> int:
        """Tokens of the transcript (or of `text`)."""
        return len(self.tokenizer.encode(self.transcript() if text is None else text))

    def _turn_sampling(self) -> SamplingParams:
        stops = self.sampling.stop
        if self.template == "chat":
            stops = tuple(dict.fromkeys(stops + ("\n" + CHAT_USER, CHAT_USER)))
        return self.sampling.replace(stop=stops, seed=(self.sampling.seed + self.generations) & 0x7FFFFFFF)

    # -- one turn ---------------------------------------------------------------------------

    def send(self, text: str) -> Turn:
        """Append the user's input and let the model continue; returns the finished turn."""
        turn = Turn(text)
        self.turns.append(turn)
        self._generate(turn)
        return turn

    def regen(self) -> Turn:
        if not self.turns:
            raise ReplError("nothing to regenerate yet")
        turn = self.turns[-1]
        turn.output, turn.finish_reason = "", ""
        self._generate(turn)
        return turn

    def undo(self) -> Turn:
        if not self.turns:
            raise ReplError("nothing to undo")
        return self.turns.pop()

    def clear(self) -> None:
        self.turns.clear()

    def _generate(self, turn: Turn) -> None:
        from . import tui

        prompt = self.render(self.turns[:-1], pending=turn.input)
        used = self.context_used(prompt)
        sampling = self._turn_sampling()
        truncate = None
        if used + 1 > self.context_len:
            truncate = "left"
            self._info(f"the transcript ({used} tokens) exceeds the context ({self.context_len}); "
                       "the oldest text is dropped for this turn (/clear or /undo to shorten it)")
        elif used + sampling.max_tokens > self.context_len:
            self._info(f"context nearly full: {used} of {self.context_len} tokens used; "
                       f"the answer may stop early (/clear or /undo to make room)")
        self.generations += 1
        # The answer continues the transcript: keep its first piece's leading space.
        reuse = {} if self.prompt_cache is None else {"prompt_cache": self.prompt_cache}
        events = self._stream(self.model, self.tokenizer, prompt, sampling, truncate=truncate, continuation=True,
                              **reuse)
        wrote = [False]

        def on_token(ev) -> None:
            if ev.text:
                turn.output += ev.text
                self._write(ev.text)
                wrote[0] = True

        def on_done(ev) -> None:
            if ev.final_delta:
                self._write(ev.final_delta)
                wrote[0] = True
            turn.output, turn.finish_reason = ev.text, ev.finish_reason
            if wrote[0] or ev.text:
                self._write("\n")
            if not self.quiet:
                self._info(tui.stats_line(ev.stats, ev.finish_reason))

        try:
            tui.render_events(events, quiet=self.quiet, on_token=on_token, on_done=on_done)
        except KeyboardInterrupt:
            # Keep what was written; the model stays usable for the next turn.
            turn.finish_reason = "interrupted"
            if wrote[0]:
                self._write("\n")
            self._info("interrupted (partial text kept; /regen for a new answer, /undo to drop it)")

    # -- slash commands ---------------------------------------------------------------------

    def handle(self, line: str) -> Optional[str]:
        """Run a slash command; returns text to show, or raises SystemExit for /exit."""
        parts = line.strip().split(maxsplit=2)
        cmd, args = parts[0].lower(), parts[1:]
        if cmd in ("/exit", "/quit", "/bye"):
            raise SystemExit(0)
        if cmd in ("/help", "/?"):
            return help_text()
        if cmd == "/set":
            if not args:
                raise ReplError("usage: /set <param> <value>; params: " + ", ".join(_SET_NAMES))
            return self.set(*args)
        if cmd == "/show":
            return self.show()
        if cmd == "/clear":
            self.clear()
            return "transcript cleared"
        if cmd == "/undo":
            t = self.undo()
            return f"removed the last turn ({len(t.input)} + {len(t.output)} characters)"
        if cmd == "/save":
            if not args:
                raise ReplError("usage: /save <file>")
            path = self.save(Path(" ".join(args)).expanduser())
            return f"saved {len(self.turns)} turns to {path}"
        if cmd == "/load":
            if not args:
                raise ReplError("usage: /load <file>")
            self.load(Path(" ".join(args)).expanduser())
            return f"loaded {len(self.turns)} turns ({self.template}); context {self.context_used()} tokens"
        if cmd == "/regen":
            self.regen()
            return None
        raise ReplError(f"unknown command {cmd}; /help lists them")

    def set(self, name: str, value: str = "") -> str:
        key = name.lower()
        if key == "template":
            if value not in TEMPLATES:
                raise ReplError(f"template must be one of {', '.join(TEMPLATES)}")
            self.template = value
            return f"template = {value}"
        if key not in SETTABLE:
            raise ReplError(f"unknown setting {name!r}; settable: {', '.join(_SET_NAMES)}")
        if not value and key not in ("stop",):
            raise ReplError(f"usage: /set {name} <value>")
        field = SETTABLE[key]
        try:
            self.sampling = self.sampling.replace(**{field: _parse_value(field, value)})
        except ValueError as e:
            raise ReplError(str(e)) from None
        shown = list(self.sampling.stop) if field == "stop" else getattr(self.sampling, field)
        return f"{field} = {shown!r}" if field == "stop" else f"{field} = {shown}"

    def show(self) -> str:
        s = self.sampling
        used = self.context_used()
        lines = [
            f"template        {self.template}",
            f"temperature     {s.temperature}",
            f"top_k           {s.top_k}",
            f"top_p           {s.top_p}",
            f"min_p           {s.min_p}",
            f"repeat_penalty  {s.repetition_penalty}",
            f"seed            {s.seed}",
            f"max_tokens      {s.max_tokens}",
            f"stop            {list(s.stop)!r}",
            f"ignore_eos      {'on' if s.ignore_eos else 'off'}",
            f"context         {used} / {self.context_len} tokens ({100 * used / self.context_len:.0f}%), "
            f"{len(self.turns)} turns",
        ]
        return "\n".join(lines)

    def to_json(self) -> dict:
        s = dataclasses.asdict(self.sampling)
        s["stop"] = list(self.sampling.stop)
        return {"format": SAVE_FORMAT, "version": 1, "template": self.template, "sampling": s,
                "turns": [dataclasses.asdict(t) for t in self.turns], "transcript": self.transcript()}

    def save(self, path: Path) -> Path:
        """Write the session as JSON, atomically (temp file + rename)."""
        path = path.resolve()
        data = json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"
        try:
            atomic_write_text(path, data)
        except OSError as e:
            raise ReplError(f"cannot save to {path}: {e.strerror or e}") from None
        return path

    def load(self, path: Path) -> None:
        """Replace the session by one written with /save; a bad file changes nothing."""
        data = _read_session_file(path)
        try:
            sampling = data["sampling"]
            if not isinstance(sampling, dict):
                raise ValueError("'sampling' must be an object")
            stop = sampling.get("stop", [])
            if not (isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
                raise ValueError("'stop' must be a list of strings")
            fields = {f.name for f in dataclasses.fields(SamplingParams)}
            new_sampling = SamplingParams(**{**{k: v for k, v in sampling.items() if k in fields}, "stop": tuple(stop)})
            raw_turns = data["turns"]
            if not isinstance(raw_turns, list):
                raise ValueError("'turns' must be a list")
            turns = []
            for t in raw_turns:
                if not (isinstance(t, dict) and all(isinstance(t.get(k, ""), str)
                                                    for k in ("input", "output", "finish_reason"))
                        and "input" in t):
                    raise ValueError("each turn must be an object of strings with an 'input'")
                turns.append(Turn(t["input"], t.get("output", ""), t.get("finish_reason", "")))
            template = data.get("template", "document")
            if template not in TEMPLATES:
                raise ValueError(f"unknown template {str(template)[:40]!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise ReplError(f"{path}: invalid session file ({str(e)[:200]})") from None
        self.sampling, self.turns, self.template = new_sampling, turns, template


MAX_SESSION_BYTES = 64 << 20  # far above any real transcript (the context is 8192 tokens)


def _read_session_file(path: Path) -> dict:
    """The JSON object of a session file: a regular file, bounded in size, nesting and type."""
    from .fsutil import FileTooLargeError, NotRegularFileError, read_regular_file

    try:
        raw = read_regular_file(path, MAX_SESSION_BYTES)
    except FileNotFoundError:
        raise ReplError(f"no such file: {path}") from None
    except NotRegularFileError:
        raise ReplError(f"{path} is not a regular file") from None
    except FileTooLargeError:
        raise ReplError(f"{path} is larger than {MAX_SESSION_BYTES >> 20} MiB: not a session saved with /save") from None
    except OSError as e:
        raise ReplError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ReplError(f"cannot read {path}: {str(e)[:200]}") from None
    except RecursionError:
        raise ReplError(f"{path} is nested too deeply: not a session saved with /save") from None
    if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
        raise ReplError(f"{path} is not a session saved with /save")
    return data


def help_text() -> str:
    lines = ["Type text and press Enter: the model continues it. Alt-Enter (or Esc Enter) inserts a newline;",
             '""" starts and ends a multi-line block. Ctrl-C stops generation; Ctrl-D leaves.', ""]
    lines += [f"  {cmd:<8} {desc}" for cmd, desc in COMMANDS.items()]
    lines += ["", "settable with /set: " + ", ".join(_SET_NAMES)]
    return "\n".join(lines)


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stderr_info(text: str) -> None:
    from .tui import stderr_console
    from rich.text import Text

    stderr_console().print(Text(text, style="dim"))


def history_file() -> Path:
    from .paths import state_dir

    return state_dir() / "repl_history"


def _completer():
    from prompt_toolkit.completion import Completer, Completion

    class SlashCompleter(Completer):
        """Completes slash commands, and /set parameter names."""

        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if not text.startswith("/"):
                return
            words = text.split()
            if len(words) <= 1 and not text.endswith(" "):
                for cmd in list(COMMANDS) + ["/quit"]:
                    if cmd.startswith(text):
                        yield Completion(cmd, start_position=-len(text), display_meta=COMMANDS.get(cmd, ""))
            elif words[0] == "/set" and (len(words) == 1 or (len(words) == 2 and not text.endswith(" "))):
                part = words[1] if len(words) == 2 else ""
                for name in _SET_NAMES:
                    if name.startswith(part):
                        yield Completion(name, start_position=-len(part))

    return SlashCompleter()


def _read_block(first: str, read_more: Callable[[], str]) -> str:
    """A \"\"\" block: everything up to the closing \"\"\" (which may end the first line)."""
    body = first[3:]
    if body.rstrip().endswith('"""') and len(body.rstrip()) >= 3:
        return body.rstrip()[:-3]
    lines = [body] if body else []
    while True:
        line = read_more()
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).rstrip("\n") if lines[-1] == "" else "\n".join(lines)
        lines.append(line)


def run_repl(session: ReplSession, *, use_terminal: Optional[bool] = None) -> None:
    """Read inputs until /exit or Ctrl-D; each one is a turn or a slash command."""
    if use_terminal is None:
        use_terminal = sys.stdin.isatty() and sys.stdout.isatty()
    if use_terminal:
        read, read_more = _terminal_reader()
    else:
        read, read_more = _plain_reader()
    if use_terminal and not session.quiet:
        session._info(f"grok repl ({session.template}): /help for commands, Ctrl-D to leave")
    while True:
        try:
            line = read()
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line
        except EOFError:
            break
        if line.startswith('"""'):
            try:
                line = _read_block(line, read_more)
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
        elif not line.strip():
            continue
        try:
            if line.startswith("/"):
                out = session.handle(line)
                if out:
                    session._info(out)
            else:
                session.send(line)
        except GrokError as e:  # a bad command, prompt or file: say so, the session goes on
            session._info(f"error: {e}")
        except SystemExit:
            break
        except KeyboardInterrupt:
            session._info("interrupted")


def _terminal_reader():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")  # Alt-Enter / Esc Enter: a newline inside the input
    def _newline(event):
        event.current_buffer.insert_text("\n")

    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(path))
    except OSError:
        history = InMemoryHistory()
    prompt_session = PromptSession(history=history, completer=_completer(), key_bindings=bindings,
                                   complete_while_typing=False, enable_history_search=False)

    def read() -> str:
        return prompt_session.prompt(">>> ", prompt_continuation="... ")

    def read_more() -> str:
        return prompt_session.prompt("... ")

    return read, read_more


def _plain_reader():
    buffer = getattr(sys.stdin, "buffer", None)

    def read() -> str:
        if buffer is None:
            line = sys.stdin.readline()
        else:
            raw = buffer.readline()
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                # One bad line must not end the session: its bytes are replaced, and it says so.
                _stderr_info(f"warning: input is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start} "
                             "of the line); undecodable bytes replaced by U+FFFD")
                line = raw.decode("utf-8", "replace")
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read, read
