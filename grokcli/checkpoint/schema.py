"""A schema parser for the release's tensor files: their one pickle grammar, and nothing else.

Every tensor file of the release is a protocol-4 pickle of one leaf, always the same opcodes in
the same order (only integer widths, frame positions and memo references vary):

    file     := PROTO 4  leaf  STOP  <end of file>
    leaf     := array | quantized
    quantized:= global(__main__ QuantizedWeight8bit) EMPTY_TUPLE NEWOBJ memo?
                EMPTY_DICT memo? MARK str(weight|scales) array str(scales|weight) array SETITEMS BUILD
    array    := global(numpy.core.multiarray _reconstruct)
                [ global(numpy ndarray) (int 0 TUPLE1 memo? | get) bytes(b"b") TUPLE3 memo? ]
                REDUCE memo?  MARK int(1) shape dtype bool payload TUPLE memo? BUILD
    dtype    := get | global(numpy dtype) [ (str(code) | global(ml_dtypes bfloat16)) NEWFALSE
                NEWTRUE TUPLE3 memo? ] REDUCE memo?  MARK int(3) str(byte order) NONE NONE NONE
                int int int TUPLE memo? BUILD
    global   := get | str(module) str(name) STACK_GLOBAL memo?
    shape    := get | EMPTY_TUPLE | int{1,3} TUPLE1..3 memo? | MARK int{1,64} TUPLE memo?
    payload  := (SHORT_BINBYTES | BINBYTES | BINBYTES8) memo? | get      (prod(shape)*itemsize bytes)

`[...]` is an argument tuple, `memo?` an optional MEMOIZE, `get` a BINGET/LONG_BINGET of an earlier
value of the same kind (a string, global, dtype, shape or small bytes; never an array). numpy >= 2
spells the reconstructor `numpy._core.multiarray._reconstruct`; both spellings are accepted.
FRAME opcodes may sit before any opcode outside a frame; an opcode never crosses a frame's end.

The parser reads that grammar with one opcode of lookahead and a fixed call depth: no stack
machine, no object is ever built from the file, nothing from it is hashed, and messages quote
only strings of at most 64 bytes (escaped when not printable). Container sizes
are fixed by the grammar (shapes have at most 64 dimensions), strings hold at most 64 bytes,
the memo at most 64 entries, the structure (everything but payloads) at most 4 KiB, a frame at
most 256 KiB. Payload lengths must equal what shape and dtype need and lie inside the file.
Anything else is a `CheckpointError` of one line naming the file and the byte offset.

Large payloads are not read: the parser records their offset (from the start of the pickle) and
length and seeks past them, so a 300 GB checkpoint's headers are checked in seconds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from typing import BinaryIO

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

# Opcodes of the grammar.
_PROTO, _FRAME, _STOP = 0x80, 0x95, 0x2E
_SHORT_BINUNICODE, _BINUNICODE, _STACK_GLOBAL = 0x8C, 0x58, 0x93
_MEMOIZE, _BINGET, _LONG_BINGET = 0x94, 0x68, 0x6A
_BININT1, _BININT2, _BININT, _LONG1 = 0x4B, 0x4D, 0x4A, 0x8A
_NEWTRUE, _NEWFALSE, _NONE = 0x88, 0x89, 0x4E
_MARK, _TUPLE, _TUPLE1, _TUPLE2, _TUPLE3, _EMPTY_TUPLE = 0x28, 0x74, 0x85, 0x86, 0x87, 0x29
_EMPTY_DICT, _SETITEMS = 0x7D, 0x75
_REDUCE, _NEWOBJ, _BUILD = 0x52, 0x81, 0x62
_SHORT_BINBYTES, _BINBYTES, _BINBYTES8 = 0x43, 0x42, 0x8E
# Opcodes that name, call or build objects, or reach outside the pickle: out of place, they are
# refused as unsafe rather than merely unexpected.
_CODE_OPCODES = {0x63, 0x93, 0x52, 0x62, 0x69, 0x6F, 0x81, 0x92, 0x50, 0x51, 0x82, 0x83, 0x84}
_INTS = (_BININT1, _BININT2, _BININT, _LONG1)
_SMALL_TUPLES = {_TUPLE1: 1, _TUPLE2: 2, _TUPLE3: 3}

# Bounds. The release's largest header is ~360 bytes with ~40 memo entries.
MAX_STRUCTURE_BYTES = 4096
MAX_FRAME_BYTES = 256 << 10  # the pickler's frames stay under 128 KiB
MAX_MEMO = 64
MAX_STR = 64
MAX_NDIM = 64  # numpy's own limit

# Payloads at least this large that sit outside a frame (the pickler puts every payload of
# 64 KiB or more there) are skipped, not read, when parsing a file.
_SKIP_THRESHOLD = 4096

_RECONSTRUCT = "numpy _reconstruct"
_NDARRAY = "numpy.ndarray"
_DTYPE = "numpy.dtype"
_BFLOAT16 = "ml_dtypes.bfloat16"
_QW8 = "QuantizedWeight8bit"
# The only globals the release's streams name, by (module, name).
_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("ml_dtypes", "bfloat16"): _BFLOAT16,
    ("__main__", "QuantizedWeight8bit"): _QW8,
}

# What the parts of an array are, for messages.
_RARGS = "the arguments of numpy _reconstruct (ndarray, (0,), b'b')"
_ASTATE = "the ndarray state (1, shape, dtype, is_fortran, data)"
_FORTRAN = "the is_fortran flag (" + _ASTATE + ")"
_DARGS = "the arguments of numpy.dtype (code, False, True)"
_DSTATE = "the dtype state (3, byte order, None, None, None, elsize, alignment, flags)"
_BYTE_ORDER = "the byte order (" + _DSTATE + ")"

# Fixed stretches of the grammar as the pickler writes them, with the memo entries they make:
# `_Parser.run` consumes one in a step when it comes next (a shortcut; the productions accept
# the same bytes). After numpy.ndarray: (0,) b'b' TUPLE3 REDUCE MARK 1.
_ARRAY_HEAD = b"K\x00\x85\x94C\x01b\x94\x87\x94R\x94(K\x01"
_ARRAY_HEAD_MEMO = (("shape", (0,)), ("bytes", b"b"), ("object", None), ("object", None))
# After the dtype code: False True TUPLE3 REDUCE MARK 3.
_DTYPE_MID = b"\x89\x88\x87\x94R\x94(K\x03"
# After the byte order: None None None, elsize alignment flags (-1, -1, 0 for numpy's own types,
# 2, 2, 64 for bfloat16), TUPLE BUILD.
_DTYPE_TAIL_PLAIN = b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b"
_DTYPE_TAIL_USER = b"NNNK\x02K\x02K@t\x94b"
_OBJECT_MEMO = (("object", None),)

# numpy dtype codes a leaf may carry: plain numbers only (never "O" objects, records or
# strings). Anything but f4 / i1 / bf16 is refused later with a message naming the parameter.
_DTYPE_CODES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"}
_BF16 = np.dtype(ml_dtypes.bfloat16)


class Payload:
    """A byte payload the parser located but did not read: `length` bytes at `offset`."""

    __slots__ = ("offset", "length")

    def __init__(self, offset: int, length: int):
        self.offset, self.length = offset, length

    def __eq__(self, other):
        return isinstance(other, Payload) and (self.offset, self.length) == (other.offset, other.length)

    def __hash__(self):
        return hash((self.offset, self.length))

    def __repr__(self):
        return f"<{self.length}-byte payload at offset {self.offset}>"


@dataclasses.dataclass(frozen=True)
class ArrayHeader:
    """Shape, dtype and the location of the raw data of one array in a tensor file."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool  # column-major data (the release never writes it)
    data: bytes | Payload  # inline bytes (small arrays read from a file) or a located payload

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


class _Reject(Exception):
    """A grammar violation: the message already says where."""


def _text(s: str) -> str:
    """A string from the file, safe to print on one line (it is at most MAX_STR bytes)."""
    return s if s.isascii() and s.isprintable() else repr(s)


def _opname(code: int) -> str:
    import pickletools  # only on the error path

    for op in pickletools.opcodes:
        if op.code == chr(code):
            return f"pickle opcode {op.name}"
    return f"byte 0x{code:02x} (not a pickle opcode)"


class _Cursor:
    """Reads the stream's bytes; knows the file size, the current frame and the structure budget.

    Reads inside `window` up to `limit` take the fast path (a slice); everything else (entering or
    leaving a frame, reading a file outside a frame, every error) goes through the slow path.
    """

    def __init__(self, size: int):
        self.size = size  # bytes from the start of the pickle to the end of the file
        self.pos = 0
        self.frame_end = -1  # end offset of the current frame; <= pos when outside one
        self.structure = 0
        self.window: bytes | memoryview = b""  # bytes readable without I/O, from offset wbase
        self.wbase = 0
        self.limit = -1  # fast reads must end at or before this offset

    # Backends supply these.
    def _outside_limit(self) -> int: ...
    def _read(self, n: int) -> bytes: ...
    def _frame(self, n: int) -> None: ...
    def _payload(self, n: int, in_frame: bool): ...

    def take(self, n: int, what: str) -> bytes | memoryview:
        """n bytes of structure (an opcode's argument)."""
        start = self.pos
        end = start + n
        if end > self.limit:
            return self._take_slow(n, what)
        self.pos = end
        self.structure += n
        if self.structure > MAX_STRUCTURE_BYTES:
            self._too_much(start)
        return self.window[start - self.wbase:end - self.wbase]

    def _too_much(self, at: int):
        raise _Reject(f"more than {MAX_STRUCTURE_BYTES} bytes of pickle structure, far more than "
                      f"a tensor file has (at byte {at})")

    def _take_slow(self, n: int, what: str):
        start = self.pos
        if start == self.frame_end:  # the frame is used up: reading goes on outside it
            self.frame_end = -1
            self.limit = self._outside_limit()
            if start + n <= self.limit:
                return self.take(n, what)
        if start < self.frame_end:
            raise _Reject(f"{what} crosses the end of its pickle frame at byte {self.frame_end}")
        if start + n > self.size:
            where = f"before {what}" if start >= self.size else f"inside {what} at byte {start}"
            raise _Reject(f"truncated: the file ends at byte {self.size}, {where}")
        self.structure += n
        if self.structure > MAX_STRUCTURE_BYTES:
            self._too_much(start)
        data = self._read(n)
        self.pos += n
        return data

    def opcode(self) -> tuple[int, int]:
        """The next opcode and its offset; FRAME opcodes outside a frame are consumed here."""
        at = self.pos
        if at < self.limit:
            code = self.window[at - self.wbase]
            if code != _FRAME:
                self.pos = at + 1
                self.structure += 1
                if self.structure > MAX_STRUCTURE_BYTES:
                    self._too_much(at)
                return code, at
        while True:
            at = self.pos
            code = self.take(1, "an opcode")[0]
            if code != _FRAME:
                return code, at
            if at < self.frame_end:
                raise _Reject(f"a FRAME inside a pickle frame at byte {at}")
            (n,) = struct.unpack("<Q", self.take(8, "a FRAME length"))
            if not 0 < n <= MAX_FRAME_BYTES:
                raise _Reject(f"a pickle frame of {n} bytes (at most {MAX_FRAME_BYTES}) at byte {at}")
            if self.pos + n > self.size:
                raise _Reject(f"truncated: a {n}-byte pickle frame at byte {at} runs past the end of "
                              f"the file ({self.size} bytes)")
            self._frame(n)
            self.frame_end = self.limit = self.pos + n

    def payload(self, n: int, at: int) -> bytes | Payload:
        """The n data bytes that follow; read or located, depending on the backend."""
        start = self.pos
        in_frame = start < self.frame_end
        if in_frame and start + n > self.frame_end:
            raise _Reject(f"a {n}-byte payload at byte {at} crosses the end of its pickle frame")
        if start + n > self.size:
            raise _Reject(f"truncated: a {n}-byte payload at byte {at} runs past the end of the "
                          f"file ({self.size} bytes)")
        if not in_frame and self.frame_end >= 0:
            self.frame_end = -1
            self.limit = self._outside_limit()
        data = self._payload(n, in_frame)
        self.pos += n
        return data


class _MemoryCursor(_Cursor):
    """Over bytes in memory: nothing is copied, payloads are located in place."""

    def __init__(self, data: bytes | bytearray | memoryview):
        super().__init__(len(data))
        self.window = data
        self.limit = self.size

    def _outside_limit(self):
        return self.size

    def _read(self, n):
        raise AssertionError("unreachable: the whole buffer is the window")

    def _frame(self, n):
        pass

    def _payload(self, n, in_frame):
        return Payload(self.pos, n)


class _FileCursor(_Cursor):
    """Over a seekable file: frames are read whole (one read each), large payloads are skipped."""

    def __init__(self, f: BinaryIO, size: int):
        super().__init__(size)
        self.f = f

    def _outside_limit(self):
        return -1  # every read outside a frame is a read of the file

    def _read(self, n):
        data = self.f.read(n)
        if len(data) != n:  # the file shrank under us
            raise _Reject(f"truncated: the file ends inside byte range {self.pos}-{self.pos + n}")
        return data

    def _frame(self, n):
        self.window, self.wbase = self._read(n), self.pos

    def _payload(self, n, in_frame):
        if in_frame:
            lo = self.pos - self.wbase
            return self.window[lo:lo + n]
        if n < _SKIP_THRESHOLD:
            return self._read(n)
        self.f.seek(n, os.SEEK_CUR)
        return Payload(self.pos, n)


class _Parser:
    """The grammar in the module docstring, one production per method."""

    def __init__(self, cur: _Cursor):
        self.cur = cur
        self.memo: list[tuple[str, object]] = []  # (kind, value)
        self.ahead: tuple[int, int, tuple | None] | None = None
        self.ref: tuple | None = None

    # -- opcodes -------------------------------------------------------------------------------

    def _fetch(self) -> tuple[int, int, tuple | None]:
        """The next opcode; a BINGET/LONG_BINGET comes back as BINGET with its memo entry."""
        cur = self.cur
        at = cur.pos
        if at < cur.limit and cur.window[at - cur.wbase] != _FRAME:  # the common case, inlined
            code = cur.window[at - cur.wbase]
            cur.pos = at + 1
            cur.structure += 1
            if cur.structure > MAX_STRUCTURE_BYTES:
                cur._too_much(at)
        else:
            code, at = cur.opcode()
        if code != _BINGET and code != _LONG_BINGET:
            return code, at, None
        raw = cur.take(1 if code == _BINGET else 4, "a memo index")
        i = raw[0] if code == _BINGET else struct.unpack("<I", raw)[0]
        if i >= len(self.memo):
            raise _Reject(f"memo index {i} is not defined at byte {at}")
        return _BINGET, at, self.memo[i]

    def accept(self, code: int) -> int:
        """Consume the next opcode if it is `code` (never BINGET or FRAME): its offset, else -1."""
        cur = self.cur
        at = cur.pos
        if self.ahead is None and at < cur.limit:
            got = cur.window[at - cur.wbase]
            if got == code:
                cur.pos = at + 1
                cur.structure += 1
                if cur.structure > MAX_STRUCTURE_BYTES:
                    cur._too_much(at)
                return at
            if got != _FRAME:
                return -1
        if self.peek() == code:
            at, self.ahead = self.ahead[1], None
            return at
        return -1

    def next(self) -> tuple[int, int]:
        op = self.ahead
        if op is None:
            cur = self.cur
            at = cur.pos
            if at < cur.limit:  # the common case of _fetch, inlined
                code = cur.window[at - cur.wbase]
                if code != _FRAME and code != _BINGET and code != _LONG_BINGET:
                    cur.pos = at + 1
                    cur.structure += 1
                    if cur.structure > MAX_STRUCTURE_BYTES:
                        cur._too_much(at)
                    self.ref = None
                    return code, at
            op = self._fetch()
        else:
            self.ahead = None
            if op[0] < 0:  # peeked past a problem: it is reported when reached, not before
                raise op[2]
        self.ref = op[2]  # the memo entry of a BINGET
        return op[0], op[1]

    def peek(self) -> int:
        if self.ahead is None:
            at = self.cur.pos
            try:
                self.ahead = self._fetch()
            except _Reject as e:
                self.ahead = (-1, at, e)
        return self.ahead[0]

    def push_back(self, code: int, at: int) -> None:
        self.ahead = (code, at, self.ref)

    def peek_get(self, kind: str) -> bool:
        """Whether the next opcode is a BINGET of a memo entry of `kind`."""
        return self.peek() == _BINGET and self.ahead[2][0] == kind

    @staticmethod
    def unexpected(code: int, at: int, expected: str):
        # "refused" marks what could call or build objects (verify reports it as unsafe).
        verdict = "refused" if code in _CODE_OPCODES else "unexpected"
        return _Reject(f"{verdict} {_opname(code)} at byte {at}: expected {expected}")

    def expect(self, code: int, expected: str, context: str = "") -> int:
        at = self.accept(code)
        if at < 0:
            got, at = self.next()
            raise self.unexpected(got, at, f"{expected} ({context})" if context else expected)
        return at

    def run(self, lit: bytes, memo: tuple) -> bool:
        """Consume `lit`, a fixed stretch of opcodes the grammar allows here, if it comes next
        inside the window, adding `memo` (the entries its MEMOIZEs make); else consume nothing.
        Only a shortcut: the productions parse the same bytes to the same result."""
        cur = self.cur
        ahead = self.ahead
        if ahead is not None and ahead[0] >= 0 and ahead[2] is None and ahead[1] < cur.limit:
            # Put back a plain opcode peeked from the window (a FRAME before it stays consumed).
            cur.pos, self.ahead = ahead[1], None
            cur.structure -= 1
        at = cur.pos
        n = len(lit)
        if (self.ahead is not None or at + n > cur.limit or cur.structure + n > MAX_STRUCTURE_BYTES
                or len(self.memo) + len(memo) > MAX_MEMO):
            return False
        lo = at - cur.wbase
        if cur.window[lo:lo + n] != lit:
            return False
        cur.pos = at + n
        cur.structure += n
        self.memo.extend(memo)
        return True

    def memoize(self, kind: str, value=None) -> None:
        """An optional MEMOIZE of the value just produced."""
        at = self.accept(_MEMOIZE)
        if at < 0:
            return
        if len(self.memo) >= MAX_MEMO:
            raise _Reject(f"more than {MAX_MEMO} memo entries at byte {at}")
        self.memo.append((kind, value))

    def get(self, at: int, kind: str, expected: str):
        """The value of the BINGET just read; its memo entry must be of `kind`."""
        got_kind, value = self.ref
        if got_kind != kind:
            raise _Reject(f"a memo reference at byte {at} is not {expected}")
        return value

    # -- values --------------------------------------------------------------------------------

    def int_(self, expected: str) -> tuple[int, int]:
        code, at = self.next()
        if code == _BININT1:
            return self.cur.take(1, "an int")[0], at
        if code == _BININT2:
            return struct.unpack("<H", self.cur.take(2, "an int"))[0], at
        if code == _BININT:
            return struct.unpack("<i", self.cur.take(4, "an int"))[0], at
        if code == _LONG1:
            n = self.cur.take(1, "an int length")[0]
            if n > 8:
                raise _Reject(f"a {n}-byte integer at byte {at}: expected {expected} (at most 8 bytes)")
            return int.from_bytes(self.cur.take(n, "an int"), "little", signed=True), at
        raise self.unexpected(code, at, expected)

    def exact_int(self, value: int, expected: str) -> None:
        got, at = self.int_(expected)
        if got != value:
            raise _Reject(f"{expected} is {got}, expected {value}, at byte {at}")

    def str_(self, expected: str) -> tuple[str, int]:
        cur = self.cur
        at = cur.pos
        if self.ahead is None and at + 1 < cur.limit and cur.window[at - cur.wbase] == _SHORT_BINUNICODE:
            # The common case, inlined: SHORT_BINUNICODE and its text inside the window.
            lo = at - cur.wbase + 2
            n = cur.window[lo - 1]
            if n <= MAX_STR and at + 2 + n <= cur.limit:
                cur.pos = at + 2 + n
                cur.structure += 2 + n
                if cur.structure > MAX_STRUCTURE_BYTES:
                    cur._too_much(at)
                try:
                    s = str(cur.window[lo:lo + n], "utf-8")
                except UnicodeDecodeError:
                    raise _Reject(f"a string that is not UTF-8 at byte {at}: expected {expected}") from None
                self.memoize("str", s)
                return s, at
        code, at = self.next()
        if code == _BINGET:
            return self.get(at, "str", expected), at
        if code == _SHORT_BINUNICODE:
            n = self.cur.take(1, "a string length")[0]
        elif code == _BINUNICODE:
            (n,) = struct.unpack("<I", self.cur.take(4, "a string length"))
        else:
            raise self.unexpected(code, at, expected)
        if n > MAX_STR:
            raise _Reject(f"a {n}-byte string at byte {at}: expected {expected} (at most {MAX_STR} bytes)")
        try:
            s = str(self.cur.take(n, "a string"), "utf-8")
        except UnicodeDecodeError:
            raise _Reject(f"a string that is not UTF-8 at byte {at}: expected {expected}") from None
        self.memoize("str", s)
        return s, at

    def global_(self, expected: str) -> tuple[str, int]:
        """One of the allowed globals; any other is refused by name."""
        if self.peek_get("global"):
            _, at = self.next()
            return self.ref[1], at
        module, at = self.str_(expected)
        return self.global_after_module(module, at)

    def global_after_module(self, module: str, at: int) -> tuple[str, int]:
        name, _ = self.str_("the name of a global")
        self.expect(_STACK_GLOBAL, "STACK_GLOBAL")
        kind = _GLOBALS.get((module, name))
        if kind is None:
            raise _Reject(f"refused pickle global {_text(module)}.{_text(name)} at byte {at}: "
                          "a tensor file names only numpy's array globals and QuantizedWeight8bit")
        self.memoize("global", kind)
        return kind, at

    def the_global(self, kind: str, expected: str) -> None:
        got, at = self.global_(expected)
        if got != kind:
            raise _Reject(f"unexpected {got} at byte {at}: expected {expected}")

    def bool_(self, expected: str) -> bool:
        code, at = self.next()
        if code in (_NEWTRUE, _NEWFALSE):
            return code == _NEWTRUE
        raise self.unexpected(code, at, expected)

    # -- the productions -----------------------------------------------------------------------

    def leaf(self) -> LeafHeader:
        at = self.expect(_PROTO, "PROTO 4 (a protocol-4 pickle, as the release's tensor files are)")
        proto = self.cur.take(1, "the protocol")[0]
        if proto != 4:
            raise _Reject(f"a protocol-{proto} pickle at byte {at}: the release's tensor files are protocol 4")
        kind, at = self.global_("numpy _reconstruct or QuantizedWeight8bit")
        if kind == _RECONSTRUCT:
            parts = (self.array_after_global(), None, None)
        elif kind == _QW8:
            weight, scales = self.quantized_after_global()
            parts = (None, weight, scales)
        else:
            raise _Reject(f"the pickle starts with {kind} at byte {at}: a tensor file holds one "
                          "ndarray or one QuantizedWeight8bit")
        self.expect(_STOP, "STOP (the end of the pickle)")
        end = self.cur.pos
        if end != self.cur.size:
            raise _Reject(f"{self.cur.size - end} unexpected bytes after the end of the pickle at byte {end}")
        return LeafHeader(*parts, end)

    def quantized_after_global(self) -> tuple[ArrayHeader, ArrayHeader]:
        what = "QuantizedWeight8bit()"
        self.expect(_EMPTY_TUPLE, 'EMPTY_TUPLE (QuantizedWeight8bit() takes no arguments)')
        self.expect(_NEWOBJ, 'NEWOBJ (QuantizedWeight8bit())')
        self.memoize("object")
        self.expect(_EMPTY_DICT, "EMPTY_DICT (the QuantizedWeight8bit state {'weight', 'scales'})")
        self.memoize("object")
        self.expect(_MARK, "MARK (the two QuantizedWeight8bit state items)")
        found: dict[str, ArrayHeader] = {}
        for _ in range(2):
            key, at = self.str_("'weight' or 'scales'")
            if key not in ("weight", "scales") or key in found:
                raise _Reject(f"unexpected QuantizedWeight8bit state key {_text(key)} at byte {at}: "
                              "expected 'weight' and 'scales', once each")
            self.the_global(_RECONSTRUCT, f"numpy _reconstruct (the {key} array)")
            found[key] = self.array_after_global()
        self.expect(_SETITEMS, "SETITEMS (QuantizedWeight8bit has exactly 'weight' and 'scales')")
        self.expect(_BUILD, "BUILD (the QuantizedWeight8bit state)")
        return found["weight"], found["scales"]

    def array_after_global(self) -> ArrayHeader:
        self.the_global(_NDARRAY, "numpy.ndarray (" + _RARGS + ")")
        if not self.run(_ARRAY_HEAD, _ARRAY_HEAD_MEMO):
            self.reconstruct_args_and_version()
        shape, shape_at = self.shape()
        dtype = self.dtype()
        fortran = self.bool_(_FORTRAN)
        nbytes = math.prod(shape) * dtype.itemsize
        data = self.data(nbytes, shape, dtype, shape_at)
        self.expect(_TUPLE, "TUPLE", _ASTATE)
        self.memoize("object")
        self.expect(_BUILD, "BUILD", _ASTATE)
        return ArrayHeader(shape, dtype, fortran, data)

    def reconstruct_args_and_version(self) -> None:
        """(0,), b'b', TUPLE3, REDUCE and the ndarray state up to its version (_ARRAY_HEAD)."""
        code, at = self.next()
        if code == _BINGET:
            zero = self.get(at, "shape", _RARGS)
        else:
            self.push_back(code, at)
            zero = (self.int_(_RARGS)[0],)
            self.expect(_TUPLE1, "TUPLE1", _RARGS)
            self.memoize("shape", zero)
        if zero != (0,):
            raise _Reject(f"unexpected arguments to numpy _reconstruct at byte {at}: expected {_RARGS}")
        code, at = self.next()
        if code == _BINGET:
            b = self.get(at, "bytes", _RARGS)
        elif code == _SHORT_BINBYTES:
            n = self.cur.take(1, "a bytes length")[0]
            b = bytes(self.cur.take(n, "bytes")) if n <= MAX_STR else None
            self.memoize("bytes", b)
        else:
            raise self.unexpected(code, at, f"b'b' ({_RARGS})")
        if b != b"b":
            raise _Reject(f"unexpected arguments to numpy _reconstruct at byte {at}: expected {_RARGS}")
        self.expect(_TUPLE3, "TUPLE3", _RARGS)
        self.memoize("object")
        self.expect(_REDUCE, "REDUCE (numpy _reconstruct)")
        self.memoize("object")
        self.expect(_MARK, "MARK", _ASTATE)
        self.exact_int(1, "the ndarray state version")

    def shape(self) -> tuple[tuple[int, ...], int]:
        what = "an array shape (a tuple of dimensions)"
        code, at = self.next()
        if code == _BINGET:
            return self.get(at, "shape", what), at
        dims = []
        if code == _EMPTY_TUPLE:
            return (), at
        if code == _MARK:
            while self.peek() != _TUPLE:
                if len(dims) == MAX_NDIM:
                    raise _Reject(f"an array shape of more than {MAX_NDIM} dimensions at byte {at}")
                dims.append(self.dim(what))
            self.next()
        elif code in _INTS:
            self.push_back(code, at)
            while self.peek() in _INTS and len(dims) < 3:
                dims.append(self.dim(what))
            code, tuple_at = self.next()
            if _SMALL_TUPLES.get(code) != len(dims):
                raise self.unexpected(code, tuple_at, f"TUPLE{len(dims)} (the end of {what})")
        else:
            raise self.unexpected(code, at, what)
        shape = tuple(dims)
        self.memoize("shape", shape)
        return shape, at

    def dim(self, what: str) -> int:
        n, at = self.int_(what)
        if n < 0:
            raise _Reject(f"a negative array dimension {n} at byte {at}")
        return n

    def dtype(self) -> np.dtype:
        what = "an array dtype (numpy.dtype)"
        if self.peek_get("dtype"):
            self.next()
            return self.ref[1]
        self.the_global(_DTYPE, what)
        if self.peek_get("global"):
            kind, at = self.global_(_DARGS)
        else:
            # A code string, or the module of a global (ml_dtypes.bfloat16): a string follows.
            code_str, at = self.str_(_DARGS)
            kind = None
            if self.peek() in (_SHORT_BINUNICODE, _BINUNICODE) or self.peek_get("str"):
                kind, at = self.global_after_module(code_str, at)
        if kind is None:
            if code_str not in _DTYPE_CODES:
                raise _Reject(f"unsupported dtype {_text(repr(code_str))} at byte {at}: a tensor holds "
                              "plain numbers (float32, int8, bfloat16)")
            dtype = np.dtype(code_str)
        elif kind == _BFLOAT16:
            dtype = _BF16
        else:
            raise _Reject(f"unsupported dtype {kind} at byte {at}")
        if not self.run(_DTYPE_MID, (("object", None), ("dtype", dtype))):
            self.dtype_args_and_version(dtype)
        order, at = self.str_(_BYTE_ORDER)
        if order not in ("<", "|", "="):
            raise _Reject(f"unsupported byte order {_text(order)} for {dtype} at byte {at}: "
                          "expected little-endian")
        if not (self.run(_DTYPE_TAIL_PLAIN, _OBJECT_MEMO) or self.run(_DTYPE_TAIL_USER, _OBJECT_MEMO)):
            self.dtype_state_tail()
        return dtype

    def dtype_args_and_version(self, dtype: np.dtype) -> None:
        """False, True, TUPLE3, REDUCE and the dtype state up to its version (_DTYPE_MID)."""
        self.peek()
        flags_at = self.ahead[1]
        align, copy = self.bool_(_DARGS), self.bool_(_DARGS)
        if align or not copy:
            raise _Reject(f"unexpected arguments to numpy.dtype at byte {flags_at}: expected {_DARGS}")
        self.expect(_TUPLE3, "TUPLE3", _DARGS)
        self.memoize("object")
        self.expect(_REDUCE, "REDUCE (numpy.dtype)")
        self.memoize("dtype", dtype)
        self.expect(_MARK, "MARK", _DSTATE)
        self.exact_int(3, "the dtype state version")

    def dtype_state_tail(self) -> None:
        """The dtype state after its byte order (_DTYPE_TAIL_PLAIN / _DTYPE_TAIL_USER)."""
        for _ in range(3):
            code, at = self.next()
            if code != _NONE:
                raise _Reject(f"unexpected {_opname(code)} at byte {at}: structured dtypes (subarrays, "
                              "fields) are not part of the checkpoint format")
        for field, lo, hi in (("the dtype elsize", -1, 64), ("the dtype alignment", -1, 64),
                              ("the dtype flags", 0, 0xFFFF)):
            n, at = self.int_(field)
            if not lo <= n <= hi:
                raise _Reject(f"{field} {n} at byte {at}: expected {lo}..{hi}")
        self.expect(_TUPLE, "TUPLE", _DSTATE)
        self.memoize("object")
        self.expect(_BUILD, "BUILD", _DSTATE)

    def data(self, nbytes: int, shape: tuple[int, ...], dtype: np.dtype, shape_at: int):
        what = "the array data (bytes)"
        code, at = self.next()
        if code == _BINGET:
            data = self.get(at, "bytes", what)
            if not isinstance(data, bytes):
                raise _Reject(f"memo entry at byte {at} is not {what}")
            n = len(data)
        elif code in (_SHORT_BINBYTES, _BINBYTES, _BINBYTES8):
            width = {_SHORT_BINBYTES: 1, _BINBYTES: 4, _BINBYTES8: 8}[code]
            n = int.from_bytes(self.cur.take(width, "a bytes length"), "little")
            data = None
        else:
            raise self.unexpected(code, at, what)
        if n != nbytes:
            need = f"{nbytes} bytes" if nbytes <= self.cur.size else f"more than the file's {self.cur.size} bytes"
            dims = ", ".join(map(str, shape))
            if len(dims) > 80:
                dims = dims[:80] + "..."
            raise _Reject(f"array [{dims}] {dtype} (shape at byte {shape_at}) needs {need} of data, "
                          f"the payload at byte {at} has {n}")
        if data is None:
            data = self.cur.payload(n, at)
            self.memoize("bytes", data if isinstance(data, bytes) and n <= MAX_STR else None)
        return data


def _parse(cur: _Cursor, name: str) -> LeafHeader:
    try:
        return _Parser(cur).leaf()
    except _Reject as e:
        raise CheckpointError(f"{name}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror or e}) at byte {cur.pos}") from None


def read_header(f: BinaryIO, name: str) -> LeafHeader:
    """Parse a tensor file's structure from a seekable binary file, skipping (not reading) its
    large payloads. Costs a few small reads and seeks whatever the file's size."""
    start = f.tell()
    size = f.seek(0, os.SEEK_END)
    f.seek(start)
    return _parse(_FileCursor(f, size - start), name)


def parse_header(data: bytes | bytearray | memoryview, name: str) -> LeafHeader:
    """Parse a tensor file held in memory; payloads are located, not copied."""
    if not isinstance(data, (bytes, bytearray)):
        data = memoryview(data).cast("B")
    return _parse(_MemoryCursor(data), name)
