"""Options shared by several commands, declared once, and the helpers that turn them into library calls.

Commands name an option group as one parameter (`model: ModelOptions`); `@with_option_groups`
expands it into the group's options for Typer and hands the command one object back, so no
command re-lists them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InvalidParameterError
from ..sampling_params import SamplingParams
from .app import ColorOpt, DebugOpt, usage_error

MODEL_PANEL = "Model"
SAMPLING_PANEL = "Sampling"
DEVICE_PANEL = "Devices and memory"
OUTPUT_PANEL = "Output"

QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", envvar="GROK_QUIET", help="No progress or stats on stderr; errors are still shown.",
    rich_help_panel=OUTPUT_PANEL)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.",
                                       rich_help_panel=OUTPUT_PANEL)]
CheckpointOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint", "-c", envvar="GROK_CHECKPOINT", show_default=False, rich_help_panel=MODEL_PANEL,
    help="Checkpoint directory (holds ckpt-0/, optional config.json and tokenizer.model). "
         "Default: where `grok download` puts Grok-1.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="GROK_MODEL", show_default=False, rich_help_panel=MODEL_PANEL,
    help="A named model: 'demo' (the small model bundled with grokcli) or 'grok-1' (the downloaded "
         "Grok-1); or a checkpoint directory, like --checkpoint.")]
MeshOpt = Annotated[Optional[str], typer.Option(
    "--mesh", envvar="GROK_MESH", show_default=False, rich_help_panel=DEVICE_PANEL,
    help="Device mesh DATAxMODEL, e.g. 1x8. Default: model-parallel over all local devices.")]
DeviceMemoryOpt = Annotated[Optional[str], typer.Option(
    "--device-memory", envvar="GROK_DEVICE_MEMORY", show_default=False, rich_help_panel=DEVICE_PANEL,
    help="Memory per device for the fit check, e.g. 80GB (default: as detected).")]


def _opt(annotation, default=None):
    """A dataclass field carrying its Typer option declaration."""
    return dataclasses.field(default=default, metadata={"cli": annotation})


def with_option_groups(fn):
    """Expand each parameter annotated with an option-group dataclass into the group's options.

    The wrapped command receives one instance of the group per such parameter.
    """
    sig = inspect.signature(fn, eval_str=True)
    params, groups = [], {}
    for p in sig.parameters.values():
        if dataclasses.is_dataclass(p.annotation):
            groups[p.name] = p.annotation
            params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                         annotation=f.metadata["cli"]) for f in dataclasses.fields(p.annotation)]
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def command(**kwargs):
        for name, group in groups.items():
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)})
        return fn(**kwargs)

    del command.__wrapped__  # Typer must see the expanded signature below, not fn's
    command.__signature__ = sig.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    """--debug and --color, accepted after the command name too."""

    debug: bool = _opt(DebugOpt, False)
    color: Optional[str] = _opt(ColorOpt, None)


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """Which model to read."""

    checkpoint: Optional[Path] = _opt(CheckpointOpt)
    tokenizer: Optional[Path] = _opt(Annotated[Optional[Path], typer.Option(
        "--tokenizer", envvar="GROK_TOKENIZER", show_default=False, rich_help_panel=MODEL_PANEL,
        help="SentencePiece tokenizer.model. Default: tokenizer.model in the checkpoint directory.")])
    model: Optional[str] = _opt(ModelOpt)

    def resolve(self):
        """The checkpoint directory (grokcli.paths.resolve_checkpoint)."""
        from ..paths import resolve_checkpoint

        return resolve_checkpoint(self.checkpoint, self.model, self.tokenizer)


@dataclasses.dataclass(frozen=True)
class DeviceOptions:
    """Where to run: the mesh, several hosts, the memory check, the compile cache."""

    mesh: Optional[str] = _opt(MeshOpt)
    coordinator: Optional[str] = _opt(Annotated[Optional[str], typer.Option(
        "--coordinator", show_default=False, rich_help_panel=DEVICE_PANEL,
        help="Multi-host: HOST:PORT of process 0 (JAX's distributed runtime; JAX_COORDINATOR_ADDRESS also works).")])
    num_processes: Optional[int] = _opt(Annotated[Optional[int], typer.Option(
        "--num-processes", min=1, show_default=False, rich_help_panel=DEVICE_PANEL,
        help="Multi-host: total number of processes.")])
    process_id: Optional[int] = _opt(Annotated[Optional[int], typer.Option(
        "--process-id", min=0, show_default=False, rich_help_panel=DEVICE_PANEL,
        help="Multi-host: this process's index, 0 .. num-processes-1.")])
    distributed_timeout: float = _opt(Annotated[float, typer.Option(
        "--distributed-timeout", min=1, envvar="GROK_DISTRIBUTED_TIMEOUT", rich_help_panel=DEVICE_PANEL,
        help="Multi-host: seconds to wait for the coordinator and the other processes.")], 60.0)
    device_memory: Optional[str] = _opt(DeviceMemoryOpt)
    no_compile_cache: bool = _opt(Annotated[bool, typer.Option(
        "--no-compile-cache", envvar="GROK_NO_COMPILE_CACHE", rich_help_panel=MODEL_PANEL,
        help="Do not use the persistent compilation cache (it lives in the user cache directory).")], False)

    @property
    def multi_host(self) -> bool:
        return bool(self.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"))

    def device_memory_bytes(self) -> Optional[int]:
        return parse_bytes(self.device_memory, "--device-memory") if self.device_memory else None


_SP = SamplingParams()
# Which SamplingParams field each option sets, for error messages that name the option.
SAMPLING_FLAGS = {
    "temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
    "repetition_penalty": "--repeat-penalty", "seed": "--seed", "max_tokens": "--max-tokens",
    "stop": "--stop", "ignore_eos": "--ignore-eos", "logprobs": "--show-probs",
}


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens (names users know from llama.cpp, mlx-lm and llm); defaults are the library's."""

    temp: float = _opt(Annotated[float, typer.Option(
        "--temp", "--temperature", envvar="GROK_TEMP", rich_help_panel=SAMPLING_PANEL,
        help="Sampling temperature; 0 picks the most likely token (greedy).")], _SP.temperature)
    top_k: int = _opt(Annotated[int, typer.Option(
        "--top-k", envvar="GROK_TOP_K", rich_help_panel=SAMPLING_PANEL,
        help="Sample among the k most likely tokens; 0 disables.")], _SP.top_k)
    top_p: float = _opt(Annotated[float, typer.Option(
        "--top-p", envvar="GROK_TOP_P", rich_help_panel=SAMPLING_PANEL,
        help="Nucleus sampling: the smallest set of tokens whose probability reaches p; 1 disables.")], _SP.top_p)
    min_p: float = _opt(Annotated[float, typer.Option(
        "--min-p", envvar="GROK_MIN_P", rich_help_panel=SAMPLING_PANEL,
        help="Drop tokens less likely than min-p times the most likely one; 0 disables.")], _SP.min_p)
    repeat_penalty: float = _opt(Annotated[float, typer.Option(
        "--repeat-penalty", envvar="GROK_REPEAT_PENALTY", rich_help_panel=SAMPLING_PANEL,
        help="Penalise tokens already in the prompt or output (>1 discourages repeats); 1 disables.")],
        _SP.repetition_penalty)
    seed: Optional[int] = _opt(Annotated[Optional[int], typer.Option(
        "--seed", envvar="GROK_SEED", show_default=False, rich_help_panel=SAMPLING_PANEL,
        help="Random seed; the same seed and options give the same text. Default: a fresh random seed.")])
    max_tokens: int = _opt(Annotated[int, typer.Option(
        "--max-tokens", "-n", envvar="GROK_MAX_TOKENS", rich_help_panel=SAMPLING_PANEL,
        help="Generate at most this many tokens.")], _SP.max_tokens)
    stop: Optional[list[str]] = _opt(Annotated[Optional[list[str]], typer.Option(
        "--stop", show_default=False, rich_help_panel=SAMPLING_PANEL,
        help="Stop before this text (repeatable; \\n, \\t and \\\\ are expanded); the stop text is not "
             "printed. GROK_STOP sets several, separated by |.")])
    ignore_eos: bool = _opt(Annotated[bool, typer.Option(
        "--ignore-eos", envvar="GROK_IGNORE_EOS", rich_help_panel=SAMPLING_PANEL,
        help="Keep generating past the end-of-text token.")], False)

    def params(self, *, logprobs: int = 0) -> SamplingParams:
        """SamplingParams from the command line; an invalid value is a usage error naming its option."""
        from ..stops import expand_escapes, split_stop_list

        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        stop = ([expand_escapes(s) for s in self.stop] if self.stop
                else split_stop_list(os.environ.get("GROK_STOP", "")))
        try:
            return SamplingParams(temperature=self.temp, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                                  repetition_penalty=self.repeat_penalty, seed=seed, max_tokens=self.max_tokens,
                                  stop=tuple(stop), ignore_eos=self.ignore_eos, logprobs=logprobs)
        except InvalidParameterError as e:
            flag = SAMPLING_FLAGS.get(e.option or "")
            raise usage_error(f"invalid value for {flag}: {e}" if flag else f"invalid sampling option: {e}",
                              flag) from None


def parse_mesh(text: str) -> tuple[int, int]:
    """'DATAxMODEL' -> (data, model); a usage error naming --mesh otherwise."""
    from ..sharding import MeshError, parse_mesh_shape  # no jax import: cheap at parse time

    try:
        return parse_mesh_shape(text)
    except MeshError as e:
        raise usage_error(str(e).replace("invalid mesh", "invalid --mesh", 1), "--mesh") from None


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MAX_BYTES = 2**70  # a zettabyte: anything above is a typo, not a device


def parse_bytes(text: str, option: str) -> int:
    """'80GB', '80 GiB', '8e10' -> bytes; a usage error naming the option otherwise."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError, OverflowError):
        raise usage_error(f"invalid {option} {text!r}: expected a size such as 80GB or 24GiB", option) from None
    if not 0 < value < _MAX_BYTES:
        raise usage_error(f"invalid {option} {text!r}: must be positive and below 1 ZiB", option)
    return int(value)


def setup_runtime(devices: DeviceOptions) -> None:
    """Prepare JAX before the model loads: option checks, compile cache, distributed runtime."""
    if devices.mesh is not None:
        parse_mesh(devices.mesh)
    devices.device_memory_bytes()
    from .. import runtime

    runtime.configure(compile_cache=not devices.no_compile_cache, coordinator=devices.coordinator,
                      num_processes=devices.num_processes, process_id=devices.process_id,
                      distributed_timeout_s=devices.distributed_timeout)


def load_model(ckpt: CheckpointOptions, devices: DeviceOptions, *, quiet: bool = False,
               need_tokenizer: bool = True, batch: int = 1, prompt_tokens: int = 0,
               max_tokens: Optional[int] = None, prefill_chunk: Optional[int] = None):
    """Resolve the checkpoint, prepare the runtime, load with a progress display on stderr.

    The fit check (`grokcli.load`'s) runs before any tensor is read. Returns (model, tokenizer, resolved).
    """
    from ..layout import TOKENIZER_NAME

    resolved = ckpt.resolve()
    if need_tokenizer and resolved.tokenizer is None and not (resolved.checkpoint / TOKENIZER_NAME).is_file():
        raise no_tokenizer(resolved)  # say so before reading hundreds of gigabytes
    setup_runtime(devices)
    import jax

    import grokcli

    from .. import tui
    from ..memory import Reservation

    # One device, or model-parallel over all local devices unless --mesh says otherwise.
    from ..sharding import make_mesh

    from ..sharding import MeshError

    try:
        mesh = make_mesh(devices.mesh) if devices.mesh or len(jax.devices()) > 1 else None
    except MeshError as e:
        raise usage_error(f"--mesh: {e}", "--mesh") from None
    with tui.LoadProgress(resolved.checkpoint, quiet=quiet) as progress:
        model, tokenizer = grokcli.load(
            resolved.checkpoint, resolved.tokenizer, progress=progress.update, mesh=mesh,
            reserve_for=Reservation(batch=batch, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                                    prefill_chunk=prefill_chunk),
            device_memory=devices.device_memory_bytes())
    if need_tokenizer and tokenizer is None:
        raise no_tokenizer(resolved)
    return model, tokenizer, resolved


def no_tokenizer(resolved):
    return usage_error(f"no tokenizer: {resolved.checkpoint} has no tokenizer.model; pass --tokenizer PATH",
                       "--tokenizer")


def same_seed_on_every_process(sampling: SamplingParams) -> SamplingParams:
    """Multi-host: every process samples with process 0's seed (each drew its own at random)."""
    from .. import distributed

    if distributed.process_count() <= 1:
        return sampling
    return dataclasses.replace(sampling, seed=distributed.broadcast_int(sampling.seed))
