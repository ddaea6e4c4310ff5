"""Stop strings matched on streamed text, across delta boundaries."""

from __future__ import annotations

from typing import Iterable


class StopMatcher:
    """Cuts a text stream before the first occurrence of any stop string.

    The result does not depend on how the text is split into deltas: the emitted text is always
    `text[:min(text.find(s) for s in stops if found)]`, i.e. before the earliest-starting stop
    string. Text is held back only while it could still be the start of a stop string, so the
    held-back text is always shorter than the longest stop string.
    """

    def __init__(self, stop_strings: Iterable[str] = ()):
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        stops = []
        for s in stop_strings:
            if not isinstance(s, str):
                raise TypeError(f"stop strings must be str, got {type(s).__name__}")
            if not s:
                raise ValueError("stop strings must not be empty")
            if s not in stops:
                stops.append(s)
        self.stop_strings: tuple[str, ...] = tuple(stops)
        # Every proper prefix of a stop string: held-back text is always one of these.
        self._prefixes = frozenset(s[:n] for s in stops for n in range(1, len(s)))
        self._max_prefix = max((len(s) - 1 for s in stops), default=0)
        self._held = ""  # text received but not yet emitted
        self.stopped = False  # a stop string was found (in feed or flush)
        self.stop_string: str | None = None  # the stop string that ended the text, once stopped

    @property
    def held(self) -> str:
        """Text received but not yet emitted, because it may begin a stop string."""
        return self._held

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add streamed text; return (text now safe to show, whether a stop string ended the stream).

        On a stop, the text before the stop string is returned and the stop string is dropped;
        later calls return ("", True)."""
        if self.stopped:
            return "", True
        if not self.stop_strings:
            return delta, False
        text = self._held + delta
        # Earliest position from which the text may still turn into a stop string.
        keep = self._held_suffix_len(text)
        undecided_from = len(text) - keep
        match_at, stop = self._first_match(text)
        # A match decides the output only if no stop string can still start before it.
        if stop is not None and match_at <= undecided_from:
            return self._stop(text, match_at, stop), True
        self._held = text[undecided_from:]
        return text[:undecided_from], False

    def flush(self) -> str:
        """The held-back text at the end of generation (cut before a stop string if one completed)."""
        if self.stopped:
            return ""
        text, self._held = self._held, ""
        match_at, stop = self._first_match(text)
        if stop is not None:
            return self._stop(text, match_at, stop)
        return text

    def _stop(self, text: str, match_at: int, stop: str) -> str:
        self.stopped, self.stop_string, self._held = True, stop, ""
        return text[:match_at]

    def _first_match(self, text: str) -> tuple[int, str | None]:
        best, best_stop = len(text), None
        for s in self.stop_strings:
            # Only a match starting before `best` can win, so bound the search there.
            at = text.find(s, 0, best + len(s) - 1)
            if at != -1 and (best_stop is None or at < best):
                best, best_stop = at, s
        return best, best_stop

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(self._max_prefix, len(text)), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "|": "|"}


def expand_escapes(text: str) -> str:
    r"""A stop string as typed on a command line: `\n`, `\t`, `\r` and `\\` expanded (llama.cpp's
    `--escape`); any other backslash is kept as typed."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def split_stop_list(text: str) -> list[str]:
    r"""Several stop strings in one value (the GROK_STOP environment variable): separated by `|`,
    `\|` for a literal bar; each piece's escapes expanded."""
    pieces, current, i = [], [], 0
    while i < len(text):
        if text.startswith("\\|", i):
            current.append("\\|")
            i += 2
        elif text[i] == "|":
            pieces.append("".join(current))
            current = []
            i += 1
        else:
            current.append(text[i])
            i += 1
    pieces.append("".join(current))
    return [expand_escapes(p) for p in pieces if p]
