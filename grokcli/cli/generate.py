"""`grok complete` and `grok repl`: parse, load, generate, render."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import EXIT_INTERRUPTED, app, usage_error
from .options import (MODEL_PANEL, OUTPUT_PANEL, CheckpointOptions, CommonOptions, DeviceOptions, JsonOpt,
                      QuietOpt, SamplingOptions, load_model, same_seed_on_every_process, with_option_groups)

PrefillChunkOpt = Annotated[Optional[int], typer.Option(
    "--prefill-chunk", min=1, show_default=False, rich_help_panel=MODEL_PANEL,
    help="Prompt tokens per prefill step (default 512): one compiled prefill serves every prompt length; "
         "smaller chunks use less memory.")]
PromptArg = Annotated[Optional[str], typer.Argument(
    show_default=False, help="The text to continue. '-' or no argument with piped stdin: read the prompt from stdin.")]


class Truncate(str, enum.Enum):
    none = "none"
    left = "left"


class Template(str, enum.Enum):
    document = "document"
    chat = "chat"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _decode(data: bytes, where: str) -> str:
    """UTF-8 text, or a usage error naming the first bad byte's offset (before any model loads)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise usage_error(f"{where} is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}") from None


def _check_text(text: str, where: str) -> str:
    """Command-line text arrives with undecodable bytes as surrogates: refuse it the same way."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _decode(text.encode("utf-8", "surrogateescape"), where)
    return text


def _read_stdin() -> str:
    buffer = getattr(sys.stdin, "buffer", None)
    return _decode(buffer.read(), "the prompt on stdin") if buffer is not None else sys.stdin.read()


def _read_file(file: Path, option: str) -> str:
    if str(file) == "-":
        return _read_stdin()
    try:
        return _decode(file.read_bytes(), f"prompt file {file}")
    except FileNotFoundError:
        raise usage_error(f"prompt file not found: {file} ({option})", option) from None
    except OSError as e:
        raise usage_error(f"cannot read prompt file {file}: {e.strerror or e} ({option})", option) from None


def _strip_newline(text: str) -> str:
    """`echo p | grok complete` equals `grok complete p`: one trailing newline dropped, as llama.cpp does."""
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _batch_prompts(text: str, file: Path) -> list[str]:
    """A batch file: JSON Lines (strings or {"prompt": ...}) when every line parses, else one prompt per line."""
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        values = [json.loads(line) for line in lines]
    except ValueError:
        return lines
    prompts = []
    for i, v in enumerate(values, 1):
        v = v.get("prompt") if isinstance(v, dict) else v
        if not isinstance(v, str):
            raise usage_error(f"{file} line {i}: expected a JSON string or an object with a \"prompt\" string "
                              "(--batch-file)", "--batch-file")
        prompts.append(v)
    return prompts


def read_prompts(prompt: Optional[str], extra: Optional[list[str]], file: Optional[Path],
                 batch_file: Optional[Path], raw: bool) -> list[str]:
    """The prompts of `complete` from the argument, -p, --file, --batch-file and stdin."""
    prompts: list[str] = []
    finish = (lambda t: t) if raw else _strip_newline
    if prompt == "-" or (prompt is None and not extra and file is None and batch_file is None
                         and not _isatty(sys.stdin)):
        prompts.append(finish(_read_stdin()))
    elif prompt is not None:
        prompts.append(_check_text(prompt, "the prompt"))
    prompts.extend(_check_text(p, "a --prompt value") for p in extra or ())
    if file is not None:
        prompts.append(finish(_read_file(file, "--file")))
    if batch_file is not None:
        lines = _batch_prompts(_read_file(batch_file, "--batch-file"), batch_file)
        if not lines:
            raise usage_error(f"batch file {batch_file} has no prompts (one per line, or JSON Lines)", "--batch-file")
        prompts.extend(lines)
    if not prompts:
        raise usage_error("no prompt: give it as an argument, with -p/--prompt, --file or --batch-file, "
                          "or pipe it on stdin")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise usage_error(f"{'the prompt' if len(prompts) == 1 else f'prompt {i + 1}'} is empty")
    return prompts


def completion_json(prompt: str, done, sampling, token_events, *, show_probs: bool, checkpoint: Path) -> dict:
    """The --json object of one completion (always valid JSON: non-finite numbers become null)."""
    st = done.stats
    out = {
        "model": str(checkpoint),
        "prompt": prompt,
        "text": done.text,
        "token_ids": list(done.token_ids),
        "finish_reason": done.finish_reason,
        "usage": {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens,
                  "total_tokens": st.prompt_tokens + st.generated_tokens},
        "timings": {"time_to_first_token_s": st.time_to_first_token_s,
                    "prefill_tokens_per_s": st.prefill_tokens_per_s,
                    "decode_tokens_per_s": st.decode_tokens_per_s, "total_s": st.total_s,
                    "peak_memory_bytes": st.peak_memory_bytes},
        "sampling": {**dataclasses.asdict(sampling), "stop": list(sampling.stop)},
    }
    if show_probs:
        out["logprobs"] = [
            {"token_id": ev.token_id, "text": ev.text, "logprob": _finite(ev.logprob),
             "top_logprobs": [{"token_id": t.token_id, "text": t.text, "logprob": _finite(t.logprob)}
                              for t in (ev.top_logprobs or ())]}
            for ev in token_events]
    return out


def _finite(x):
    return x if x is None or x == x and abs(x) != float("inf") else None


def _same_file(a, b) -> bool:
    """Whether two streams write to the same file (`2>&1`)."""
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@app.command(rich_help_panel="Generate")
@with_option_groups
def complete(
    prompt: PromptArg = None,
    prompts: Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", show_default=False, rich_help_panel=OUTPUT_PANEL,
        help="A prompt (repeatable); several prompts run as one batch and print in order.")] = None,
    file: Annotated[Optional[Path], typer.Option(
        "--file", "-f", show_default=False, rich_help_panel=OUTPUT_PANEL,
        help="Read the prompt from a file, all of it ('-' for stdin).")] = None,
    batch_file: Annotated[Optional[Path], typer.Option(
        "--batch-file", show_default=False, rich_help_panel=OUTPUT_PANEL,
        help="Several prompts run as one batch: one per line, or JSON Lines of strings / {\"prompt\": ...}.")] = None,
    raw_prompt: Annotated[bool, typer.Option(
        "--raw-prompt", rich_help_panel=OUTPUT_PANEL,
        help="Keep the trailing newline of a prompt read from stdin or --file (dropped by default).")] = False,
    ckpt: CheckpointOptions = None,
    sampling_opts: SamplingOptions = None,
    truncate: Annotated[Truncate, typer.Option(
        "--truncate", case_sensitive=False, rich_help_panel=MODEL_PANEL,
        help="A prompt longer than the context: 'none' fails and says the lengths, "
             "'left' drops its oldest tokens.")] = Truncate.none,
    no_stream: Annotated[bool, typer.Option(
        "--no-stream", rich_help_panel=OUTPUT_PANEL, help="Print the text once, at the end.")] = False,
    json_out: JsonOpt = False,
    show_probs: Annotated[bool, typer.Option(
        "--show-probs", rich_help_panel=OUTPUT_PANEL,
        help="Show each token's probability and its top alternatives (colour-coded in a terminal, "
             "a table on stderr; data in --json).")] = False,
    prefill_chunk: PrefillChunkOpt = None,
    prompt_cache: Annotated[Optional[Path], typer.Option(
        "--prompt-cache", show_default=False, rich_help_panel=MODEL_PANEL,
        help="Keep the prompt's KV cache in this file: the first run saves it, later runs whose prompt "
             "starts with the same text skip its prefill. A file from another model or prompt is refused.")] = None,
    quiet: QuietOpt = False,
    devices: DeviceOptions = None,
    common: CommonOptions = None,
) -> None:
    """Continue a prompt, streaming the model's text to stdout.

    Grok-1 is a base model: it continues text rather than answering questions. Progress, status and a one-line stats summary go to stderr (--quiet hides them).
    """
    texts = read_prompts(prompt, prompts, file, batch_file, raw_prompt)
    sampling = sampling_opts.params(logprobs=5 if show_probs else 0)
    # A prompt has at most as many tokens as UTF-8 bytes: bounds the KV cache for the memory check.
    if prompt_cache is not None and len(texts) > 1:
        raise usage_error("--prompt-cache keeps the cache of one prompt: give one prompt", "--prompt-cache")
    lm, tok, resolved = load_model(ckpt, devices, quiet=quiet, batch=len(texts), max_tokens=sampling.max_tokens,
                                   prompt_tokens=max(len(t.encode("utf-8")) for t in texts),
                                   prefill_chunk=prefill_chunk)
    sampling = same_seed_on_every_process(sampling)
    cache = _open_prompt_cache(prompt_cache, lm)
    _run_completions(lm, tok, texts, sampling, checkpoint=resolved.checkpoint, truncate=truncate == Truncate.left,
                     stream=not no_stream, json_out=json_out, show_probs=show_probs, quiet=quiet,
                     prefill_chunk=prefill_chunk, prompt_cache=cache)
    if cache is not None and not prompt_cache.exists():
        cache.save(prompt_cache, lm)
        if not quiet:
            from .. import tui

            tui.print_note(f"saved the prompt's KV cache to {prompt_cache} ({len(cache.tokens)} tokens)")


def _open_prompt_cache(path: Optional[Path], lm):
    """The PromptCache of --prompt-cache: the file's when it exists, else an empty one to save."""
    if path is None:
        return None
    from ..prompt_cache import PromptCache

    return PromptCache.load(path, lm) if path.exists() else PromptCache()


def _run_completions(lm, tok, texts: list[str], sampling, *, checkpoint: Path, truncate: bool, stream: bool,
                     json_out: bool, show_probs: bool, quiet: bool, prefill_chunk: Optional[int] = None,
                     prompt_cache=None) -> None:
    """Generate for each prompt (one batch when several), render in prompt order."""
    import grokcli

    from .. import tui

    sink = tui.TextSink(show_probs=show_probs)
    n = len(texts)
    how = dict(truncate="left" if truncate else None, continuation=True,  # printed text continues the prompt
               prefill_chunk=prefill_chunk, prompt_cache=prompt_cache)
    events = (grokcli.stream_generate(lm, tok, texts[0], sampling, **how) if n == 1
              else grokcli.stream_generate_batch(lm, tok, texts, sampling, **how))
    streaming = stream and not json_out
    token_events: list[list] = [[] for _ in range(n)]
    dones: list = [None] * n
    current = [0]  # the row whose text goes to stdout live; later rows wait their turn

    def end_row(row: int) -> None:
        if n > 1:
            sink.end_line()

    def on_token(ev) -> None:
        token_events[ev.row].append(ev)
        if streaming and ev.row == current[0]:
            sink.write(ev.text, ev.logprob)

    def on_done(ev) -> None:
        dones[ev.row] = ev
        # Rows finish in any order; print every finished row up to the first unfinished one.
        while streaming and current[0] < n and dones[current[0]] is not None:
            sink.write(dones[current[0]].final_delta)  # text the row released as it ended
            end_row(current[0])
            current[0] += 1
            if current[0] < n:
                for e in token_events[current[0]]:
                    sink.write(e.text, e.logprob)

    context = getattr(getattr(lm, "config", None), "sequence_len", None)
    if context and sampling.max_tokens >= context and not quiet:
        tui.print_note(f"note: --max-tokens {sampling.max_tokens} is more than the {context}-token context "
                       "holds; generation stops when the context is full", style="yellow")
    try:
        tui.render_events(events, quiet=quiet, on_token=on_token, on_done=on_done)
    except KeyboardInterrupt:
        if streaming and _isatty(sink.stream):
            sink.end_line()
        tui.print_note("interrupted")
        raise  # click turns it into Abort: exit code 130

    if json_out:
        for i in range(n):
            obj = completion_json(texts[i], dones[i], sampling, token_events[i], show_probs=show_probs,
                                  checkpoint=checkpoint)
            sys.stdout.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
        sys.stdout.flush()
    elif not stream:
        for i in range(n):
            sink.write(dones[i].text)
            end_row(i)
    if not json_out and (_isatty(sink.stream) or _same_file(sink.stream, sys.stderr)):
        sink.end_line()  # the shell prompt or the stats line starts on a line of its own
    if show_probs and not json_out:
        for i in range(n):
            tui.print_probs(token_events[i], title=f"token probabilities{f' (prompt {i + 1})' if n > 1 else ''}")
    if not quiet:
        for i in range(n):
            tui.print_stats(dones[i].stats, dones[i].finish_reason, prefix=f"[{i + 1}] " if n > 1 else "")
    if any(d.finish_reason == "interrupted" for d in dones):
        # Ctrl-C landed inside the engine, which finished the rows as "interrupted" after the
        # partial text was shown: still exit as an interrupted command does.
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command(rich_help_panel="Generate")
@with_option_groups
def repl(
    ckpt: CheckpointOptions = None,
    template: Annotated[Template, typer.Option(
        "--template", "-t", case_sensitive=False, rich_help_panel=OUTPUT_PANEL,
        help="document: every input is appended to one growing text that the model continues. "
             "chat: a 'Human: ... / Assistant: ...' conversation that stops at the next 'Human:' turn.")
    ] = Template.document,
    sampling_opts: SamplingOptions = None,
    quiet: QuietOpt = False,
    devices: DeviceOptions = None,
    common: CommonOptions = None,
) -> None:
    """An interactive session: the model is loaded once, then every input is continued.

    Up/Down and Ctrl-R search the history; Alt-Enter inserts a newline and \"\"\" opens a multi-line block; Tab completes /commands. Ctrl-C stops a generation, Ctrl-D or /exit leaves; /help lists the commands.
    """
    from .. import repl as repl_mod

    sampling = sampling_opts.params()
    if devices.multi_host:
        # The other processes have no keyboard: they could not follow the session.
        raise usage_error("grok repl runs on one host; across hosts use grok complete (see docs/multi-gpu.md)",
                          "--coordinator")
    lm, tok, _ = load_model(ckpt, devices, quiet=quiet)
    session = repl_mod.ReplSession(lm, tok, sampling, template=template.value, quiet=quiet)
    repl_mod.run_repl(session)
