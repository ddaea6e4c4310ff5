"""Read a checkpoint in the release's layout: cheap structural checks, then a threaded bulk read.

Each payload is read once, with large sequential `readinto` calls, straight into the 64-byte
aligned buffer of its final numpy array; no intermediate bytes object is built.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..fsutil import NotRegularFileError, open_regular_file
from ..params import ParamSpec, assemble, param_specs
from ..quant import QuantizedWeight
from ..layout import TENSOR_FOLDER, TENSOR_NAME, tensor_name
from .unpickle import ArrayHeader, LeafHeader, build_leaf, read_header, readinto_exactly

ProgressFn = Callable[[int, int, int, int], None]  # (bytes_done, bytes_total, files_done, files_total)

_BF16 = np.dtype(ml_dtypes.bfloat16)

# How a dimension of a parameter is named in a config mismatch message, by logical axis.
_AXIS_LABELS = {
    "expert": "experts", "emb": "emb_size", "ffn": "ffn_size", "vocab": "vocab_size",
    "q_heads": "num_q_heads*key_size", "kv_heads": "num_kv_heads*key_size",
}


def tensor_path(ckpt0: Path, index: int) -> Path:
    """The file holding leaf `index`."""
    return ckpt0 / tensor_name(index)


def resolve_checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """The `ckpt-0/` folder of a checkpoint directory, with a clear error when there is none."""
    d = Path(ckpt_dir)
    if not d.exists():
        raise CheckpointError(f"{d} does not exist")
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory")
    ckpt0 = d / TENSOR_FOLDER
    if not ckpt0.is_dir():
        if any(TENSOR_NAME.fullmatch(p.name) for p in d.iterdir()):
            raise CheckpointError(f"{d} looks like the ckpt-0/ folder itself; pass the folder "
                                  f"that contains it ({d.resolve().parent})")
        raise CheckpointError(f"{d} is not a Grok-1 checkpoint directory: no ckpt-0/ folder")
    if not any(TENSOR_NAME.fullmatch(p.name) for p in ckpt0.iterdir()):
        raise CheckpointError(f"{ckpt0} is empty: no tensor*_000 files (is the download complete?)")
    return ckpt0


def _check_file_set(ckpt0: Path, specs: list[ParamSpec], cfg: ModelConfig) -> None:
    present = {int(m.group(1)) for p in ckpt0.iterdir() if (m := TENSOR_NAME.fullmatch(p.name))}
    n = len(specs)
    missing = [i for i in range(n) if i not in present]
    extra = sorted(i for i in present if i >= n)
    contiguous = present == set(range(len(present)))
    fits_layers = (len(present) - 2) // 12 if (len(present) - 2) % 12 == 0 and len(present) > 2 else None
    if extra:
        hint = f", which is a {fits_layers}-layer model" if contiguous and fits_layers else ""
        raise ConfigError(f"{ckpt0} holds {len(present)} tensor files{hint}; the config says "
                          f"num_layers={cfg.num_layers} ({n} files)")
    if missing:
        spec = specs[missing[0]]
        hint = (f" (or config.json is wrong: the files present would make a {fits_layers}-layer "
                "model)" if contiguous and fits_layers else "")
        raise CheckpointError(f"{tensor_path(ckpt0, missing[0])} is missing ({spec.path}, "
                              f"{spec.where}): {len(missing)} of {n} tensor files missing{hint}")


def _shape_message(spec: ParamSpec, found: tuple[int, ...], name: str) -> str:
    detail = f"({name} {spec.path} is {list(found)}, config expects {list(spec.shape)})"
    if len(found) == len(spec.shape):
        for axis, got, want in zip(spec.axes, found, spec.shape):
            if got != want:
                label = _AXIS_LABELS.get(axis, axis)
                what = f"{got} {label}" if axis == "expert" else f"{label} {got}"
                return f"{spec.where} has {what}, config says {want} {detail}"
    return f"{spec.where} has shape {list(found)}, config expects {list(spec.shape)} {detail}"


def validate_leaf(header: LeafHeader, spec: ParamSpec, name: str,
                  shape_error: type[Exception] = CheckpointError) -> None:
    """Check a parsed file against its ParamSpec: storage type, dtypes, shape, scales shape.

    A wrong shape raises `shape_error` (ConfigError when checking a config against the files);
    everything else is a CheckpointError naming the file and the parameter.
    """
    where = f"{name} ({spec.path})"
    if spec.quantized:
        expected = (f"QuantizedWeight8bit int8 {list(spec.shape)} with bfloat16 scales "
                    f"{list(spec.scales_shape)}")
        if not header.quantized:
            raise CheckpointError(f"{where}: expected {expected}, found {header.describe()}")
        if header.weight.dtype != np.int8 or header.scales.dtype != _BF16:
            raise CheckpointError(f"{where}: expected {expected}, found {header.describe()}")
        if header.weight.shape != spec.shape:
            raise shape_error(_shape_message(spec, header.weight.shape, name))
        if header.scales.shape != spec.scales_shape:
            raise CheckpointError(f"{where}: scales are {list(header.scales.shape)}, expected "
                                  f"{list(spec.scales_shape)} ({spec.row_blocks} row block(s) per matrix)")
    else:
        expected = f"float32 ndarray {list(spec.shape)}"
        if header.quantized or header.array.dtype != np.float32:
            raise CheckpointError(f"{where}: expected {expected}, found {header.describe()}")
        if header.array.shape != spec.shape:
            raise shape_error(_shape_message(spec, header.array.shape, name))


@contextlib.contextmanager
def _open(path: Path, spec: ParamSpec):
    # Regular files only: a FIFO would block forever (opened non-blocking, checked on the descriptor).
    opened = False
    try:
        with open_regular_file(path) as f:
            opened = True
            yield f
    except FileNotFoundError:
        if opened:
            raise
        raise CheckpointError(f"{path} is missing ({spec.path}, {spec.where})") from None
    except NotRegularFileError:
        raise CheckpointError(f"{path}: not a regular file ({spec.path})") from None
    except OSError as e:
        if opened:
            raise
        raise CheckpointError(f"{path}: cannot read ({e.strerror}) ({spec.path})") from None


def _read_leaf(path: Path, spec: ParamSpec, on_bytes=None) -> np.ndarray | QuantizedWeight:
    with _open(path, spec) as f:
        header = read_header(f, path.name)
        validate_leaf(header, spec, path.name)

        def fill(payload, out: np.ndarray) -> None:
            f.seek(payload.offset)
            readinto_exactly(f, memoryview(out), path.name, on_bytes)

        return build_leaf(header, fill)


def read_leaf(path: str | Path, spec: ParamSpec) -> np.ndarray | QuantizedWeight:
    """Read one tensor file and check it against `spec` (storage type, dtypes, shapes).

    Returns a float32 array or a QuantizedWeight (int8 weight, bfloat16 scales). Any problem,
    including a missing or truncated file, is a CheckpointError naming the file and parameter.
    """
    return _read_leaf(Path(path), spec)


def check_checkpoint_shapes(ckpt_dir: str | Path, cfg: ModelConfig) -> list[LeafHeader]:
    """Check that a checkpoint directory matches `cfg`, reading only the files' pickle headers.

    Reads a few hundred bytes per file and seeks past the payloads, so the full 300 GB release
    is checked in well under a second on a local disk. Raises ConfigError when a tensor's shape
    (or the number of files) disagrees with the config, e.g. "layer 3 moe/linear has 4 experts,
    config says 8", and CheckpointError for a missing, truncated or malformed file. Returns each
    file's header, in file order.
    """
    ckpt0 = resolve_checkpoint_dir(ckpt_dir)
    specs = param_specs(cfg)
    _check_file_set(ckpt0, specs, cfg)
    headers = []
    for i, spec in enumerate(specs):
        path = tensor_path(ckpt0, i)
        with _open(path, spec) as f:
            header = read_header(f, path.name)
        validate_leaf(header, spec, path.name, shape_error=ConfigError)
        headers.append(header)
    return headers


class _ByteCounter:
    def __init__(self):
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


def iter_leaves(ckpt_dir: str | Path, cfg: ModelConfig, *, workers: int = 4,
                max_in_flight: int | None = None, progress: ProgressFn | None = None,
                check: bool = True) -> Iterator[tuple[ParamSpec, np.ndarray | QuantizedWeight]]:
    """Yield `(spec, leaf)` as files finish reading, in completion order.

    `workers` threads read files; at most `max_in_flight` (default: `workers`) files are being
    read or waiting to be consumed at once, so host memory stays bounded while the consumer
    places each leaf on its devices. `progress(bytes_done, bytes_total, files_done, files_total)`
    is called from the caller's thread, a few times a second and after each file. With
    `check` (the default) the whole directory is first checked against `cfg` from the pickle
    headers (`check_checkpoint_shapes`), so a wrong config fails before anything heavy.
    """
    ckpt0 = resolve_checkpoint_dir(ckpt_dir)
    specs = param_specs(cfg)
    if check:
        check_checkpoint_shapes(ckpt_dir, cfg)
    else:
        _check_file_set(ckpt0, specs, cfg)
    paths = [tensor_path(ckpt0, i) for i in range(len(specs))]
    sizes = [p.stat().st_size for p in paths]
    bytes_total, files_total = sum(sizes), len(specs)
    in_flight = max(1, max_in_flight or workers)
    counter = _ByteCounter()

    def task(i: int):
        counted = 0

        def add(n: int) -> None:
            nonlocal counted
            counted += n
            counter.add(n)

        leaf = _read_leaf(paths[i], specs[i], add)
        counter.add(sizes[i] - counted)  # the header and small inline payloads
        return leaf

    files_done = 0
    next_index = 0
    pending: dict[cf.Future, int] = {}
    with cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ckpt-read") as pool:
        try:
            while next_index < files_total or pending:
                while next_index < files_total and len(pending) < in_flight:
                    pending[pool.submit(task, next_index)] = next_index
                    next_index += 1
                done, _ = cf.wait(pending, timeout=0.25 if progress else None,
                                  return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    leaf = fut.result()
                    files_done += 1
                    if progress is not None:
                        progress(counter.value, bytes_total, files_done, files_total)
                    # Keep the pool busy while the consumer handles this leaf.
                    while next_index < files_total and len(pending) < in_flight:
                        pending[pool.submit(task, next_index)] = next_index
                        next_index += 1
                    yield specs[i], leaf
                if not done and progress is not None:
                    progress(counter.value, bytes_total, files_done, files_total)
        finally:
            for fut in pending:
                fut.cancel()


def read_checkpoint(ckpt_dir: str | Path, cfg: ModelConfig, progress: ProgressFn | None = None,
                    workers: int = 4) -> dict:
    """Read a whole checkpoint into the params pytree (`grokcli.params.assemble` layout).

    Leaves are numpy: float32 arrays, and QuantizedWeight with int8 weights and bfloat16
    scales. The directory is checked against `cfg` from the headers first.
    """
    leaves = {}
    for spec, leaf in iter_leaves(ckpt_dir, cfg, workers=workers, progress=progress):
        leaves[(spec.name, spec.layer)] = leaf
    return assemble(cfg, leaves)


__all__ = ["resolve_checkpoint_dir", "tensor_path", "validate_leaf", "read_leaf",
           "check_checkpoint_shapes", "iter_leaves", "read_checkpoint", "ArrayHeader"]
