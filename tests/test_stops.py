"""Stop-string matching on streamed text, against a plain str.find oracle."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grokcli.stops import StopMatcher

PROPERTY = settings(max_examples=200, deadline=None)


def first_stop(text: str, stops: list[str]) -> int | None:
    """Oracle: where the earliest-starting stop string begins in the whole text, or None."""
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def run(stops: list[str], deltas: list[str]) -> tuple[str, bool, list[tuple[str, bool]]]:
    """Feed all deltas (until stopped), then flush; return (emitted text, stopped, feed results)."""
    matcher = StopMatcher(stops)
    results = []
    for d in deltas:
        results.append(matcher.feed(d))
        if results[-1][1]:
            break
    emitted = "".join(e for e, _ in results) + matcher.flush()
    return emitted, matcher.stopped, results


@st.composite
def split(draw, text: str) -> list[str]:
    """`text` cut at random points (empty pieces included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


# A small alphabet so that stop strings, and overlapping near-misses, occur often.
SMALL_TEXT = st.text(st.sampled_from("abc é😀\n"), max_size=30)
STOPS = st.lists(st.text(st.sampled_from("abc é😀\n"), min_size=1, max_size=5), min_size=1, max_size=4)


@PROPERTY
@given(text=SMALL_TEXT, stops=STOPS, data=st.data())
def test_emitted_text_is_text_before_first_stop(text, stops, data):
    deltas = data.draw(split(text))
    emitted, stopped, _ = run(stops, deltas)
    at = first_stop(text, stops)
    assert emitted == (text if at is None else text[:at])
    assert stopped == (at is not None)


@PROPERTY
@given(text=SMALL_TEXT, stops=STOPS, data=st.data())
def test_holds_back_only_what_may_start_a_stop(text, stops, data):
    """After each feed, the held text is exactly the longest suffix that is a proper prefix of a
    stop string (so shorter than the longest stop), and a stop is reported as soon as no
    earlier-starting stop string can still complete."""
    matcher = StopMatcher(stops)
    seen = emitted = ""
    for delta in data.draw(split(text)):
        out, stopped = matcher.feed(delta)
        seen += delta
        emitted += out
        at = first_stop(seen, stops)
        # The earliest index from which `seen` may still grow into a stop string.
        undecided = min(i for i in range(len(seen) + 1)
                        if any(len(s) > len(seen) - i and s.startswith(seen[i:]) for s in stops))
        if stopped:
            assert at is not None and at <= undecided and emitted == seen[:at]
            break
        assert at is None or at > undecided
        assert emitted == seen[:undecided]
        assert matcher.held == seen[undecided:]
        assert len(matcher.held) <= max(map(len, stops)) - 1


@PROPERTY
@given(deltas=st.lists(st.text(max_size=10), max_size=10))
def test_no_stop_strings_is_a_pass_through(deltas):
    matcher = StopMatcher([])
    for d in deltas:
        assert matcher.feed(d) == (d, False)
        assert matcher.held == ""
    assert matcher.flush() == ""


def test_stop_string_spanning_deltas():
    matcher = StopMatcher(["</answer>"])
    assert matcher.feed("The answer is 42<") == ("The answer is 42", False)
    assert matcher.feed("/ans") == ("", False)
    assert matcher.held == "</ans"
    assert matcher.feed("wer> trailing") == ("", True)
    assert matcher.stopped and matcher.stop_string == "</answer>"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_near_miss_is_released():
    matcher = StopMatcher(["\n\nUser:"])
    assert matcher.feed("Hi\n\nUs") == ("Hi", False)
    assert matcher.feed("ually") == ("\n\nUsually", False)
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_earliest_starting_stop_wins_regardless_of_split():
    # "bc" completes first, but "abcd" starts earlier; the outcome waits for the next character.
    assert run(["abcd", "bc"], ["ab", "c", "d"])[:2] == ("", True)
    assert run(["abcd", "bc"], ["ab", "c", "x"])[:2] == ("a", True)
    assert run(["abcd", "bc"], ["abcd"])[:2] == ("", True)


def test_flush_cuts_at_a_completed_stop_that_was_still_undecided():
    matcher = StopMatcher(["abcd", "bc"])
    assert matcher.feed("xabc") == ("x", False)  # "bc" matched, but "abcd" might still start earlier
    assert matcher.flush() == "a"
    assert matcher.stopped and matcher.stop_string == "bc"


def test_invalid_stop_strings():
    with pytest.raises(ValueError, match="must not be empty"):
        StopMatcher([""])
    with pytest.raises(TypeError, match="must be str"):
        StopMatcher([b"x"])
    assert StopMatcher("ab").stop_strings == ("ab",)  # a lone string is one stop, not two
