"""A restricted unpickler for the release's tensor files: no code from a checkpoint ever runs.

The release pickles each leaf with protocol 4. The stream only ever names five globals
(`__main__.QuantizedWeight8bit`, `numpy.core.multiarray._reconstruct`, `numpy.ndarray`,
`numpy.dtype`, `ml_dtypes.bfloat16`); numpy >= 2 spells the first numpy one
`numpy._core.multiarray._reconstruct`, so that spelling is allowed too. Protocol 5 pickles of
numpy >= 2 would also use `numpy._core.numeric._frombuffer` with out-of-band buffers; the release
never does, so it is refused like everything else.

None of those names is resolved to the real object. `find_class` hands out inert stand-ins
(`_Global`) whose only behaviour is to check their arguments and record what the stream says: a
REDUCE of `_reconstruct` yields an `_ArrayStub`, a REDUCE of `dtype` yields a `_DtypeStub` from
a fixed list of numeric types, a NEWOBJ of `QuantizedWeight8bit` yields a `_QuantizedStub`. Every
stand-in defines `__setstate__` (so BUILD never touches an object's `__dict__`) and uses
`__slots__`. Real numpy arrays are built only after the stream has been parsed, by our code.

Large byte payloads are not copied by the parser: when BINBYTES/BINBYTES8 sits outside a protocol-4
frame (the pickler always puts payloads of 64 KiB or more there) the parser records its offset
and length and skips it. The caller then reads each payload straight into its final array (file)
or views it in place (bytes). The same parse, run on a file, gives every leaf's shape and dtype
after reading a few hundred bytes: that is how a 300 GB checkpoint is checked in seconds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import struct
from typing import BinaryIO

import ml_dtypes
import numpy as np

from ..errors import CheckpointError
from ..quant import QuantizedWeight

# Globals the format needs, by (module, name). Values are the stand-in kinds.
_ALLOWED_GLOBALS = {
    ("__main__", "QuantizedWeight8bit"): "QuantizedWeight8bit",
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("ml_dtypes", "bfloat16"): "bfloat16",
}

# numpy dtype codes a leaf may carry: plain little-endian numbers only (never "O" objects,
# records or strings). Anything but f4 / i1 / bf16 is refused later with a message that names
# the parameter, which is more helpful than refusing it here.
_DTYPE_CODES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"}

# Payloads at least this large are skipped by offset instead of being read by the parser. The
# pickler puts payloads >= 64 KiB outside frames; smaller ones arrive inside a frame anyway.
_SKIP_THRESHOLD = 4096


def _refuse(message: str):
    raise _Refused(message)


class _Refused(Exception):
    """Raised inside the parser; turned into a CheckpointError naming the file."""


class _Global:
    """Inert stand-in for one allowed global."""

    __slots__ = ("kind",)

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, *args):
        if self.kind == "_reconstruct":
            # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by BUILD(state).
            if (len(args) != 3 or args[0] is not _GLOBALS["ndarray"] or args[1] != (0,)
                    or args[2] != b"b"):
                _refuse(f"unexpected arguments to numpy _reconstruct: {_describe(args)}")
            return _ArrayStub()
        if self.kind == "dtype":
            # numpy pickles a dtype as dtype(code, False, True) followed by BUILD(state).
            if len(args) != 3 or args[1] is not False or args[2] is not True:
                _refuse(f"unexpected arguments to numpy.dtype: {_describe(args)}")
            if args[0] is _GLOBALS["bfloat16"]:
                return _DtypeStub(np.dtype(ml_dtypes.bfloat16))
            if isinstance(args[0], str) and args[0] in _DTYPE_CODES:
                return _DtypeStub(np.dtype(args[0]))
            _refuse(f"unsupported dtype {_describe(args[0])}")
        _refuse(f"calling {self.kind} is not part of the checkpoint format")

    def __setstate__(self, state):
        _refuse(f"BUILD on {self.kind} is not part of the checkpoint format")

    def __reduce__(self):
        raise TypeError("stand-ins are not picklable")


_GLOBALS = {kind: _Global(kind) for kind in set(_ALLOWED_GLOBALS.values()) - {"QuantizedWeight8bit"}}


def _describe(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Payload:
    """A byte payload the parser skipped: `length` bytes at `offset` of the source."""

    __slots__ = ("offset", "length")

    def __init__(self, offset: int, length: int):
        self.offset, self.length = offset, length

    def __setstate__(self, state):
        _refuse("BUILD on a byte payload is not part of the checkpoint format")

    def __repr__(self):
        return f"<{self.length}-byte payload at offset {self.offset}>"


class _DtypeStub:
    __slots__ = ("dtype", "built")

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.built = False

    def __setstate__(self, state):
        # (version 3, byte order, subarray, names, fields, elsize, alignment, flags)
        if self.built or not isinstance(state, tuple) or len(state) != 8 or state[0] != 3:
            _refuse(f"unexpected dtype state {_describe(state)}")
        if state[1] not in ("<", "|", "="):
            _refuse(f"unsupported byte order {state[1]!r} for {self.dtype}")
        if state[2] is not None or state[3] is not None or state[4] is not None:
            _refuse("structured dtypes are not part of the checkpoint format")
        self.built = True

    def __reduce__(self):
        raise TypeError("stand-ins are not picklable")


class _ArrayStub:
    __slots__ = ("shape", "dtype", "fortran", "data")

    def __init__(self):
        self.shape = None

    def __setstate__(self, state):
        # (version 1, shape, dtype, is_fortran, raw bytes)
        if self.shape is not None or not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            _refuse(f"unexpected ndarray state {_describe(state)}")
        _, shape, dtype, fortran, data = state
        if (not isinstance(shape, tuple)
                or not all(type(n) is int and 0 <= n < 2**62 for n in shape)):
            _refuse(f"bad array shape {_describe(shape)}")
        if not isinstance(dtype, _DtypeStub) or not dtype.built:
            _refuse(f"bad array dtype {_describe(dtype)}")
        if type(fortran) is not bool:
            _refuse(f"bad array order flag {_describe(fortran)}")
        nbytes = math.prod(shape) * dtype.dtype.itemsize
        length = data.length if isinstance(data, _Payload) else len(data) if isinstance(data, bytes) else None
        if length is None:
            _refuse(f"bad array data {_describe(data)}")
        if length != nbytes:
            _refuse(f"array {shape} {dtype.dtype} needs {nbytes} bytes of data, the file has {length}")
        self.shape, self.dtype, self.fortran, self.data = shape, dtype.dtype, fortran, data

    def __reduce__(self):
        raise TypeError("stand-ins are not picklable")


class _QuantizedStub:
    """Stand-in for `__main__.QuantizedWeight8bit`: NEWOBJ with no arguments, then BUILD."""

    __slots__ = ("weight", "scales")

    def __new__(cls):
        self = object.__new__(cls)
        self.weight = self.scales = None
        return self

    def __setstate__(self, state):
        if self.weight is not None or not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            _refuse(f"unexpected QuantizedWeight8bit state {_describe(state)}")
        weight, scales = state["weight"], state["scales"]
        if not (isinstance(weight, _ArrayStub) and weight.shape is not None
                and isinstance(scales, _ArrayStub) and scales.shape is not None):
            _refuse("QuantizedWeight8bit weight and scales must be arrays")
        self.weight, self.scales = weight, scales

    def __reduce__(self):
        raise TypeError("stand-ins are not picklable")


class _Source:
    """What the parser reads from: small reads are served, large payloads are skipped."""

    def __init__(self, read, readline, skip, tell, size: int):
        self.read = read
        self.readline = readline  # for protocol-0 opcodes (GLOBAL, ...), which reach find_class
        self.skip = skip  # (length) -> offset, advancing past the payload
        self.tell = tell
        self.size = size


def _memory_source(view: memoryview) -> _Source:
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        data = view[pos:pos + n].tobytes()
        pos += len(data)
        return data

    def readline() -> bytes:
        nonlocal pos
        end = bytes(view[pos:pos + 4096]).find(b"\n")  # no legitimate line is longer
        data = view[pos:pos + end + 1 if end >= 0 else pos + 4096].tobytes()
        pos += len(data)
        return data

    def skip(n: int) -> int:
        nonlocal pos
        start = pos
        if start + n > len(view):
            _truncated(start, n, len(view))
        pos += n
        return start

    return _Source(read, readline, skip, lambda: pos, len(view))


def _file_source(f: BinaryIO, size: int) -> _Source:
    start = f.tell()

    def skip(n: int) -> int:
        offset = f.tell()
        if offset + n > size:
            _truncated(offset - start, n, size - start)
        f.seek(n, os.SEEK_CUR)
        return offset - start

    def read(n: int) -> bytes:
        # Never ask for more than the file holds: a crafted length must not allocate gigabytes.
        return f.read(max(0, min(n, size - f.tell())))

    return _Source(read, lambda: f.readline(4096), skip, lambda: f.tell() - start, size - start)


def _truncated(offset: int, length: int, size: int):
    raise _Refused(f"truncated: a {length}-byte payload at offset {offset} runs past the end of "
                   f"the file ({size} bytes)")


# Opcodes that cannot appear in the release's streams and that we therefore refuse outright:
# persistent ids, the copyreg extension registry, and protocol-5 out-of-band buffers. Old
# protocol-0/1 opcodes (GLOBAL, INST, OBJ) stay: they go through find_class like STACK_GLOBAL,
# so a refusal names the global.
_REFUSED_OPCODES = {
    pickle.PERSID: "persistent id", pickle.BINPERSID: "persistent id",
    pickle.EXT1: "extension code", pickle.EXT2: "extension code", pickle.EXT4: "extension code",
    b"\x97": "NEXT_BUFFER", b"\x98": "READONLY_BUFFER",
}


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python `pickle.Unpickler`, restricted to the release's globals and opcodes.

    The Python implementation (not the C one) is used so that large payloads can be skipped
    instead of copied; it parses the ~60 opcodes of a leaf in well under a millisecond.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, source: _Source):
        super().__init__(source, fix_imports=False)
        self._source = source

    def find_class(self, module, name):
        kind = _ALLOWED_GLOBALS.get((module, name))
        if kind is None:
            _refuse(f"refused pickle global {module}.{name}")
        return _QuantizedStub if kind == "QuantizedWeight8bit" else _GLOBALS[kind]

    def persistent_load(self, pid):
        _refuse("refused pickle persistent id")

    def _load_payload(self, length: int):
        frame = getattr(getattr(self, "_unframer", None), "current_frame", None)
        in_frame = frame is not None and frame.tell() < len(frame.getbuffer())
        if in_frame or length < _SKIP_THRESHOLD:
            data = self.read(length)
            if len(data) != length:
                _truncated(self._source.tell() - len(data), length, self._source.size)
            self.append(data)
        else:
            if frame is not None:
                self._unframer.current_frame = None  # exhausted: reading continues in the file
            self.append(_Payload(self._source.skip(length), length))

    def load_binbytes(self):
        (length,) = struct.unpack("<I", self.read(4))
        self._load_payload(length)

    def load_binbytes8(self):
        (length,) = struct.unpack("<Q", self.read(8))
        self._load_payload(length)

    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8
    for _op, _what in _REFUSED_OPCODES.items():
        dispatch[_op[0]] = (lambda what: lambda self: _refuse(f"refused pickle opcode {what}"))(_what)
    del _op, _what


@dataclasses.dataclass(frozen=True)
class ArrayHeader:
    """Shape, dtype and the location of the raw data of one array in a tensor file."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool  # column-major data (the release never writes it)
    data: bytes | _Payload  # inline bytes (small arrays) or a skipped payload

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class LeafHeader:
    """What a tensor file holds, without its data: an array, or a quantized weight."""

    array: ArrayHeader | None  # a plain ndarray leaf
    weight: ArrayHeader | None  # QuantizedWeight8bit.weight
    scales: ArrayHeader | None  # QuantizedWeight8bit.scales
    end: int  # offset just past the STOP opcode

    @property
    def quantized(self) -> bool:
        return self.weight is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.weight or self.array).shape

    def describe(self) -> str:
        """E.g. "QuantizedWeight8bit int8 [8, 64, 344] scales bfloat16 [8, 1, 344]"."""
        if self.quantized:
            return (f"QuantizedWeight8bit {self.weight.dtype} {list(self.weight.shape)} "
                    f"scales {self.scales.dtype} {list(self.scales.shape)}")
        return f"ndarray {self.array.dtype} {list(self.array.shape)}"


def _parse(source: _Source, name: str) -> LeafHeader:
    try:
        result = _RestrictedUnpickler(source).load()
    except _Refused as e:
        raise CheckpointError(f"{name}: {e}") from None
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, MemoryError, RecursionError) as e:
        at_end = source.tell() >= source.size
        reason = "truncated" if at_end or isinstance(e, EOFError) or "truncated" in str(e) else "corrupt"
        detail = f"{type(e).__name__}: {_describe(str(e))}" if str(e) else type(e).__name__
        raise CheckpointError(f"{name}: not a valid tensor file ({reason}: {detail})") from None
    end = source.tell()

    def header(stub: _ArrayStub) -> ArrayHeader:
        return ArrayHeader(stub.shape, stub.dtype, stub.fortran, stub.data)

    if isinstance(result, _ArrayStub) and result.shape is not None:
        leaf = LeafHeader(header(result), None, None, end)
    elif isinstance(result, _QuantizedStub) and result.weight is not None:
        leaf = LeafHeader(None, header(result.weight), header(result.scales), end)
    else:
        raise CheckpointError(f"{name}: the pickle holds {_describe(result)}, not an array "
                              "or a QuantizedWeight8bit")
    if end != source.size:
        raise CheckpointError(f"{name}: {source.size - end} unexpected bytes after the end of the pickle")
    return leaf


def read_header(f: BinaryIO, name: str) -> LeafHeader:
    """Parse a tensor file's structure from a seekable binary file, skipping (not reading) its
    payloads. Costs a few small reads and seeks whatever the file's size."""
    start = f.tell()
    size = f.seek(0, os.SEEK_END)
    f.seek(start)
    return _parse(_file_source(f, size), name)


def parse_header(data: bytes | bytearray | memoryview, name: str) -> LeafHeader:
    """Parse a tensor file held in memory; large payloads are located, not copied."""
    return _parse(_memory_source(memoryview(data).cast("B")), name)


def _aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    """A uint8 buffer whose first byte sits on an `align`-byte boundary (for fast device copies)."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    skip = (-raw.ctypes.data) % align
    return raw[skip:skip + nbytes]


def _build_array(h: ArrayHeader, fill) -> np.ndarray:
    if isinstance(h.data, bytes):
        buf = np.frombuffer(h.data, dtype=np.uint8).copy()
    else:
        buf = _aligned_empty(h.nbytes)
        fill(h.data, buf)
    return buf.view(h.dtype).reshape(h.shape, order="F" if h.fortran else "C")


def build_leaf(header: LeafHeader, fill) -> np.ndarray | QuantizedWeight:
    """Materialise a parsed leaf; `fill(payload, uint8_buffer)` supplies each skipped payload."""
    if header.quantized:
        return QuantizedWeight(weight=_build_array(header.weight, fill),
                               scales=_build_array(header.scales, fill))
    return _build_array(header.array, fill)


def readinto_exactly(f: BinaryIO, view: memoryview, name: str, on_bytes=None,
                     chunk: int = 64 << 20) -> None:
    """Fill `view` from `f` with large sequential reads; a short file is a CheckpointError."""
    done = 0
    total = len(view)
    while done < total:
        n = f.readinto(view[done:done + chunk])
        if not n:
            raise CheckpointError(f"{name}: truncated: expected {total - done} more bytes")
        done += n
        if on_bytes is not None:
            on_bytes(n)


def load_leaf(data: bytes | bytearray | memoryview | BinaryIO, name: str) -> np.ndarray | QuantizedWeight:
    """Unpickle one tensor file safely: a float/int numpy array, or a QuantizedWeight with numpy
    int8 weight and the scales exactly as stored (bfloat16).

    `data` is the file's bytes or a binary file object (seekable files have their payloads read
    straight into the arrays). `name` appears in every error message. Only the release's globals
    are accepted; anything else raises CheckpointError and nothing from the file is executed.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        header = parse_header(view, name)

        def fill(payload: _Payload, out: np.ndarray) -> None:
            out[:] = np.frombuffer(view, dtype=np.uint8, count=payload.length, offset=payload.offset)

        return build_leaf(header, fill)
    if not (hasattr(data, "seekable") and data.seekable()):
        return load_leaf(data.read(), name)
    header = read_header(data, name)
    base = data.tell() - header.end  # payload offsets count from where the pickle starts

    def fill_from_file(payload: _Payload, out: np.ndarray) -> None:
        data.seek(base + payload.offset)
        readinto_exactly(data, memoryview(out), name)

    return build_leaf(header, fill_from_file)


__all__ = ["ArrayHeader", "LeafHeader", "load_leaf", "read_header", "parse_header", "build_leaf",
           "readinto_exactly"]
