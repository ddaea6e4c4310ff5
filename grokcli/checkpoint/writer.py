"""Write checkpoints in the release's layout, byte for byte as xAI's `checkpoint.py` wrote them.

The release pickled each leaf with protocol 4 under numpy 1.x, so its streams name
`numpy.core.multiarray._reconstruct`; numpy 2 would write `numpy._core...`. Rather than depend on
how the installed numpy reduces arrays, `_ReleasePickler` emits the release's object graph itself
(`_reconstruct(ndarray, (0,), b'b')` + BUILD state, `dtype(code, False, True)` + BUILD state,
`QuantizedWeight8bit` NEWOBJ + BUILD) through the standard library's pickler, which supplies
the memo and the protocol-4 framing. The result reproduces the fixture files exactly.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import sys
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError
from ..fsutil import atomic_write
from ..params import ParamSpec, get_leaf, param_specs, assemble
from ..quant import QuantizedWeight, quantize
from ..layout import CONFIG_NAME, TENSOR_FOLDER, TENSOR_NAME, TOKENIZER_NAME, tensor_name

# The dtypes the format stores, with the argument and BUILD state numpy 1.26 pickles them with.
_BF16 = np.dtype(ml_dtypes.bfloat16)
_DTYPE_STATES = {
    np.dtype(np.float32): ("f4", (3, "<", None, None, None, -1, -1, 0)),
    np.dtype(np.int8): ("i1", (3, "|", None, None, None, -1, -1, 0)),
    _BF16: (None, (3, "<", None, None, None, 2, 2, 64)),  # None: the ml_dtypes.bfloat16 global
}


class _GlobalRef:
    """A global as the release's stream names it (not necessarily importable here)."""

    def __init__(self, module: str, name: str):
        # Interned so that a module name shared by two globals ("numpy") is memoised once,
        # as it is when pickle reads it from the real objects' __module__.
        self.module, self.name = sys.intern(module), sys.intern(name)


_RECONSTRUCT = _GlobalRef("numpy.core.multiarray", "_reconstruct")
_NDARRAY = _GlobalRef("numpy", "ndarray")
_DTYPE = _GlobalRef("numpy", "dtype")
_BFLOAT16 = _GlobalRef("ml_dtypes", "bfloat16")
_QW8 = _GlobalRef("__main__", "QuantizedWeight8bit")
_B = b"b"  # numpy's _reconstruct dtype-char argument; one object, so memoised once per file


class _DtypeRef:
    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


_DTYPE_REFS = {dt: _DtypeRef(dt) for dt in _DTYPE_STATES}  # one object per dtype, like numpy's


class _PayloadRef:
    """An array's raw bytes: from `array`, or (to compute sizes) `length` zero bytes never built."""

    def __init__(self, length: int, array: np.ndarray | None):
        self.length, self.array = length, array


class _ArrayRef:
    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, array: np.ndarray | None):
        if dtype not in _DTYPE_REFS:
            raise ValueError(f"the checkpoint format stores float32, int8 and bfloat16, not {dtype}")
        self.shape, self.dtype = tuple(int(n) for n in shape), _DTYPE_REFS[dtype]
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        self.payload = _PayloadRef(nbytes, array)


class _QuantRef:
    def __init__(self, weight: _ArrayRef, scales: _ArrayRef):
        self.weight, self.scales = weight, scales


class _ReleasePickler(pickle._Pickler):
    """Protocol-4 pickler that writes our reference objects as the release's streams."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file):
        super().__init__(file, protocol=4, fix_imports=False)

    def save_global_ref(self, obj: _GlobalRef):
        self.save(obj.module)
        self.save(obj.name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    def save_dtype_ref(self, obj: _DtypeRef):
        code, state = _DTYPE_STATES[obj.dtype]
        self.save(_DTYPE)
        # Fresh tuples each time: the pickler memoises by identity, as with numpy's own.
        self.save(tuple([_BFLOAT16 if code is None else code, False, True]))
        self.write(pickle.REDUCE)
        self.memoize(obj)
        self.save(tuple(sys.intern(x) if isinstance(x, str) else x for x in state))
        self.write(pickle.BUILD)

    def save_array_ref(self, obj: _ArrayRef):
        self.save(_RECONSTRUCT)
        self.save(tuple([_NDARRAY, tuple([0]), _B]))
        self.write(pickle.REDUCE)
        self.memoize(obj)
        self.save(tuple([1, tuple(obj.shape), obj.dtype, False, obj.payload]))
        self.write(pickle.BUILD)

    def save_payload_ref(self, obj: _PayloadRef):
        # Same opcode choice and framing as pickle's save_bytes, without building a bytes copy
        # of a large array: its buffer is handed to the file's write() directly.
        n = obj.length
        if obj.array is None:
            data = _Zeros(n) if n >= self.framer._FRAME_SIZE_TARGET else bytes(n)
        else:
            data = memoryview(np.ascontiguousarray(obj.array).reshape(-1).view(np.uint8))
        if n <= 0xFF:
            self.write(pickle.SHORT_BINBYTES + struct.pack("<B", n) + bytes(data))
        elif n > 0xFFFFFFFF:
            self._write_large_bytes(pickle.BINBYTES8 + struct.pack("<Q", n), data)
        elif n >= self.framer._FRAME_SIZE_TARGET:
            self._write_large_bytes(pickle.BINBYTES + struct.pack("<I", n), data)
        else:
            self.write(pickle.BINBYTES + struct.pack("<I", n) + bytes(data))
        self.memoize(obj)

    def save_quant_ref(self, obj: _QuantRef):
        self.save(_QW8)
        self.write(pickle.EMPTY_TUPLE)
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.save({"weight": obj.weight, "scales": obj.scales})
        self.write(pickle.BUILD)

    dispatch[_GlobalRef] = save_global_ref
    dispatch[_DtypeRef] = save_dtype_ref
    dispatch[_ArrayRef] = save_array_ref
    dispatch[_PayloadRef] = save_payload_ref
    dispatch[_QuantRef] = save_quant_ref


class _Zeros:
    """Stands for a large run of payload bytes when only the file size is wanted."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n


class _CountingSink:
    def __init__(self):
        self.n = 0

    def write(self, data) -> int:
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        self.n += n
        return n


def _array_ref(a: np.ndarray) -> _ArrayRef:
    return _ArrayRef(a.shape, a.dtype, a)


def _leaf_ref(leaf: np.ndarray | QuantizedWeight) -> _ArrayRef | _QuantRef:
    if isinstance(leaf, QuantizedWeight):
        return _QuantRef(_array_ref(np.asarray(leaf.weight)), _array_ref(np.asarray(leaf.scales)))
    return _array_ref(np.asarray(leaf))


def dump_leaf(leaf: np.ndarray | QuantizedWeight, file: BinaryIO) -> None:
    """Pickle one leaf (float32 array, or QuantizedWeight int8 + bfloat16) as the release does."""
    _ReleasePickler(file).dump(_leaf_ref(leaf))


def dumps_leaf(leaf: np.ndarray | QuantizedWeight) -> bytes:
    """`dump_leaf` into bytes."""
    import io

    buf = io.BytesIO()
    dump_leaf(leaf, buf)
    return buf.getvalue()


def expected_file_size(spec: ParamSpec) -> int:
    """Exact size in bytes of the release's tensor file for `spec` (the writer writes the same).

    Computed by running the writer's pickler over the leaf's structure without its data, so it
    holds for every shape: it gives the real Grok-1 sizes (embeddings 3,221,225,637 B, ...).
    """
    sink = _CountingSink()
    _ReleasePickler(sink).dump(_spec_ref(spec))
    return sink.n


def _spec_ref(spec: ParamSpec) -> _ArrayRef | _QuantRef:
    """The leaf structure of `spec` with no data (payloads become zeros)."""
    if spec.quantized:
        return _QuantRef(_ArrayRef(spec.shape, np.dtype(np.int8), None),
                         _ArrayRef(spec.scales_shape, _BF16, None))
    return _ArrayRef(spec.shape, np.dtype(np.float32), None)


class _SparseSink:
    """Writes small data; seeks over large zero payloads, leaving holes in the file."""

    def __init__(self, f: BinaryIO):
        self.f = f

    def write(self, data) -> int:
        if isinstance(data, _Zeros):
            self.f.seek(len(data), os.SEEK_CUR)
            return len(data)
        return self.f.write(data)


def write_sparse_checkpoint(out_dir: str | Path, cfg: ModelConfig) -> Path:
    """A checkpoint of `cfg` whose large payloads are holes (zeros) in sparse files.

    Every file has the release's exact structure and size (`expected_file_size`) while the disk
    holds little more than the headers: for testing checks and tools on Grok-1-sized layouts.
    """
    out = Path(out_dir)
    ckpt = out / TENSOR_FOLDER
    ckpt.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(param_specs(cfg)):
        def write(f, spec=spec):
            _ReleasePickler(_SparseSink(f)).dump(_spec_ref(spec))
            f.truncate()
        atomic_write(ckpt / tensor_name(i), write)
    text = json.dumps(cfg.to_json(), indent=1) + "\n"
    atomic_write(out / CONFIG_NAME, lambda f: f.write(text.encode()))
    return out


def _leaf_for_spec(leaf, spec: ParamSpec) -> np.ndarray | QuantizedWeight:
    """The leaf in storage form for `spec`: float32, or QuantizedWeight (quantising floats)."""
    if spec.quantized:
        if not isinstance(leaf, QuantizedWeight):
            leaf = quantize(np.asarray(leaf, dtype=np.float32), spec.row_blocks)
        weight = np.asarray(leaf.weight)
        scales = np.asarray(leaf.scales)
        if weight.dtype != np.int8:
            raise ConfigError(f"{spec.path}: quantized weight must be int8, got {weight.dtype}")
        if tuple(weight.shape) != spec.shape or tuple(scales.shape) != spec.scales_shape:
            raise ConfigError(f"{spec.path}: weight {list(weight.shape)} scales {list(scales.shape)}, "
                              f"config expects {list(spec.shape)} and {list(spec.scales_shape)}")
        return QuantizedWeight(weight=weight, scales=scales.astype(_BF16))
    if isinstance(leaf, QuantizedWeight):
        raise ConfigError(f"{spec.path}: is stored as a plain float32 array, got a QuantizedWeight")
    array = np.asarray(leaf, dtype=np.float32)
    if tuple(array.shape) != spec.shape:
        raise ConfigError(f"{spec.path}: shape {list(array.shape)}, config expects {list(spec.shape)}")
    return array


def write_checkpoint(out_dir: str | Path, params: dict, cfg: ModelConfig, *,
                     tokenizer_path: str | Path | None = None, write_config: bool = True,
                     progress=None) -> Path:
    """Write `params` as `<out_dir>/ckpt-0/tensor{i:05d}_000` in the release's format.

    Quantized leaves may be QuantizedWeight or float arrays (quantised here, int8 absmax per
    output channel and row block). Every file, `config.json` (unless write_config=False) and the
    copied tokenizer are written to a temp name and renamed. Tensor files beyond this config's
    count (left from an earlier, larger checkpoint) are removed. `progress(files_done, files_total)`
    is called after each file. Returns the checkpoint directory.
    """
    out = Path(out_dir)
    ckpt = out / TENSOR_FOLDER
    ckpt.mkdir(parents=True, exist_ok=True)
    specs = param_specs(cfg)
    for i, spec in enumerate(specs):
        leaf = _leaf_for_spec(get_leaf(params, spec), spec)
        atomic_write(ckpt / tensor_name(i), lambda f: dump_leaf(leaf, f))
        if progress is not None:
            progress(i + 1, len(specs))
    for stale in ckpt.iterdir():
        m = TENSOR_NAME.fullmatch(stale.name)
        if m and int(m.group(1)) >= len(specs):
            stale.unlink()
    if write_config:
        text = json.dumps(cfg.to_json(), indent=1) + "\n"
        atomic_write(out / CONFIG_NAME, lambda f: f.write(text.encode()))
    if tokenizer_path is not None:
        with open(tokenizer_path, "rb") as src:
            atomic_write(out / TOKENIZER_NAME, lambda f: shutil.copyfileobj(src, f, 16 << 20))
    return out


def random_params(cfg: ModelConfig, seed: int = 0, *, embed_gain: float = 3.0,
                  post_norm_gain: float = 12.0, router_gain: float = 4.0,
                  qk_gain: float = 1.0) -> dict:
    """A random params pytree (numpy) drawn like the official fixtures' generator.

    Embeddings `embed_gain*N(0,1)/sqrt(emb)`; norm scales `1 + 0.1*N(0,1)`, the post-attention
    and post-MoE ones times `post_norm_gain`; router `router_gain*N(0,1)/sqrt(emb)`; matrices
    `N(0,1)/sqrt(fan_in)` (query/key times `qk_gain`) quantised to int8 with bfloat16 scales.
    """
    rng = np.random.default_rng(seed)
    leaves = {}
    for spec in param_specs(cfg):
        x = rng.standard_normal(spec.shape, dtype=np.float32)
        if spec.quantized:
            x /= np.sqrt(np.float32(spec.shape[-2]))
            if spec.name in ("q", "k"):
                x *= np.float32(qk_gain)
            leaf = quantize(x, spec.row_blocks)
        elif spec.name == "embed":
            leaf = x * np.float32(embed_gain / np.sqrt(cfg.emb_size))
        elif spec.name == "router":
            leaf = x * np.float32(router_gain / np.sqrt(cfg.emb_size))
        else:
            leaf = 1 + np.float32(0.1) * x
            if spec.name in ("attn_post_norm", "moe_post_norm"):
                leaf *= np.float32(post_norm_gain)
        leaves[(spec.name, spec.layer)] = leaf
    return assemble(cfg, leaves)
