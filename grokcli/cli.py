"""The `grok` command: parses options, calls the library, renders what it yields.

Nothing here imports jax (or the modules that do) at import time, so `grok --help` and
`grok --version` stay fast; each command imports the library when it runs.

Layout of this file:
  1. error handling (one line on stderr, exit 2 for usage errors, 1 for runtime failures)
  2. shared options, declared once as `Annotated` aliases
  3. helpers every model-loading command uses (resolve the checkpoint, load with progress)
  4. commands: complete, repl, info
  5. commands: download, verify-checkpoint (added separately, see the marked section)
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from . import __version__
from .errors import CheckpointError, GrokError, PromptError
from .sampling import SamplingParams

# ---------------------------------------------------------------------------------------------
# 1. Error handling
# ---------------------------------------------------------------------------------------------

EXIT_RUNTIME = 1  # something failed while doing the work (bad file, out of memory, ...)
EXIT_USAGE = 2  # the command line asks for something impossible; fixing the command fixes it
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class UsageError(GrokError):
    """A problem the user fixes by changing the command line (exit code 2)."""


# Library errors caused by what the user typed, rather than by what is on disk.
_USAGE_ERRORS: tuple[type[BaseException], ...] = (UsageError, PromptError)


@dataclasses.dataclass
class _State:
    """Process-wide switches set by eager options before any command body runs."""

    debug: bool = False  # show tracebacks instead of one-line errors
    color: str = "auto"  # auto | always | never


_state = _State()


def _set_debug(value: bool) -> bool:
    if value:
        _state.debug = True
    return value


def _error_line(message: str) -> None:
    """Print `grok: error: message` on stderr: one line, no colour codes unless stderr is a TTY."""
    message = " ".join(str(message).split("\n")[0:1]).strip() or "unknown error"
    from .tui import stderr_console

    stderr_console().print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)


def exit_code_for(exc: BaseException) -> int:
    """The exit code the CLI uses for an exception (2 usage, 1 runtime, 130 interrupted)."""
    from typer._click import exceptions as click_exc

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, click_exc.ClickException):
        return exc.exit_code
    if isinstance(exc, _USAGE_ERRORS):
        return EXIT_USAGE
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

        # Fresh switches for every invocation (tests run many in one process).
        _state.debug, _state.color = bool(os.environ.get("GROK_DEBUG")), "auto"
        if "grokcli.tui" in sys.modules:
            sys.modules["grokcli.tui"].set_color_mode("auto")
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
            _error_line(describe_error(exc))
            code = exit_code_for(exc)
        except KeyboardInterrupt:
            if _state.debug:
                traceback.print_exc(file=sys.stderr)
            _error_line("interrupted")
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


def usage_error(message: str) -> UsageError:
    """An error the user fixes by changing the command line (exit 2)."""
    return UsageError(message)


# ---------------------------------------------------------------------------------------------
# 2. Shared options (declared once; every command reuses them)
# ---------------------------------------------------------------------------------------------


class ColorMode(str, enum.Enum):
    auto = "auto"
    always = "always"
    never = "never"


def _set_color(value: Optional[ColorMode]) -> Optional[ColorMode]:
    if value is not None:
        _state.color = value.value
        from . import tui

        tui.set_color_mode(value.value)
    return value


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"grok {__version__}")
        raise typer.Exit()


_MODEL_PANEL = "Model"
_SAMPLING_PANEL = "Sampling"
_DEVICE_PANEL = "Devices and memory"
_OUTPUT_PANEL = "Output"

# Output / behaviour
DebugOpt = Annotated[bool, typer.Option(
    "--debug", envvar="GROK_DEBUG", is_eager=True, callback=_set_debug,
    help="Show the full traceback when something fails.")]
ColorOpt = Annotated[Optional[ColorMode], typer.Option(
    "--color", is_eager=True, callback=_set_color, case_sensitive=False,
    help="Colour in the terminal: auto (when writing to a terminal and NO_COLOR is unset), always, never.",
    show_default=False)]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", envvar="GROK_QUIET", help="No progress or stats on stderr; errors are still shown.",
    rich_help_panel=_OUTPUT_PANEL)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.",
                                       rich_help_panel=_OUTPUT_PANEL)]

# Model selection
CheckpointOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint", "-c", envvar="GROK_CHECKPOINT", show_default=False, rich_help_panel=_MODEL_PANEL,
    help="Checkpoint directory (holds ckpt-0/, optional config.json and tokenizer.model). "
         "Default: where `grok download` puts Grok-1.")]
TokenizerOpt = Annotated[Optional[Path], typer.Option(
    "--tokenizer", envvar="GROK_TOKENIZER", show_default=False, rich_help_panel=_MODEL_PANEL,
    help="SentencePiece tokenizer.model. Default: tokenizer.model in the checkpoint directory.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="GROK_MODEL", show_default=False, rich_help_panel=_MODEL_PANEL,
    help="A named model instead of --checkpoint: 'demo' (the small model bundled with grokcli) "
         "or 'grok-1' (the downloaded Grok-1).")]
NoCompileCacheOpt = Annotated[bool, typer.Option(
    "--no-compile-cache", envvar="GROK_NO_COMPILE_CACHE", rich_help_panel=_MODEL_PANEL,
    help="Do not use the persistent compilation cache (it lives in the user cache directory).")]

# Devices, mesh, multi-host and memory
MeshOpt = Annotated[Optional[str], typer.Option(
    "--mesh", envvar="GROK_MESH", show_default=False, rich_help_panel=_DEVICE_PANEL,
    help="Device mesh DATAxMODEL, e.g. 1x8. Default: model-parallel over all local devices.")]
CoordinatorOpt = Annotated[Optional[str], typer.Option(
    "--coordinator", show_default=False, rich_help_panel=_DEVICE_PANEL,
    help="Multi-host: HOST:PORT of process 0 (JAX's distributed runtime; JAX_COORDINATOR_ADDRESS also works).")]
NumProcessesOpt = Annotated[Optional[int], typer.Option(
    "--num-processes", min=1, show_default=False, rich_help_panel=_DEVICE_PANEL,
    help="Multi-host: total number of processes.")]
ProcessIdOpt = Annotated[Optional[int], typer.Option(
    "--process-id", min=0, show_default=False, rich_help_panel=_DEVICE_PANEL,
    help="Multi-host: this process's index, 0 .. num-processes-1.")]
DeviceMemoryOpt = Annotated[Optional[str], typer.Option(
    "--device-memory", envvar="GROK_DEVICE_MEMORY", show_default=False, rich_help_panel=_DEVICE_PANEL,
    help="Memory per device for the fit check, e.g. 80GB (default: as detected).")]

# Sampling (names users know from llama.cpp, mlx-lm and llm); defaults are the library's.
_SP = SamplingParams()
TempOpt = Annotated[float, typer.Option(
    "--temp", "--temperature", envvar="GROK_TEMP", rich_help_panel=_SAMPLING_PANEL,
    help="Sampling temperature; 0 picks the most likely token (greedy).")]
TopKOpt = Annotated[int, typer.Option(
    "--top-k", envvar="GROK_TOP_K", rich_help_panel=_SAMPLING_PANEL,
    help="Sample among the k most likely tokens; 0 disables.")]
TopPOpt = Annotated[float, typer.Option(
    "--top-p", envvar="GROK_TOP_P", rich_help_panel=_SAMPLING_PANEL,
    help="Nucleus sampling: the smallest set of tokens whose probability reaches p; 1 disables.")]
MinPOpt = Annotated[float, typer.Option(
    "--min-p", envvar="GROK_MIN_P", rich_help_panel=_SAMPLING_PANEL,
    help="Drop tokens less likely than min-p times the most likely one; 0 disables.")]
RepeatPenaltyOpt = Annotated[float, typer.Option(
    "--repeat-penalty", envvar="GROK_REPEAT_PENALTY", rich_help_panel=_SAMPLING_PANEL,
    help="Penalise tokens already in the prompt or output (>1 discourages repeats); 1 disables.")]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", envvar="GROK_SEED", show_default=False, rich_help_panel=_SAMPLING_PANEL,
    help="Random seed; the same seed and options give the same text. Default: a fresh random seed.")]
MaxTokensOpt = Annotated[int, typer.Option(
    "--max-tokens", "-n", envvar="GROK_MAX_TOKENS", rich_help_panel=_SAMPLING_PANEL,
    help="Generate at most this many tokens.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", envvar="GROK_STOP", show_default=False, rich_help_panel=_SAMPLING_PANEL,
    help="Stop before this text (repeatable); the stop text is not printed.")]
IgnoreEosOpt = Annotated[bool, typer.Option(
    "--ignore-eos", envvar="GROK_IGNORE_EOS", rich_help_panel=_SAMPLING_PANEL,
    help="Keep generating past the end-of-text token.")]

# Which SamplingParams field each option sets, for error messages that name the option.
SAMPLING_FLAGS = {
    "temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
    "repetition_penalty": "--repeat-penalty", "seed": "--seed", "max_tokens": "--max-tokens",
    "stop": "--stop", "ignore_eos": "--ignore-eos", "logprobs": "--show-probs",
}


def make_sampling(*, temp: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                  seed: Optional[int], max_tokens: int, stop: Optional[list[str]], ignore_eos: bool,
                  logprobs: int = 0) -> SamplingParams:
    """SamplingParams from the command line; an invalid value is a usage error naming its option."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    try:
        return SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens,
                              stop=tuple(stop or ()), ignore_eos=ignore_eos, logprobs=logprobs)
    except ValueError as e:
        raise usage_error(_name_option(str(e))) from None


def _name_option(message: str) -> str:
    """Prefix a SamplingParams message with the option that set the bad value."""
    for field, flag in sorted(SAMPLING_FLAGS.items(), key=lambda kv: -len(kv[0])):
        if message.startswith(field) or message.startswith(field.replace("_", " ")):
            return f"invalid value for {flag}: {message}"
    return f"invalid sampling option: {message}"


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Everything a model-loading command was told about which model to load and where to run it."""

    checkpoint: Optional[Path] = None
    tokenizer: Optional[Path] = None
    model: Optional[str] = None
    mesh: Optional[str] = None
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    device_memory: Optional[str] = None
    compile_cache: bool = True


# ---------------------------------------------------------------------------------------------
# 3. Helpers shared by the model-loading commands
# ---------------------------------------------------------------------------------------------

MODEL_NAMES = ("demo", "grok-1")


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Where the model and tokenizer will be read from, and how we got there."""

    checkpoint: Path
    tokenizer: Optional[Path]  # an explicit --tokenizer, else None (the library looks in the dir)
    source: str  # "--checkpoint", "GROK_CHECKPOINT", "--model demo", "default"


def resolve_model(opts: ModelOptions) -> ResolvedModel:
    """Decide which checkpoint directory to use; usage errors for paths that cannot be right."""
    from . import paths

    if opts.model is not None and opts.model not in MODEL_NAMES:
        raise usage_error(f"unknown --model {opts.model!r}: choose one of {', '.join(MODEL_NAMES)}, "
                          "or give a directory with --checkpoint")
    if opts.model is not None and opts.checkpoint is not None:
        raise usage_error("give either --model or --checkpoint (GROK_CHECKPOINT), not both")
    if opts.tokenizer is not None and not opts.tokenizer.is_file():
        raise usage_error(f"tokenizer file not found: {opts.tokenizer} (--tokenizer)")

    if opts.model == "demo":
        path = paths.demo_model_dir()
        if not (path / "ckpt-0").is_dir():
            raise CheckpointError(f"the demo model is not installed in this copy of grokcli (expected {path}/ckpt-0); "
                                  "reinstall grokcli or use --checkpoint")
        return ResolvedModel(path, opts.tokenizer, "--model demo")

    if opts.checkpoint is not None:
        path = opts.checkpoint.expanduser()
        source = "--checkpoint"
    else:
        path = paths.default_checkpoint_dir()
        source = "default"
        if not path.exists():
            raise usage_error(
                f"no checkpoint at {path}: get Grok-1 with `grok download` (or pass --checkpoint DIR), "
                "or try the demo model: grok complete --model demo \"Once upon a time\"")
    if not path.exists():
        raise usage_error(f"checkpoint directory not found: {path} (--checkpoint / GROK_CHECKPOINT)")
    if not path.is_dir():
        raise usage_error(f"not a directory: {path} (--checkpoint expects the directory that holds ckpt-0/)")
    if not (path / "ckpt-0").is_dir():
        hint = " (did you mean its parent?)" if path.name == "ckpt-0" else ""
        raise usage_error(f"{path} is not a Grok-1 checkpoint directory: no ckpt-0/ inside{hint}")
    return ResolvedModel(path, opts.tokenizer, source)


def setup_runtime(opts: ModelOptions, *, quiet: bool = False) -> None:
    """Prepare JAX before the model loads: option checks, compile cache, distributed runtime."""
    if opts.mesh is not None:
        parse_mesh(opts.mesh)
    if opts.device_memory is not None:
        parse_bytes(opts.device_memory, "--device-memory")
    if (opts.num_processes is None) != (opts.process_id is None) and opts.coordinator:
        raise usage_error("multi-host needs --coordinator, --num-processes and --process-id together")
    if opts.process_id is not None and opts.num_processes is not None and opts.process_id >= opts.num_processes:
        raise usage_error(f"--process-id {opts.process_id} must be below --num-processes {opts.num_processes}")
    from . import runtime
    from .distributed import DistributedError

    try:
        runtime.configure(compile_cache=opts.compile_cache, coordinator=opts.coordinator,
                          num_processes=opts.num_processes, process_id=opts.process_id)
    except DistributedError as e:
        raise usage_error(str(e)) from None


def parse_mesh(text: str) -> tuple[int, int]:
    """'DATAxMODEL' -> (data, model); a usage error for anything else."""
    from .sharding import MeshError, parse_mesh_shape  # no jax import: cheap at parse time

    try:
        return parse_mesh_shape(text)
    except MeshError as e:
        raise usage_error(str(e).replace("invalid mesh", "invalid --mesh", 1)) from None


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, option: str) -> int:
    """'80GB', '80 GiB', '8e10' -> bytes; a usage error naming the option otherwise."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise usage_error(f"invalid {option} {text!r}: expected a size such as 80GB or 24GiB") from None
    if value <= 0:
        raise usage_error(f"invalid {option} {text!r}: must be positive")
    return int(value)


def prepare_devices(opts: ModelOptions, checkpoint: Path, *, batch: int = 1, prompt_tokens: int = 0,
                    max_tokens: Optional[int] = None):
    """The mesh to load on (None: a single device), after checking the memory plan fits.

    Runs before any tensor file is read: a mesh the devices cannot form is a usage error, and a
    plan that does not fit raises MemoryPlanError with the numbers. `prompt_tokens` and
    `max_tokens` bound the KV cache generation will allocate (default: the whole context).
    """
    import jax

    from . import memory, sharding
    from .config import load_config

    devices = jax.devices()
    try:
        mesh = sharding.make_mesh(opts.mesh, devices) if opts.mesh or len(devices) > 1 else None
    except sharding.MeshError as e:
        raise usage_error(f"--mesh: {e}") from None
    cfg = load_config(checkpoint)
    context, prefill = cfg.sequence_len, None
    if max_tokens is not None:
        from .generation import MIN_CONTEXT, length_bucket

        prefill = length_bucket(max(1, prompt_tokens), cfg.sequence_len)
        context = length_bucket(max(prefill + max_tokens, MIN_CONTEXT), cfg.sequence_len)
    device_bytes = (parse_bytes(opts.device_memory, "--device-memory") if opts.device_memory
                    else memory.detected_device_memory())
    shape = sharding.mesh_shape_dict(mesh)
    plan = memory.plan_memory(cfg, (shape["data"], shape["model"]), batch=batch, context=context,
                              prefill_tokens=prefill, dtype="float32" if jax.default_backend() == "cpu" else "bfloat16",
                              device_memory=device_bytes)
    memory.check_fits(plan)
    return mesh


def same_seed_on_every_process(sampling: SamplingParams) -> SamplingParams:
    """Multi-host: every process samples with process 0's seed (each drew its own at random)."""
    from . import distributed

    if distributed.process_count() <= 1:
        return sampling
    return dataclasses.replace(sampling, seed=distributed.broadcast_int(sampling.seed))


def load_model(opts: ModelOptions, *, quiet: bool = False, need_tokenizer: bool = True, batch: int = 1,
               prompt_tokens: int = 0, max_tokens: Optional[int] = None):
    """Resolve, prepare the runtime and load the model with a progress display on stderr.

    Returns (model, tokenizer, resolved).
    """
    resolved = resolve_model(opts)
    if need_tokenizer and resolved.tokenizer is None and not (resolved.checkpoint / "tokenizer.model").is_file():
        # Say so before reading hundreds of gigabytes.
        raise usage_error(f"no tokenizer: {resolved.checkpoint} has no tokenizer.model; pass --tokenizer PATH")
    setup_runtime(opts, quiet=quiet)
    mesh = prepare_devices(opts, resolved.checkpoint, batch=batch, prompt_tokens=prompt_tokens,
                           max_tokens=max_tokens)
    import grokcli

    from . import tui

    with tui.LoadProgress(resolved.checkpoint, quiet=quiet) as progress:
        sharded = {"mesh": mesh} if mesh is not None else {}
        model, tokenizer = grokcli.load(resolved.checkpoint, resolved.tokenizer, progress=progress.update, **sharded)
    return model, tokenizer, resolved


def model_options(checkpoint, tokenizer, model, mesh, coordinator, num_processes, process_id,
                  device_memory, no_compile_cache) -> ModelOptions:
    return ModelOptions(checkpoint=checkpoint, tokenizer=tokenizer, model=model, mesh=mesh,
                        coordinator=coordinator, num_processes=num_processes, process_id=process_id,
                        device_memory=device_memory, compile_cache=not no_compile_cache)


# ---------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# 4. complete, repl, info
# ---------------------------------------------------------------------------------------------
# (command bodies follow)

PromptArg = Annotated[Optional[str], typer.Argument(
    show_default=False, help="The text to continue. '-' or no argument with piped stdin: read the prompt from stdin.")]


def _read_prompts(prompt: Optional[str], extra: Optional[list[str]], file: Optional[Path]) -> list[str]:
    """Collect the prompts of `complete` from the argument, -p, --file and stdin."""
    prompts: list[str] = []
    stdin_piped = not _isatty(sys.stdin)
    if prompt == "-" or (prompt is None and not extra and file is None and stdin_piped):
        prompts.append(sys.stdin.read())
    elif prompt is not None:
        prompts.append(prompt)
    prompts.extend(extra or ())
    if file is not None:
        try:
            text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise usage_error(f"prompt file not found: {file} (--file)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise usage_error(f"cannot read prompt file {file}: {e} (--file)") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise usage_error(f"prompt file {file} has no prompts (one per line) (--file)")
        prompts.extend(lines)
    if not prompts:
        raise usage_error("no prompt: give it as an argument, with -p/--prompt or --file, or pipe it on stdin")
    for i, p in enumerate(prompts):
        if not p.strip():
            which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            raise usage_error(f"{which} is empty")
    return prompts


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def completion_json(prompt: str, done, sampling: SamplingParams, token_events, *, show_probs: bool,
                    checkpoint: Path) -> dict:
    """The --json object of one completion."""
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
            {"token_id": ev.token_id, "text": ev.text, "logprob": ev.logprob,
             "top_logprobs": [{"token_id": t.token_id, "text": t.text, "logprob": t.logprob}
                              for t in (ev.top_logprobs or ())]}
            for ev in token_events]
    return out


class Truncate(str, enum.Enum):
    none = "none"
    left = "left"


@app.command(rich_help_panel="Generate")
def complete(
    prompt: PromptArg = None,
    prompts: Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", show_default=False, rich_help_panel=_OUTPUT_PANEL,
        help="A prompt (repeatable); several prompts run as one batch and print in order.")] = None,
    file: Annotated[Optional[Path], typer.Option(
        "--file", "-f", show_default=False, rich_help_panel=_OUTPUT_PANEL,
        help="Read prompts from a file, one per line ('-' for stdin); they run as one batch.")] = None,
    checkpoint: CheckpointOpt = None,
    tokenizer: TokenizerOpt = None,
    model: ModelOpt = None,
    temp: TempOpt = _SP.temperature,
    top_k: TopKOpt = _SP.top_k,
    top_p: TopPOpt = _SP.top_p,
    min_p: MinPOpt = _SP.min_p,
    repeat_penalty: RepeatPenaltyOpt = _SP.repetition_penalty,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = _SP.max_tokens,
    stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    truncate: Annotated[Truncate, typer.Option(
        "--truncate", case_sensitive=False, rich_help_panel=_MODEL_PANEL,
        help="A prompt longer than the context: 'none' fails and says the lengths, "
             "'left' drops its oldest tokens.")] = Truncate.none,
    no_stream: Annotated[bool, typer.Option(
        "--no-stream", rich_help_panel=_OUTPUT_PANEL, help="Print the text once, at the end.")] = False,
    json_out: JsonOpt = False,
    show_probs: Annotated[bool, typer.Option(
        "--show-probs", rich_help_panel=_OUTPUT_PANEL,
        help="Show each token's probability and its top alternatives (colour-coded in a terminal, "
             "a table on stderr; data in --json).")] = False,
    quiet: QuietOpt = False,
    mesh: MeshOpt = None,
    coordinator: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
    device_memory: DeviceMemoryOpt = None,
    no_compile_cache: NoCompileCacheOpt = False,
    debug: DebugOpt = False,
    color: ColorOpt = None,
) -> None:
    """Continue a prompt, streaming the model's text to stdout.

    Grok-1 is a base model: it continues text rather than answering questions. Progress, status and a one-line stats summary go to stderr (--quiet hides them).
    """
    texts = _read_prompts(prompt, prompts, file)
    sampling = make_sampling(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                             seed=seed, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos,
                             logprobs=5 if show_probs else 0)
    opts = model_options(checkpoint, tokenizer, model, mesh, coordinator, num_processes, process_id,
                         device_memory, no_compile_cache)
    # A prompt has at most as many tokens as UTF-8 bytes: bounds the KV cache for the memory check.
    lm, tok, resolved = load_model(opts, quiet=quiet, batch=len(texts), max_tokens=sampling.max_tokens,
                                   prompt_tokens=max(len(t.encode("utf-8", "replace")) for t in texts))
    if tok is None:
        raise usage_error(f"no tokenizer: {resolved.checkpoint} has no tokenizer.model; pass --tokenizer PATH")
    sampling = same_seed_on_every_process(sampling)
    _run_completions(lm, tok, texts, sampling, resolved=resolved, truncate=truncate == Truncate.left,
                     stream=not no_stream,
                     json_out=json_out, show_probs=show_probs, quiet=quiet)


def _run_completions(lm, tok, texts: list[str], sampling: SamplingParams, *, resolved: ResolvedModel,
                     truncate: bool, stream: bool, json_out: bool, show_probs: bool, quiet: bool) -> None:
    """Generate for each prompt (one batch when several), render in prompt order."""
    import json

    import grokcli

    from . import tui

    status = tui.StatusDisplay(quiet=quiet)
    sink = tui.TextSink(show_probs=show_probs)
    n = len(texts)
    if n == 1:
        # continuation: the printed text continues the prompt (keeps the first piece's leading space)
        events = grokcli.stream_generate(lm, tok, texts[0], sampling, truncate="left" if truncate else None,
                                         continuation=True)
    else:
        events = grokcli.stream_generate_batch(lm, tok, texts, sampling, truncate="left" if truncate else None,
                                               continuation=True)
    streaming = stream and not json_out
    token_events: list[list] = [[] for _ in range(n)]
    dones: list = [None] * n
    current = 0  # the row whose text goes to stdout live; later rows wait their turn

    def emit_row_end(row: int) -> None:
        if n > 1 or sink.stream.isatty():
            sink.end_line()

    try:
        for ev in events:
            kind = type(ev).__name__
            if kind == "StatusEvent":
                status.show(ev)
                continue
            status.stop()
            if kind == "TokenEvent":
                token_events[ev.row].append(ev)
                if streaming and ev.row == current:  # later rows wait in token_events for their turn
                    sink.write(ev.text, ev.logprob)
            elif kind == "DoneEvent":
                dones[ev.row] = ev
                # Rows finish in any order; print every finished row up to the first unfinished one.
                while streaming and current < n and dones[current] is not None:
                    sink.write(dones[current].final_delta)  # text the row released as it ended
                    emit_row_end(current)
                    current += 1
                    if current < n:
                        for e in token_events[current]:
                            sink.write(e.text, e.logprob)
    except KeyboardInterrupt:
        status.stop()
        close = getattr(events, "close", None)
        if close is not None:
            close()
        if streaming and _isatty(sink.stream):
            sink.end_line()
        tui.stderr_console().print("interrupted")
        raise  # click turns it into Abort: exit code 130
    finally:
        status.stop()

    if json_out:
        for i in range(n):
            obj = completion_json(texts[i], dones[i], sampling, token_events[i], show_probs=show_probs,
                                  checkpoint=resolved.checkpoint)
            sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    elif not stream:
        for i in range(n):
            sink.write(dones[i].text)
            emit_row_end(i)
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




class Template(str, enum.Enum):
    document = "document"
    chat = "chat"


@app.command(rich_help_panel="Generate")
def repl(
    checkpoint: CheckpointOpt = None,
    tokenizer: TokenizerOpt = None,
    model: ModelOpt = None,
    template: Annotated[Template, typer.Option(
        "--template", "-t", case_sensitive=False, rich_help_panel=_OUTPUT_PANEL,
        help="document: every input is appended to one growing text that the model continues. "
             "chat: a 'Human: ... / Assistant: ...' conversation that stops at the next 'Human:' turn.")
    ] = Template.document,
    temp: TempOpt = _SP.temperature,
    top_k: TopKOpt = _SP.top_k,
    top_p: TopPOpt = _SP.top_p,
    min_p: MinPOpt = _SP.min_p,
    repeat_penalty: RepeatPenaltyOpt = _SP.repetition_penalty,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = _SP.max_tokens,
    stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    quiet: QuietOpt = False,
    mesh: MeshOpt = None,
    coordinator: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
    device_memory: DeviceMemoryOpt = None,
    no_compile_cache: NoCompileCacheOpt = False,
    debug: DebugOpt = False,
    color: ColorOpt = None,
) -> None:
    """An interactive session: the model is loaded once, then every input is continued.

    Up/Down and Ctrl-R search the history; Alt-Enter inserts a newline and \"\"\" opens a multi-line block; Tab completes /commands. Ctrl-C stops a generation, Ctrl-D or /exit leaves; /help lists the commands.
    """
    from . import repl as repl_mod

    sampling = make_sampling(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                             seed=seed, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos)
    opts = model_options(checkpoint, tokenizer, model, mesh, coordinator, num_processes, process_id,
                         device_memory, no_compile_cache)
    if coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # The other processes have no keyboard: they could not follow the session.
        raise usage_error("grok repl runs on one host; across hosts use grok complete (see docs/multi-gpu.md)")
    lm, tok, resolved = load_model(opts, quiet=quiet)
    if tok is None:
        raise usage_error(f"no tokenizer: {resolved.checkpoint} has no tokenizer.model; pass --tokenizer PATH")
    session = repl_mod.ReplSession(lm, tok, sampling, template=template.value, quiet=quiet)
    repl_mod.run_repl(session)


@app.command(rich_help_panel="Inspect")
def info(
    checkpoint: CheckpointOpt = None,
    tokenizer: TokenizerOpt = None,
    model: ModelOpt = None,
    json_out: JsonOpt = False,
    memory: Annotated[bool, typer.Option(
        "--memory", rich_help_panel=_DEVICE_PANEL,
        help="Show the memory plan per device and whether it fits.")] = False,
    batch: Annotated[int, typer.Option("--batch", min=1, rich_help_panel=_DEVICE_PANEL,
                                       help="Batch size for the memory estimate.")] = 1,
    context: Annotated[Optional[int], typer.Option(
        "--context", min=1, show_default=False, rich_help_panel=_DEVICE_PANEL,
        help="Context length for the memory estimate. Default: the model's sequence_len.")] = None,
    mesh: MeshOpt = None,
    device_memory: DeviceMemoryOpt = None,
    no_devices: Annotated[bool, typer.Option(
        "--no-devices", rich_help_panel=_DEVICE_PANEL,
        help="Do not start JAX to list devices (faster; the backend is not shown).")] = False,
    debug: DebugOpt = False,
    color: ColorOpt = None,
) -> None:
    """Show the resolved checkpoint, its config, size, the JAX devices and the memory it needs."""
    import json
    import math

    from .config import load_config
    from .params import param_specs

    opts = ModelOptions(checkpoint=checkpoint, tokenizer=tokenizer, model=model, mesh=mesh,
                        device_memory=device_memory)
    resolved = resolve_model(opts)
    cfg = load_config(resolved.checkpoint)
    specs = param_specs(cfg)
    files = sorted(p for p in (resolved.checkpoint / "ckpt-0").iterdir() if p.is_file())
    disk = sum(p.stat().st_size for p in files)
    tok_path = resolved.tokenizer or (resolved.checkpoint / "tokenizer.model")
    ctx_len = context or cfg.sequence_len

    backend, devices = None, []
    if not no_devices:
        import jax

        backend = jax.default_backend()
        devices = [str(d) for d in jax.devices()]
    cpu_matmul = None
    if backend == "cpu":
        from .quant import cpu_matmul_status

        cpu_matmul = cpu_matmul_status()
    if mesh is not None:
        data_axis, model_axis = parse_mesh(mesh)
    else:
        data_axis, model_axis = 1, max(1, len(devices))
    from .memory import plan_memory

    device_bytes = parse_bytes(device_memory, "--device-memory") if device_memory else _detected_device_memory()
    plan = plan_memory(cfg, (data_axis, model_axis), batch=batch, context=ctx_len, device_memory=device_bytes,
                       dtype="float32" if backend == "cpu" else "bfloat16")
    info_obj = {
        "checkpoint": str(resolved.checkpoint),
        "source": resolved.source,
        "config": cfg.to_json(),
        "parameters": sum(math.prod(s.shape) for s in specs),
        "files_expected": len(specs),
        "files_found": len(files),
        "bytes_on_disk": disk,
        "tokenizer": str(tok_path) if tok_path.is_file() else None,
        "backend": backend,
        "devices": devices,
        "cpu_matmul": cpu_matmul,
        "memory": plan.to_json(),
    }
    if json_out:
        sys.stdout.write(json.dumps(info_obj, indent=2) + "\n")
        return
    from . import tui

    tui.print_info(info_obj, show_memory=memory)


def _detected_device_memory() -> Optional[int]:
    """Memory of the first device when JAX can tell (GPUs), else None."""
    if "jax" not in sys.modules:
        return None
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices have no stats; that is not an error
        return None
    return stats.get("bytes_limit") if stats else None


# ---------------------------------------------------------------------------------------------
# 5. download, verify-checkpoint
# ---------------------------------------------------------------------------------------------
# Added by the download/verify work: reuse the aliases above (CheckpointOpt, QuietOpt, JsonOpt,
# DebugOpt, ColorOpt), raise usage_error(...) for bad command lines and GrokError subclasses for
# failures; GrokGroup turns them into one line and the exit code.

_DOWNLOAD_PANEL = "Download"
_VERIFY_PANEL = "Verification"


class _TransferDisplay:
    """A Rich progress bar on stderr for byte transfers: bytes, files, throughput, ETA.

    Only in a terminal (and without --quiet); elsewhere the commands print one summary line.
    `update` is thread-safe (Rich's Progress locks), so library worker threads may call it.
    """

    def __init__(self, label: str, *, quiet: bool):
        self.label, self.quiet = label, quiet
        self._progress = self._task = None

    def __enter__(self) -> "_TransferDisplay":
        from .tui import stderr_console

        console = stderr_console()
        if not self.quiet and console.is_terminal:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(
                TextColumn(f"[bold]{self.label}[/]"), BarColumn(), DownloadColumn(binary_units=False),
                TextColumn("{task.fields[files]}"), TransferSpeedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None, files="")
        return self

    def update(self, bytes_done: int, bytes_total: int, files_done: int, files_total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=bytes_done, total=bytes_total or None,
                                  files=f"{files_done}/{files_total} files")

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def _rate(nbytes: int, seconds: float) -> str:
    from .tui import format_bytes

    return f"{format_bytes(nbytes / seconds)}/s" if seconds > 0 else "-"


@app.command("download", rich_help_panel="Checkpoints")
def download_cmd(
    repo: Annotated[str, typer.Option("--repo", envvar="GROK_REPO", rich_help_panel=_DOWNLOAD_PANEL,
                                      help="Hugging Face repository to download from.")] = "xai-org/grok-1",
    revision: Annotated[str, typer.Option("--revision", rich_help_panel=_DOWNLOAD_PANEL,
                                          help="Branch, tag or commit of the repository.")] = "main",
    local_dir: Annotated[Optional[Path], typer.Option(
        "--local-dir", "--checkpoint", "-c", envvar="GROK_CHECKPOINT", show_default=False,
        rich_help_panel=_DOWNLOAD_PANEL,
        help="Where to put the checkpoint (ckpt-0/, tokenizer.model, manifest.json). "
             "Default: where the other commands look for Grok-1.")] = None,
    include: Annotated[Optional[list[str]], typer.Option(
        "--include", show_default=False, rich_help_panel=_DOWNLOAD_PANEL,
        help="Only files matching this glob (repo or local path, e.g. 'ckpt-0/tensor0000*'); repeatable.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        "--exclude", show_default=False, rich_help_panel=_DOWNLOAD_PANEL,
        help="Skip files matching this glob; repeatable.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", rich_help_panel=_DOWNLOAD_PANEL,
        help="List what would be fetched and its size (on stdout); fetch nothing.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", rich_help_panel=_DOWNLOAD_PANEL,
        help="Download even when the free disk space looks too small.")] = False,
    max_workers: Annotated[int, typer.Option(
        "--max-workers", min=1, rich_help_panel=_DOWNLOAD_PANEL, help="Files fetched at once.")] = 8,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
    color: ColorOpt = None,
) -> None:
    """Download Grok-1 from the Hugging Face Hub: only the tensors and tokenizer.model, resumable.

    Respects HF_ENDPOINT and HF_TOKEN, and uses hf_xet when installed. Run the same
    command again after an interruption: complete files are kept and only the rest is fetched.
    """
    import json

    from . import download as dl
    from .tui import format_bytes, stderr_console

    console = stderr_console()
    plan = dl.plan_download(repo, revision=revision, local_dir=local_dir, include=include or (),
                            exclude=exclude or ())
    if dry_run:
        rows = [{"path": f.path, "source": f.source, "size": f.size, "sha256": f.sha256,
                 "present": f.path in plan.present} for f in plan.selected]
        if json_out:
            sys.stdout.write(json.dumps({"repo_id": plan.repo_id, "revision": plan.revision,
                                         "local_dir": str(plan.local_dir), "files": rows,
                                         "bytes_to_fetch": plan.bytes_to_fetch}, indent=2) + "\n")
            return
        for r in rows:
            state = "present" if r["present"] else "fetch"
            src = "" if r["source"] == r["path"] else f"  <- {r['source']}"
            sys.stdout.write(f"{state:8} {r['size']:>16,}  {r['path']}{src}\n")
        console.print(f"{plan.repo_id}@{plan.revision[:12]}: {len(plan.to_fetch)} of {len(plan.selected)} files "
                      f"to fetch, {format_bytes(plan.bytes_to_fetch)} into {plan.local_dir} (dry run: nothing fetched)")
        return
    if not plan.to_fetch:
        if not quiet:
            console.print(f"{plan.local_dir}: all {len(plan.selected)} files already present "
                          f"({plan.repo_id}@{plan.revision[:12]})")
        result = None
    else:
        if not quiet:
            console.print(f"downloading {len(plan.to_fetch)} files, {format_bytes(plan.bytes_to_fetch)}, "
                          f"from {plan.repo_id}@{plan.revision[:12]} into {plan.local_dir}")
        with _TransferDisplay("downloading", quiet=quiet) as display:
            result = dl.download(plan, force=force, max_workers=max_workers,
                                 on_progress=lambda p: display.update(p.bytes_done, p.bytes_total,
                                                                      p.files_done, p.files_total))
        for w in result.warnings:
            console.print(f"[yellow]warning:[/] {w}")
        if not quiet:
            console.print(f"downloaded {len(result.fetched)} files ({format_bytes(plan.bytes_to_fetch)}) in "
                          f"{result.seconds:.1f} s, {_rate(plan.bytes_to_fetch, result.seconds)}; "
                          f"check every byte with `grok verify-checkpoint {plan.local_dir}`")
    if json_out:
        sys.stdout.write(json.dumps({"repo_id": plan.repo_id, "revision": plan.revision,
                                     "local_dir": str(plan.local_dir),
                                     "fetched": list(result.fetched) if result else [],
                                     "warnings": list(result.warnings) if result else []}, indent=2) + "\n")


@app.command("verify-checkpoint", rich_help_panel="Checkpoints")
def verify_checkpoint_cmd(
    directory: Annotated[Optional[Path], typer.Argument(
        metavar="[DIR]", show_default=False,
        help="Checkpoint directory. Default: $GROK_CHECKPOINT, else where `grok download` puts Grok-1.")] = None,
    jobs: Annotated[Optional[int], typer.Option(
        "--jobs", "-j", min=1, show_default=False, rich_help_panel=_VERIFY_PANEL,
        help="Files hashed in parallel. Default: all cores.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", rich_help_panel=_VERIFY_PANEL,
        help="Existence and sizes only (seconds, even for 300 GB); no hashing or parsing.")] = False,
    fail_on_extra: Annotated[bool, typer.Option(
        "--fail-on-extra", rich_help_panel=_VERIFY_PANEL,
        help="Treat unexpected extra files as failures, not warnings.")] = False,
    write_manifest: Annotated[bool, typer.Option(
        "--write-manifest", rich_help_panel=_VERIFY_PANEL,
        help="Record sizes and SHA-256 of this (known-good) copy in manifest.json when every check passes.")] = False,
    model: ModelOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
    color: ColorOpt = None,
) -> None:
    """Check a checkpoint: every file present, sizes and SHA-256 against the manifest, structure, tokenizer.

    Exit code 0 when everything passes, 1 when anything fails, 2 for usage errors. A SHA256SUMS
    file (sha256sum format) is accepted when there is no manifest.json.
    """
    import json

    from .paths import default_checkpoint_dir
    from .tui import format_bytes, stderr_console
    from .verify import VerifyUsageError, verify_checkpoint

    if model is not None:
        if directory is not None:
            raise usage_error("give either a directory or --model, not both")
        if model not in MODEL_NAMES:
            raise usage_error(f"unknown --model {model!r}: choose one of {', '.join(MODEL_NAMES)}")
        from .paths import demo_model_dir

        directory = demo_model_dir() if model == "demo" else default_checkpoint_dir()
    directory = (directory or default_checkpoint_dir()).expanduser()
    if not directory.is_dir():
        raise usage_error(f"{directory} is not a checkpoint directory"
                          + ("" if directory.exists() else " (it does not exist)"))
    console = stderr_console()
    try:
        with _TransferDisplay("verifying", quiet=quiet or quick) as display:
            report = verify_checkpoint(directory, jobs=jobs, quick=quick, fail_on_extra=fail_on_extra,
                                       write_manifest_file=write_manifest,
                                       on_progress=lambda p: display.update(p.bytes_done, p.bytes_total,
                                                                            p.files_done, p.files_total))
    except VerifyUsageError as e:
        raise usage_error(str(e)) from None

    if json_out:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    if report.problems and not (quiet and report.ok):
        from rich.table import Table

        table = Table(title=None, show_lines=False, highlight=False)
        for col in ("", "check", "file", "parameter", "problem"):
            table.add_column(col, overflow="fold")
        for p in report.problems:
            table.add_row("[red]FAIL[/]" if p.fatal else "[yellow]warn[/]", p.check, p.path, p.param or "",
                          p.message)
        console.print(table)
    for note in report.notes:
        if not quiet:
            console.print(note)
    what = "sizes" if quick else ("sizes, hashes, structure" if report.integrity_proven else "structure")
    against = f" against {report.manifest}" if report.manifest else ""
    speed = "" if quick else f", {format_bytes(report.bytes_read)} at {_rate(report.bytes_read, report.seconds)}"
    if report.ok:
        if not quiet:
            note = "" if report.integrity_proven or quick else " [yellow](integrity not proven: no manifest)[/]"
            console.print(f"[bold green]OK[/] {directory}: {report.files_expected} files, {what}{against} "
                          f"in {report.seconds:.1f} s{speed}{note}")
        return
    files = len({p.path for p in report.failures})
    console.print(f"[bold red]FAILED[/] {directory}: {len(report.failures)} problem(s) in {files} file(s)"
                  f"{against}{speed}")
    raise typer.Exit(EXIT_RUNTIME)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> Any:
    """Console-script entry point (`grok = "grokcli.cli:main"`)."""
    return app(args=argv, prog_name="grok")


if __name__ == "__main__":
    main()
