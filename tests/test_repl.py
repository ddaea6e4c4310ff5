"""`grok repl`: the session logic with a fake engine, and the real thing in a pseudo-terminal."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from grokcli.events import DoneEvent, GenerationStats, StatusEvent, TokenEvent
from grokcli.repl import ReplError, ReplSession, help_text, run_repl
from grokcli.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GROK1_TOKENIZER = SHARED / "grok1" / "tokenizer.model"


class FakeStream:
    """Records each prompt; answers with queued texts, one token per character."""

    def __init__(self, answers=("ok",), interrupt_after=None):
        self.answers = list(answers)
        self.prompts = []
        self.samplings = []
        self.truncates = []
        self.interrupt_after = interrupt_after
        self.closed = 0

    def __call__(self, model, tokenizer, prompt, sampling, *, truncate=None, continuation=False):
        self.prompts.append(prompt)
        self.samplings.append(sampling)
        self.truncates.append(truncate)
        answer = self.answers.pop(0) if self.answers else "ok"
        return self._events(answer)

    def _events(self, answer):
        try:
            yield StatusEvent("prefill", "prefilling")
            for i, ch in enumerate(answer):
                if self.interrupt_after is not None and i == self.interrupt_after:
                    raise KeyboardInterrupt
                yield TokenEvent(0, i, ch)
            stats = GenerationStats(3, len(answer), 0.01, 100.0, 50.0, 0.1, None)
            yield DoneEvent(0, "length", answer, tuple(range(len(answer))), stats)
        finally:
            self.closed += 1


def make_session(stream, template="document", context_len=64, **sampling):
    out, info = [], []
    tokenizer = SimpleNamespace(encode=lambda text: text.split())  # one "token" per word
    session = ReplSession(SimpleNamespace(config=SimpleNamespace(sequence_len=context_len)), tokenizer,
                          SamplingParams(seed=10, **sampling), template=template, stream=stream,
                          write=out.append, info=info.append)
    return session, out, info


def test_document_mode_appends_inputs_and_answers():
    stream = FakeStream([" upon a time", " and then"])
    s, out, info = make_session(stream)
    s.send("Once")
    s.send("The end")
    assert stream.prompts == ["Once", "Once upon a time\nThe end"]
    assert s.transcript() == "Once upon a time\nThe end and then"
    assert "".join(out) == " upon a time\n and then\n"
    assert sum("finish: length" in line for line in info) == 2  # a stats line per turn


def test_chat_template_and_its_stop_string():
    stream = FakeStream([" Hello there.", " Fine."])
    s, out, info = make_session(stream, template="chat", stop=("###",))
    s.send("Hi")
    s.send("How are you?")
    assert stream.prompts[1] == "Human: Hi\n\nAssistant: Hello there.\n\nHuman: How are you?\n\nAssistant:"
    assert set(stream.samplings[0].stop) == {"###", "\nHuman:", "Human:"}


def test_set_and_show():
    s, _, _ = make_session(FakeStream())
    assert s.handle("/set temp 0") == "temperature = 0.0"
    assert s.handle("/set top-k 5") == "top_k = 5"
    assert s.handle("/set stop \\n\\n") == "stop = ['\\n\\n']"
    assert s.handle("/set stop none") == "stop = []"
    assert s.handle("/set ignore-eos on") == "ignore_eos = True"
    assert s.handle("/set n 7") == "max_tokens = 7"
    assert s.sampling.temperature == 0 and s.sampling.top_k == 5 and s.sampling.max_tokens == 7
    shown = s.handle("/show")
    assert "temperature     0.0" in shown and "context         0 / 64 tokens" in shown
    for bad, needle in [("/set top-p 2", "top_p"), ("/set temp hot", "number"), ("/set nope 1", "unknown setting"),
                        ("/set", "usage"), ("/set ignore-eos maybe", "on/off"), ("/frobnicate", "unknown command")]:
        with pytest.raises(ReplError, match=needle):
            s.handle(bad)
    assert s.sampling.top_p == 1.0  # a rejected value leaves the setting alone


def test_undo_clear_and_regen_uses_a_new_seed():
    stream = FakeStream(["A", "B", "C"])
    s, out, _ = make_session(stream)
    s.send("one")
    s.send("two")
    s.handle("/regen")
    assert [t.output for t in s.turns] == ["A", "C"]
    assert stream.prompts[2] == stream.prompts[1]
    assert stream.samplings[2].seed != stream.samplings[1].seed  # otherwise /regen repeats itself
    s.handle("/undo")
    assert [t.input for t in s.turns] == ["one"]
    s.handle("/clear")
    assert s.turns == []
    with pytest.raises(ReplError):
        s.handle("/undo")
    with pytest.raises(ReplError):
        s.handle("/regen")


def test_ctrl_c_keeps_the_partial_answer_and_the_session_goes_on():
    stream = FakeStream(["abcdef", "xyz"], interrupt_after=3)
    s, out, info = make_session(stream)
    s.send("go")
    assert s.turns[0].output == "abc" and s.turns[0].finish_reason == "interrupted"
    assert stream.closed == 1
    assert any("interrupted" in line for line in info)
    stream.interrupt_after = None
    s.send("more")
    assert stream.prompts[1] == "goabc\nmore"


def test_context_warning_and_overflow():
    stream = FakeStream(["x", "y"])
    s, _, info = make_session(stream, context_len=10, max_tokens=5)
    s.send("a b c d e f")  # 6 words + 5 new tokens > 10
    assert any("context nearly full" in line for line in info)
    assert stream.truncates[-1] is None
    s.send("g h i j k l")  # now the prompt itself does not fit
    assert stream.truncates[-1] == "left"
    assert any("exceeds the context" in line for line in info)


def test_save_and_load_round_trip(tmp_path):
    s, _, _ = make_session(FakeStream([" world"]), template="chat")
    s.send("hello")
    s.handle("/set temp 0.3")
    msg = s.handle(f"/save {tmp_path / 'session.json'}")
    assert "saved 1 turns" in msg
    data = json.loads((tmp_path / "session.json").read_text())
    assert data["turns"] == [{"input": "hello", "output": " world", "finish_reason": "length"}]
    assert data["sampling"]["temperature"] == 0.3 and data["template"] == "chat"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind

    t, _, _ = make_session(FakeStream())
    t.handle(f"/load {tmp_path / 'session.json'}")
    assert t.turns == s.turns and t.sampling == s.sampling and t.template == "chat"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ReplError, match="not a session"):
        t.handle(f"/load {tmp_path / 'bad.json'}")
    with pytest.raises(ReplError, match="no such file"):
        t.handle(f"/load {tmp_path / 'missing.json'}")


def test_bad_session_files_leave_the_session_as_it_was(tmp_path):
    """Hostile /load files: each is one ReplError, quickly, and the session keeps its state."""
    s, _, _ = make_session(FakeStream([" world"]))
    s.send("hello")
    before = (list(s.turns), s.sampling, s.template)
    good = {"format": "grokcli-repl-session", "version": 1, "template": "document",
            "sampling": {"temperature": 0.5}, "turns": []}
    cases = {
        "deep.json": b"[" * 200_000 + b"]" * 200_000,
        "stop_str.json": json.dumps({**good, "sampling": {"stop": "abc"}}).encode(),
        "turn_types.json": json.dumps({**good, "turns": [{"input": 5}]}).encode(),
        "huge.json": b" " * (65 << 20),
        "binary.json": b"\xff\xfe\x00",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.json")
        cases["fifo.json"] = b""
    for name in cases:
        t0 = time.monotonic()
        with pytest.raises(ReplError):
            s.handle(f"/load {tmp_path / name}")
        assert time.monotonic() - t0 < 5, name
        assert (list(s.turns), s.sampling, s.template) == before, name
    if os.path.exists("/dev/zero"):
        with pytest.raises(ReplError, match="not a regular file"):
            s.handle("/load /dev/zero")


def test_plain_stdin_loop(monkeypatch):
    """Without a terminal the REPL reads lines: triple-quoted blocks, commands, /exit."""
    import io

    stream = FakeStream(["!", "?"])
    s, out, info = make_session(stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO('hello\n"""\nline one\nline two\n"""\n/set temp 0\n/exit\nnot read\n'))
    run_repl(s, use_terminal=False)
    assert stream.prompts == ["hello", "hello!\nline one\nline two"]
    assert "temperature = 0.0" in info


def test_invalid_utf8_input_does_not_end_the_session(monkeypatch, capsys):
    import io

    stream = FakeStream(["!", "?"])
    s, _, _ = make_session(stream)
    piped = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nsecond\n/exit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", piped)
    run_repl(s, use_terminal=False)
    assert stream.prompts == ["caf\ufffd", "caf\ufffd!\nsecond"]
    assert "not valid UTF-8" in capsys.readouterr().err


def test_help_lists_every_command():
    text = help_text()
    for cmd in ("/help", "/set", "/show", "/clear", "/regen", "/undo", "/save", "/load", "/exit"):
        assert cmd in text


# --------------------------------------------------------------------------------------------
# The real REPL in a pseudo-terminal, on a real tiny checkpoint with the real Grok-1 tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture
def real_checkpoint(tiny_config, tiny_checkpoint):
    if not GROK1_TOKENIZER.is_file():
        pytest.skip(f"Grok-1 tokenizer not found at {GROK1_TOKENIZER}")
    cfg = tiny_config(vocab_size=131072, emb_size=16, key_size=8, num_q_heads=2, num_kv_heads=1,
                      num_layers=1, sequence_len=2048)
    return tiny_checkpoint(cfg, seed=3, tokenizer_path=GROK1_TOKENIZER)


@pytest.mark.slow
def test_repl_in_a_pseudo_terminal(real_checkpoint, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "XDG_STATE_HOME": str(tmp_path / "state"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "NO_COLOR": "1", "COLUMNS": "120", "LINES": "40"}
    env.pop("GROK_CHECKPOINT", None)
    child = pexpect.spawn(sys.executable, ["-m", "grokcli.cli", "repl", "-c", str(real_checkpoint), "--temp", "0.7",
                                           "--seed", "1", "-n", "1500", "--ignore-eos"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 120))
    try:
        child.expect_exact(">>>")
        # A long generation, interrupted with Ctrl-C once tokens flow.
        child.sendline("Once upon a time")
        child.expect("prefilling")
        time.sleep(1.0)
        child.sendintr()
        child.expect("interrupted")
        child.expect_exact(">>>")
        # The session survived: settings, a short regeneration, save, exit.
        child.sendline("/set temp 0")
        child.expect_exact("temperature = 0.0")
        child.expect_exact(">>>")
        child.sendline("/set max-tokens 8")
        child.expect_exact("max_tokens = 8")
        child.expect_exact(">>>")
        child.sendline("/regen")
        child.expect(r"generated 8 tok.*finish: length")
        child.expect_exact(">>>")
        saved = tmp_path / "s.json"
        child.sendline(f"/save {saved}")
        child.expect_exact("saved 1 turns")
        child.expect_exact(">>>")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    data = json.loads(saved.read_text())
    assert data["turns"][0]["input"] == "Once upon a time"
    assert data["turns"][0]["output"]  # the regenerated answer
    assert data["sampling"]["temperature"] == 0
    assert (tmp_path / "state" / "grokcli" / "repl_history").is_file()
