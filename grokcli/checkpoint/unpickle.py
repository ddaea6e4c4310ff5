"""Read the release's tensor files safely: parse their one pickle grammar, then build the arrays.

`schema` parses a file's structure against the release's exact opcode sequence (no pickle
machine, no object from the file is ever built or called) and locates each payload; this module
turns a parsed header into numpy arrays, reading every payload once, straight into its final
64-byte aligned buffer.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from ..errors import CheckpointError
from ..quant import QuantizedWeight
from .schema import ArrayHeader, LeafHeader, Payload as _Payload, parse_header, read_header


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
        header = parse_header(data if isinstance(data, (bytes, bytearray)) else view, name)

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
