"""The `grok` command: options, output streams, exit codes and error lines.

Two kinds of tests: a fake engine that yields queued tokens (fast, checks rendering exactly), and
real tiny checkpoints written with the project's writer plus the `tiny-a` fixture with the real
tokenizer (checks the whole path). stdout and stderr are always inspected separately.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import grokcli
from grokcli import cli
from grokcli.errors import CheckpointError, PromptTooLongError
from grokcli.events import DoneEvent, GenerationStats, StatusEvent, TokenEvent, TopLogprob

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_A = SHARED / "fixtures" / "tiny-a"
ANSI = "\x1b["


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No user configuration leaks in; Rich's width is pinned; XDG dirs are private."""
    for var in list(os.environ):
        if var.startswith("GROK_") or var in ("NO_COLOR", "FORCE_COLOR", "TERM"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GROK_CONSOLE_WIDTH", "200")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def run(*args, input=None, env=None):
    return CliRunner().invoke(cli.app, list(args), input=input, env=env, catch_exceptions=False)


def one_line_error(result, *needles):
    """The failure was reported as exactly one line on stderr mentioning each needle, nothing on stdout."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress lines may come before it
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return errors[0]


# --------------------------------------------------------------------------------------------
# A fake engine: a model object and a stream function that yields queued tokens.
# --------------------------------------------------------------------------------------------


def _stats(prompt_tokens=3, generated=0):
    return GenerationStats(prompt_tokens=prompt_tokens, generated_tokens=generated, time_to_first_token_s=0.05,
                           prefill_tokens_per_s=60.0, decode_tokens_per_s=20.0, total_s=0.2,
                           peak_memory_bytes=12_000_000)


class FakeEngine:
    """Stands in for grokcli.load / stream_generate_batch; records what the CLI asked for."""

    def __init__(self, rows, *, finish="length", order=None, interrupt_after=None, error=None, final_delta=""):
        self.rows = rows  # list of token-text lists, one per prompt
        self.final_delta = final_delta  # text each row releases only in its DoneEvent
        self.finish = finish
        self.order = order  # row indices in the order their DoneEvents arrive
        self.interrupt_after = interrupt_after  # raise KeyboardInterrupt after this many tokens
        self.error = error  # raised when generation is asked for
        self.calls = []
        self.closed = False
        self.model = SimpleNamespace(config=SimpleNamespace(sequence_len=64))
        self.tokenizer = SimpleNamespace(encode=lambda text: list(text.encode()))

    def load(self, path, tokenizer=None, *, progress=None, mesh=None, reserve_for=None, device_memory=None):
        self.calls.append(("load", Path(path), tokenizer))
        self.reserved = reserve_for
        if progress:
            progress(0, 100, 0, 2)
            progress(100, 100, 2, 2)
        return self.model, self.tokenizer

    def stream_batch(self, model, tokenizer, prompts, sampling=None, *, truncate=None, **kw):
        self.calls.append(("generate", list(prompts), sampling, truncate))
        if self.error:
            raise self.error
        return self._events(prompts, sampling)

    def stream(self, model, tokenizer, prompt, sampling=None, *, truncate=None, **kw):
        return self.stream_batch(model, tokenizer, [prompt], sampling, truncate=truncate, **kw)

    def _events(self, prompts, sampling):
        try:
            yield StatusEvent("compiling", "compiling (first run, cached for next time)")
            yield StatusEvent("compiled", "compiled", cache_hit=False, seconds=0.5)
            n = 0
            width = max(len(r) for r in self.rows[:len(prompts)])
            for step in range(width):
                for row, toks in enumerate(self.rows[:len(prompts)]):
                    if step < len(toks):
                        if self.interrupt_after is not None and n == self.interrupt_after:
                            raise KeyboardInterrupt
                        lp = -0.1 * (step + 1)
                        top = (TopLogprob(7, "x", lp), TopLogprob(8, "y", lp - 1)) if sampling.logprobs else None
                        yield TokenEvent(row, 100 + step, toks[step], lp if sampling.logprobs else None, top)
                        n += 1
            for row in self.order or range(len(prompts)):
                toks = self.rows[row]
                yield DoneEvent(row, self.finish, "".join(toks) + self.final_delta,
                                tuple(range(100, 100 + len(toks))), _stats(generated=len(toks)), self.final_delta)
        finally:
            self.closed = True


@pytest.fixture
def fake_ckpt(tmp_path):
    """A directory shaped like a checkpoint (the fake engine never reads it)."""
    d = tmp_path / "ckpt"
    (d / "ckpt-0").mkdir(parents=True)
    (d / "tokenizer.model").write_bytes(b"not read by the fake engine")
    return d


def use_fake(monkeypatch, engine):
    monkeypatch.setattr(grokcli, "load", engine.load, raising=False)
    monkeypatch.setattr(grokcli, "stream_generate", engine.stream, raising=False)
    monkeypatch.setattr(grokcli, "stream_generate_batch", engine.stream_batch, raising=False)
    monkeypatch.setattr(cli.options, "setup_runtime", lambda devices: None)
    return engine


# --------------------------------------------------------------------------------------------
# Fast start, help, version
# --------------------------------------------------------------------------------------------


def test_importing_the_cli_does_not_import_jax():
    code = "import sys, grokcli.cli; print(sorted(m for m in ('jax', 'jaxlib', 'grokcli.model', 'grokcli.generation', 'grokcli.quant') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version():
    r = run("--version")
    assert r.exit_code == 0
    assert r.stdout.strip() == f"grok {grokcli.__version__}"


def test_help_lists_commands_and_no_args_shows_help():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("complete", "repl", "info"):
        assert cmd in r.stdout
    r = run()
    assert r.exit_code == 2
    assert "complete" in r.stdout + r.stderr  # typer renders the help itself


def test_complete_help_names_user_facing_options():
    r = run("complete", "--help")
    assert r.exit_code == 0
    for opt in ("--temp", "--temperature", "--top-k", "--top-p", "--min-p", "--repeat-penalty", "--seed",
                "--max-tokens", "-n", "--stop", "--ignore-eos", "--checkpoint", "--tokenizer", "--model",
                "--mesh", "--no-compile-cache", "--json", "--show-probs", "--no-stream", "--file", "--quiet",
                "GROK_TEMP", "GROK_CHECKPOINT"):
        assert opt in r.stdout, opt


# --------------------------------------------------------------------------------------------
# Usage errors (exit 2), reported before any model is loaded
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (["--temp", "-1"], ["--temp", "temperature"]),
    (["--top-p", "1.5"], ["--top-p", "top_p"]),
    (["--top-k", "-3"], ["--top-k"]),
    (["--min-p", "2"], ["--min-p"]),
    (["--repeat-penalty", "0"], ["--repeat-penalty"]),
    (["-n", "0"], ["--max-tokens"]),
    (["--top-k", "many"], ["--top-k", "integer"]),
    (["--bogus"], ["--bogus"]),
    (["--truncate", "middle"], ["--truncate"]),
])
def test_bad_sampling_option_is_a_usage_error_naming_it(args, needles, fake_ckpt):
    r = run("complete", "-c", str(fake_ckpt), *args, "hello")
    assert r.exit_code == 2
    one_line_error(r, *needles)


def test_sampling_env_vars_are_read(fake_ckpt):
    r = run("complete", "-c", str(fake_ckpt), "hello", env={"GROK_TOP_P": "7"})
    assert r.exit_code == 2
    one_line_error(r, "--top-p")


def test_missing_checkpoint_dir(tmp_path):
    r = run("complete", "-c", str(tmp_path / "nope"), "hello")
    assert r.exit_code == 2
    one_line_error(r, "checkpoint directory not found", "nope")


def test_not_a_checkpoint_dir(tmp_path):
    r = run("complete", "-c", str(tmp_path), "hello")
    assert r.exit_code == 2
    one_line_error(r, "not a Grok-1 checkpoint directory", "ckpt-0")


def test_checkpoint_from_env(tmp_path):
    r = run("complete", "hello", env={"GROK_CHECKPOINT": str(tmp_path / "env-ckpt")})
    assert r.exit_code == 2
    one_line_error(r, "env-ckpt")


def test_no_checkpoint_configured_says_how_to_get_one():
    r = run("complete", "hello")
    assert r.exit_code == 2
    line = one_line_error(r, "grok download", "--model demo")
    assert "Once upon a time" in line


def test_unknown_model_name_and_conflicting_model_options(fake_ckpt):
    r = run("complete", "--model", "gpt-5", "hello")
    assert r.exit_code == 2
    one_line_error(r, "gpt-5", "demo")
    r = run("complete", "--model", "demo", "-c", str(fake_ckpt), "hello")
    assert r.exit_code == 2
    one_line_error(r, "either --model or --checkpoint")


def test_demo_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    from grokcli import paths

    monkeypatch.setattr(paths, "demo_model_dir", lambda: tmp_path / "demo")
    r = run("complete", "--model", "demo", "hello")
    assert r.exit_code == 1
    one_line_error(r, "demo model is not installed")


def test_missing_tokenizer_file(fake_ckpt, tmp_path):
    r = run("complete", "-c", str(fake_ckpt), "--tokenizer", str(tmp_path / "tok.model"), "hello")
    assert r.exit_code == 2
    one_line_error(r, "tokenizer file not found", "tok.model")


def test_no_prompt_and_empty_prompt(fake_ckpt):
    r = run("complete", "-c", str(fake_ckpt), input="")
    assert r.exit_code == 2
    one_line_error(r, "empty")
    r = run("complete", "-c", str(fake_ckpt), "   ")
    assert r.exit_code == 2
    one_line_error(r, "empty")


def test_prompt_file_missing(fake_ckpt, tmp_path):
    r = run("complete", "-c", str(fake_ckpt), "--file", str(tmp_path / "prompts.txt"))
    assert r.exit_code == 2
    one_line_error(r, "prompt file not found")


@pytest.mark.parametrize("args, needle", [
    (["--mesh", "8"], "--mesh"),
    (["--mesh", "0x8"], "--mesh"),
    (["--device-memory", "lots"], "--device-memory"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"], "--process-id"),
])
def test_bad_device_options(args, needle, fake_ckpt):
    r = run("complete", "-c", str(fake_ckpt), *args, "hello")
    assert r.exit_code == 2
    one_line_error(r, needle)


# --------------------------------------------------------------------------------------------
# Rendering, with the fake engine
# --------------------------------------------------------------------------------------------


def test_stream_text_to_stdout_and_stats_to_stderr(monkeypatch, fake_ckpt):
    eng = use_fake(monkeypatch, FakeEngine([["Hel", "lo", ",", " world"]]))
    r = run("complete", "-c", str(fake_ckpt), "--temp", "0", "-n", "4", "Say")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Hello, world"  # only model text; no newline added when stdout is not a terminal
    assert ANSI not in r.stdout
    assert "prompt 3 tok" in r.stderr and "generated 4 tok" in r.stderr and "finish: length" in r.stderr
    assert "first token" in r.stderr and "peak mem 12.0 MB" in r.stderr
    assert "compil" in r.stderr  # the compile status was shown
    _, prompts, sampling, truncate = eng.calls[1]
    assert prompts == ["Say"] and sampling.temperature == 0 and sampling.max_tokens == 4 and truncate is None


def test_tokens_are_flushed_one_by_one(monkeypatch, fake_ckpt):
    """Each token has reached stdout's bytes (flushed) before the engine produces the next one."""
    seen = []

    class Probe(FakeEngine):
        def _events(self, prompts, sampling):
            for ev in super()._events(prompts, sampling):
                if isinstance(ev, TokenEvent):
                    seen.append(sys.stdout.buffer.getvalue().decode())
                yield ev

    use_fake(monkeypatch, Probe([["a", "b", "c"]]))
    r = run("complete", "-c", str(fake_ckpt), "x")
    assert r.exit_code == 0
    assert r.stdout == "abc"
    assert seen == ["", "a", "ab"]


def test_quiet_hides_stats(monkeypatch, fake_ckpt):
    use_fake(monkeypatch, FakeEngine([["a", "b"]]))
    r = run("complete", "-q", "-c", str(fake_ckpt), "x")
    assert r.exit_code == 0
    assert r.stdout == "ab"
    assert r.stderr == ""


def test_prompt_from_stdin_and_dash(monkeypatch, fake_ckpt):
    eng = use_fake(monkeypatch, FakeEngine([["!"]]))
    r = run("complete", "-c", str(fake_ckpt), input="piped prompt\n")
    assert r.exit_code == 0 and r.stdout == "!"
    r = run("complete", "-c", str(fake_ckpt), "-", input="dash prompt")
    assert r.exit_code == 0
    r = run("complete", "-c", str(fake_ckpt), "--raw-prompt", input="raw prompt\n")
    assert r.exit_code == 0
    # `echo p | grok complete` is `grok complete p`: one trailing newline dropped unless --raw-prompt
    assert [c[1] for c in eng.calls if c[0] == "generate"] == [["piped prompt"], ["dash prompt"], ["raw prompt\n"]]


def test_json_output(monkeypatch, fake_ckpt):
    use_fake(monkeypatch, FakeEngine([["A", "B"]], finish="eos"))
    r = run("complete", "-c", str(fake_ckpt), "--json", "--seed", "5", "--stop", "###", "hi")
    assert r.exit_code == 0
    obj = json.loads(r.stdout)
    assert obj["prompt"] == "hi" and obj["text"] == "AB" and obj["token_ids"] == [100, 101]
    assert obj["finish_reason"] == "eos"
    assert obj["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert obj["timings"]["time_to_first_token_s"] == 0.05
    assert obj["sampling"]["seed"] == 5 and obj["sampling"]["stop"] == ["###"]
    assert "logprobs" not in obj


def test_json_with_probs(monkeypatch, fake_ckpt):
    use_fake(monkeypatch, FakeEngine([["A", "B"]]))
    r = run("complete", "-c", str(fake_ckpt), "--json", "--show-probs", "hi")
    assert r.exit_code == 0
    obj = json.loads(r.stdout)
    assert [e["text"] for e in obj["logprobs"]] == ["A", "B"]
    assert obj["logprobs"][0]["logprob"] == pytest.approx(-0.1)
    assert obj["logprobs"][0]["top_logprobs"][0] == {"token_id": 7, "text": "x", "logprob": pytest.approx(-0.1)}
    assert obj["sampling"]["logprobs"] == 5


def test_show_probs_plain_and_coloured(monkeypatch, fake_ckpt):
    use_fake(monkeypatch, FakeEngine([["A", "B"]]))
    r = run("complete", "-c", str(fake_ckpt), "--show-probs", "hi")
    assert r.exit_code == 0
    assert r.stdout == "AB"  # not a terminal: plain text
    assert "token probabilities" in r.stderr and "0.905" in r.stderr  # exp(-0.1)
    r = run("--color", "always", "complete", "-c", str(fake_ckpt), "--show-probs", "hi")
    assert r.exit_code == 0
    assert ANSI in r.stdout and "A" in r.stdout
    r = run("complete", "--color", "always", "-c", str(fake_ckpt), "--show-probs", "hi", env={"NO_COLOR": "1"})
    assert ANSI in r.stdout  # an explicit --color always wins over NO_COLOR
    r = run("complete", "-c", str(fake_ckpt), "--show-probs", "hi", env={"NO_COLOR": "1"})
    assert ANSI not in r.stdout and ANSI not in r.stderr


def test_no_stream(monkeypatch, fake_ckpt):
    use_fake(monkeypatch, FakeEngine([["x", "y"]]))
    r = run("complete", "-c", str(fake_ckpt), "--no-stream", "hi")
    assert r.exit_code == 0 and r.stdout == "xy"


def test_batch_prints_in_prompt_order(monkeypatch, fake_ckpt, tmp_path):
    # Row 1 finishes first; its text must still come after row 0's.
    eng = use_fake(monkeypatch, FakeEngine([["a1", "a2", "a3"], ["b1"], ["c1", "c2"]], order=[1, 2, 0]))
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("second\n\nthird\n")
    r = run("complete", "-c", str(fake_ckpt), "-p", "first", "--batch-file", str(pfile))
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "a1a2a3\nb1\nc1c2\n"
    assert eng.calls[1][1] == ["first", "second", "third"]
    assert "[1] prompt" in r.stderr and "[3] prompt" in r.stderr
    r = run("complete", "-c", str(fake_ckpt), "-p", "first", "--batch-file", str(pfile), "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["text"] for o in rows] == ["a1a2a3", "b1", "c1c2"]


def test_ctrl_c_keeps_partial_text_and_exits_130(monkeypatch, fake_ckpt):
    eng = use_fake(monkeypatch, FakeEngine([["a", "b", "c", "d"]], interrupt_after=2))
    r = run("complete", "-c", str(fake_ckpt), "x")
    assert r.exit_code == 130
    assert r.stdout == "ab"
    assert eng.closed
    assert "interrupted" in r.stderr and "Traceback" not in r.stderr


def test_prompt_too_long_is_a_usage_error(monkeypatch, fake_ckpt):
    use_fake(monkeypatch, FakeEngine([["a"]], error=PromptTooLongError(
        "prompt is 300 tokens but the context holds 256; shorten it or pass --truncate left")))
    r = run("complete", "-c", str(fake_ckpt), "x" * 300)
    assert r.exit_code == 2
    one_line_error(r, "300 tokens", "256", "--truncate")


def test_truncate_left_is_passed_to_the_library(monkeypatch, fake_ckpt):
    eng = use_fake(monkeypatch, FakeEngine([["a"]]))
    r = run("complete", "-c", str(fake_ckpt), "--truncate", "left", "x")
    assert r.exit_code == 0
    assert eng.calls[1][3] == "left"


def test_runtime_failure_is_one_line_exit_1_and_debug_shows_traceback(monkeypatch, fake_ckpt):
    eng = use_fake(monkeypatch, FakeEngine([["a"]]))

    def broken(path, tokenizer=None, **_):
        raise CheckpointError(f"{path}/ckpt-0/tensor00003_000: truncated (12 of 4096 bytes)")

    monkeypatch.setattr(grokcli, "load", broken)
    r = run("complete", "-c", str(fake_ckpt), "x")
    assert r.exit_code == 1
    one_line_error(r, "tensor00003_000", "truncated")
    r = run("complete", "--debug", "-c", str(fake_ckpt), "x")
    assert r.exit_code == 1
    assert "Traceback" in r.stderr and "truncated" in r.stderr.splitlines()[-1]
    del eng


def test_unexpected_exception_is_one_line(monkeypatch, fake_ckpt):
    use_fake(monkeypatch, FakeEngine([["a"]], error=RuntimeError("XLA went sideways\nmore detail")))
    r = run("complete", "-c", str(fake_ckpt), "x")
    assert r.exit_code == 1
    one_line_error(r, "RuntimeError", "XLA went sideways", "--debug")


def test_out_of_memory_message(monkeypatch, fake_ckpt):
    use_fake(monkeypatch, FakeEngine([["a"]], error=RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")))
    r = run("complete", "-c", str(fake_ckpt), "x")
    assert r.exit_code == 1
    one_line_error(r, "out of accelerator memory", "grok info --memory")


def test_missing_tokenizer_in_checkpoint_is_reported_before_loading(monkeypatch, fake_ckpt):
    eng = use_fake(monkeypatch, FakeEngine([["a"]]))
    (fake_ckpt / "tokenizer.model").unlink()
    r = run("complete", "-c", str(fake_ckpt), "x")
    assert r.exit_code == 2
    one_line_error(r, "no tokenizer", "--tokenizer")
    assert eng.calls == []  # nothing was loaded


def test_options_are_passed_to_load(monkeypatch, fake_ckpt, tmp_path):
    eng = use_fake(monkeypatch, FakeEngine([["a"]]))
    tok = tmp_path / "my.model"
    tok.write_bytes(b"x")
    r = run("complete", "-c", str(fake_ckpt), "--tokenizer", str(tok), "x")
    assert r.exit_code == 0, r.stderr
    assert eng.calls[0] == ("load", fake_ckpt, tok)


# --------------------------------------------------------------------------------------------
# The whole path: real tiny checkpoints written with the project's writer, and tiny-a
# --------------------------------------------------------------------------------------------

GROK1_TOKENIZER = SHARED / "grok1" / "tokenizer.model"


@pytest.fixture
def real_ckpt(tiny_config, tiny_checkpoint):
    """A random checkpoint whose vocabulary matches the real Grok-1 tokenizer (copied next to ckpt-0/)."""
    if not GROK1_TOKENIZER.is_file():
        pytest.skip(f"Grok-1 tokenizer not found at {GROK1_TOKENIZER}")
    cfg = tiny_config(vocab_size=131072, emb_size=16, key_size=8, num_q_heads=2, num_kv_heads=1, num_layers=1,
                      sequence_len=64)
    return tiny_checkpoint(cfg, seed=1, tokenizer_path=GROK1_TOKENIZER)


def _greedy_fixture():
    if not (TINY_A / "greedy.json").is_file():
        pytest.skip(f"tiny-a fixture not found at {TINY_A}")
    return json.loads((TINY_A / "greedy.json").read_text())


@pytest.mark.slow
def test_tiny_a_greedy_text_matches_the_reference():
    greedy = _greedy_fixture()
    n = len(greedy["generated_ids"])
    r = run("complete", "-c", str(TINY_A), "--temp", "0", "--ignore-eos", "-n", str(n), greedy["prompt_text"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == greedy["text"]
    assert f"generated {n} tok" in r.stderr and "finish: length" in r.stderr
    r = run("complete", "-c", str(TINY_A), "--temp", "0", "--ignore-eos", "-n", str(n), "--json", "--show-probs",
            greedy["prompt_text"])
    obj = json.loads(r.stdout)
    assert obj["token_ids"] == greedy["generated_ids"] and obj["text"] == greedy["text"]
    assert obj["usage"]["prompt_tokens"] == len(greedy["prompt_ids"])
    assert len(obj["logprobs"]) == n and all(e["logprob"] <= 0 for e in obj["logprobs"])
    # Greedy: the chosen token is the most likely alternative.
    assert all(e["top_logprobs"][0]["token_id"] == tid for e, tid in zip(obj["logprobs"], obj["token_ids"]))


@pytest.mark.slow
def test_real_checkpoint_batch_equals_single_runs_and_info(real_ckpt):
    single = []
    for p in ("Hello there", "A much longer prompt about the weather"):
        r = run("complete", "-q", "-c", str(real_ckpt), "--temp", "0", "--ignore-eos", "-n", "5", p)
        assert r.exit_code == 0, r.stderr
        assert r.stderr == ""
        single.append(r.stdout)
    r = run("complete", "-c", str(real_ckpt), "--temp", "0", "--ignore-eos", "-n", "5",
            "-p", "Hello there", "-p", "A much longer prompt about the weather")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == single[0] + "\n" + single[1] + "\n"

    r = run("info", "-c", str(real_ckpt), "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["config"]["emb_size"] == 16 and info["files_found"] == info["files_expected"]
    assert info["tokenizer"].endswith("tokenizer.model") and info["backend"] == "cpu"
    from grokcli import native

    assert info["cpu_matmul"] == native.status() and info["cpu_matmul"].startswith("native int8 matmul: ")
    assert info["bytes_on_disk"] == sum(f.stat().st_size for f in (real_ckpt / "ckpt-0").iterdir())
    r = run("info", "-c", str(real_ckpt), "--memory")
    assert r.exit_code == 0 and "KV cache" in r.stdout and "parameters" in r.stdout


@pytest.mark.slow
def test_real_prompt_too_long_and_truncate_left(real_ckpt):
    long_prompt = " ".join(["word"] * 200)  # far beyond the 64-token context
    r = run("complete", "-c", str(real_ckpt), "-n", "4", long_prompt)
    assert r.exit_code == 2
    one_line_error(r, "64")
    r = run("complete", "-c", str(real_ckpt), "-n", "4", "--temp", "0", "--ignore-eos", "--truncate", "left",
            long_prompt)
    assert r.exit_code == 0, r.stderr
    assert "truncated" in r.stderr


@pytest.mark.slow
def test_real_broken_checkpoints_are_one_line_runtime_errors(real_ckpt, tmp_path):
    import shutil

    # A truncated tensor file (an interrupted download).
    broken = tmp_path / "broken"
    shutil.copytree(real_ckpt, broken)
    victim = sorted((broken / "ckpt-0").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:40])
    r = run("complete", "-c", str(broken), "hi")
    assert r.exit_code == 1
    one_line_error(r, victim.name)

    # A config.json that does not describe the tensors.
    mismatch = tmp_path / "mismatch"
    shutil.copytree(real_ckpt, mismatch)
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["emb_size"] = 32
    (mismatch / "config.json").write_text(json.dumps(cfg))
    r = run("complete", "-c", str(mismatch), "hi")
    assert r.exit_code == 1
    one_line_error(r)

    # A config.json that is not JSON.
    (mismatch / "config.json").write_text("{not json")
    r = run("complete", "-c", str(mismatch), "hi")
    assert r.exit_code == 1
    one_line_error(r, "config.json")

    # A tokenizer whose vocabulary does not fit the model (tiny config: 256 ids; Grok-1's has 131072).
    small = tmp_path / "small"
    shutil.copytree(real_ckpt, small)
    cfg = dict(json.loads((real_ckpt / "config.json").read_text()), vocab_size=256)
    (small / "config.json").write_text(json.dumps(cfg))
    r = run("complete", "-c", str(small), "hi")
    assert r.exit_code == 1
    one_line_error(r, "tokenizer")


@pytest.mark.slow
def test_pipe_streams_text_only(real_ckpt):
    """The installed entry point in a subprocess: stdout is a pipe, so plain text and nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROK_")}
    proc = subprocess.run([sys.executable, "-m", "grokcli.cli", "complete", "-c", str(real_ckpt), "--temp", "0",
                           "--ignore-eos", "-n", "6", "Hello"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert ANSI not in proc.stdout and proc.stdout.strip()
    assert "finish: length" in proc.stderr and "loaded" in proc.stderr


def test_text_released_at_the_end_of_a_row_is_printed(monkeypatch, fake_ckpt):
    """A DoneEvent's final_delta (held back for a stop string, freed by EOS) reaches stdout."""
    use_fake(monkeypatch, FakeEngine([["Hello", " wor"], ["x"]], finish="eos", final_delta="ld"))
    r = run("complete", "-c", str(fake_ckpt), "hi", "--quiet")
    assert r.exit_code == 0 and r.stdout == "Hello world"
    r = run("complete", "-c", str(fake_ckpt), "-p", "a", "-p", "b", "--quiet")
    assert r.stdout.splitlines() == ["Hello world", "xld"]


def test_interruption_inside_the_engine_still_exits_130(monkeypatch, fake_ckpt):
    """Ctrl-C caught by the engine ends rows as "interrupted": the text is kept, the exit code is 130."""
    use_fake(monkeypatch, FakeEngine([["a", "b"]], finish="interrupted"))
    r = run("complete", "-c", str(fake_ckpt), "hi")
    assert r.exit_code == 130
    assert r.stdout == "ab" and "interrupted" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------
# What a new user types (issue: rough edges)
# --------------------------------------------------------------------------------------------


def _generated(eng):
    return [c for c in eng.calls if c[0] == "generate"]


def test_model_accepts_a_directory_like_llama_cpp(monkeypatch, fake_ckpt):
    eng = use_fake(monkeypatch, FakeEngine([["ok"]]))
    r = run("complete", "-m", str(fake_ckpt), "hi")
    assert r.exit_code == 0, r.stderr
    assert eng.calls[0][:2] == ("load", fake_ckpt)
    r = run("complete", "-m", "no-such-model", "hi")
    assert r.exit_code == 2
    one_line_error(r, "unknown --model", "demo, grok-1")


def test_invalid_utf8_prompt_is_a_usage_error_before_loading(monkeypatch, fake_ckpt, tmp_path):
    eng = use_fake(monkeypatch, FakeEngine([["x"]]))
    r = CliRunner().invoke(cli.app, ["complete", "-c", str(fake_ckpt)], input=b"caf\xe9 au lait", catch_exceptions=False)
    assert r.exit_code == 2
    one_line_error(r, "not valid UTF-8", "offset 3")
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"ok\n\xff")
    r = run("complete", "-c", str(fake_ckpt), "-f", str(bad))
    assert r.exit_code == 2
    one_line_error(r, "not valid UTF-8", "offset 3")
    assert eng.calls == []  # nothing was loaded


def test_file_is_one_whole_prompt_and_batch_file_takes_json_lines(monkeypatch, fake_ckpt, tmp_path):
    eng = use_fake(monkeypatch, FakeEngine([["a"], ["b"]]))
    doc = tmp_path / "doc.txt"
    doc.write_text("line one\n\nline two\n")
    assert run("complete", "-c", str(fake_ckpt), "-f", str(doc)).exit_code == 0
    jsonl = tmp_path / "batch.jsonl"
    jsonl.write_text('"first\\nwith a newline"\n{"prompt": "second"}\n')
    assert run("complete", "-c", str(fake_ckpt), "--batch-file", str(jsonl), "--json").exit_code == 0
    prompts = [c[1] for c in _generated(eng)]
    assert prompts == [["line one\n\nline two"], ["first\nwith a newline", "second"]]


def test_stop_escapes_are_expanded_everywhere(monkeypatch, fake_ckpt):
    eng = use_fake(monkeypatch, FakeEngine([["a"]]))
    assert run("complete", "-c", str(fake_ckpt), "--stop", "\\n\\n", "--stop", "a\\\\b", "x").exit_code == 0
    assert run("complete", "-c", str(fake_ckpt), "x", env={"GROK_STOP": "END|\\n|x\\|y"}).exit_code == 0
    stops = [c[2].stop for c in _generated(eng)]
    assert stops == [("\n\n", "a\\b"), ("END", "\n", "x|y")]
    from grokcli.repl import _parse_value

    assert _parse_value("stop", "\\n\\n") == ("\n\n",)


def test_absurd_numbers_are_usage_errors_not_internal_errors(monkeypatch, fake_ckpt):
    use_fake(monkeypatch, FakeEngine([["a"]]))
    r = run("complete", "-c", str(fake_ckpt), "--top-k", str(10**20), "x")
    assert r.exit_code == 2 and "internal error" not in r.stderr
    r = run("complete", "-c", str(fake_ckpt), "--device-memory", "1e400", "x")
    assert r.exit_code == 2
    one_line_error(r, "--device-memory")


def test_process_id_alone_is_a_usage_error(monkeypatch, fake_ckpt):
    from grokcli.distributed import DistributedError, resolve_options

    with pytest.raises(DistributedError, match="--process-id 1 needs --coordinator"):
        resolve_options(process_id=1, environ={})


def test_markup_and_escape_sequences_in_user_values_are_shown_literally(tmp_path):
    weird = tmp_path / "x[/]y[bold]\x1b[2J"
    r = run("complete", "-c", str(weird), "hi")
    assert r.exit_code == 2
    one_line_error(r, "x[/]y[bold]")
    assert "\x1b" not in r.stderr and "Traceback" not in r.stderr


def test_verify_checkpoint_takes_c_and_refuses_a_non_checkpoint_in_one_line(tmp_path):
    (tmp_path / "junk").mkdir()
    for i in range(50):
        (tmp_path / "junk" / f"f{i}").write_text("x")
    r = run("verify-checkpoint", str(tmp_path / "junk"))
    assert r.exit_code == 2
    one_line_error(r, "no ckpt-0/")
    r = run("verify-checkpoint", "-c", str(tmp_path / "junk"))
    assert r.exit_code == 2
    one_line_error(r, "no ckpt-0/")


def test_help_shows_flags_as_flags():
    r = run("complete", "--help")
    assert r.exit_code == 0 and "--quiet" in r.stdout and "<bool>" not in r.stdout


def test_offline_download_names_the_host_and_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://nonexistent.invalid")
    r = run("download", "--dry-run", "--local-dir", str(tmp_path / "g"))
    assert r.exit_code == 1
    one_line_error(r, "cannot reach nonexistent.invalid", "HF_ENDPOINT", "--local-dir")
