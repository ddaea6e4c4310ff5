"""Random mutations of real tensor files never crash, hang or mislead the schema parser.

Seeded mutations (bit flips, truncations, insertions, deletions, opcode swaps, duplicated
ranges) of the official tiny-b files and of the bundled demo model's files. Each mutant must
either raise CheckpointError with one line naming the file, or parse into a header that an
independent oracle confirms: pickletools walks the same opcodes to STOP at the end of the file,
and the payloads the parser located are exactly the bytes pickletools finds. The bytes parser
and the file parser must agree on every mutant.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grokcli.checkpoint.schema import Payload, parse_header, read_header
from grokcli.errors import CheckpointError
from grokcli.paths import demo_model_dir

SEED = 18
OPCODES = sorted({op.code.encode("latin-1")[0] for op in pickletools.opcodes})
NAME = "tensor00042_000"


def _demo_files() -> list[bytes]:
    return [p.read_bytes() for p in sorted((demo_model_dir() / "ckpt-0").iterdir())]


def _with_unframed(files: list[bytes]) -> list[bytes]:
    """The files and the same files without FRAME opcodes (valid too), where an insertion or a
    deletion reaches the grammar instead of breaking a frame's length."""
    out = []
    for data in files:
        frames = [pos for op, _, pos in pickletools.genops(data) if op.name == "FRAME"]
        plain = b"".join(data[a + 9:b] for a, b in zip(frames, frames[1:] + [len(data)]))
        out += [data, data[:frames[0]] + plain] if frames else [data]
    return out


def _structure_offsets(data: bytes) -> list[int]:
    """Offsets of the opcodes, where mutations matter most (payload bytes are just data)."""
    return [pos for _, _, pos in pickletools.genops(data)]


def _mutate(rng: random.Random, data: bytes, offsets: list[int]) -> bytes:
    b = bytearray(data)

    def where() -> int:
        if rng.random() < 0.8:  # near an opcode
            return min(len(b) - 1, max(0, rng.choice(offsets) + rng.randint(-2, 9)))
        return rng.randrange(len(b))

    frames = [i for i in offsets if data[i] == pickle.FRAME[0]]
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.randrange(7 if frames else 6)
        i = where()
        if kind == 0:  # flip bits
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            del b[i:]
        elif kind == 2:  # insert random bytes
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 3:  # delete a few bytes
            del b[i:i + rng.randint(1, 16)]
        elif kind == 4:  # swap the opcode for another
            b[min(len(b) - 1, rng.choice(offsets))] = rng.choice(OPCODES)
        elif kind == 5:  # duplicate a stretch of structure
            j = rng.choice(offsets)
            b[j:j] = b[j:j + rng.randint(1, 32)]
        else:  # move a frame's end
            j = rng.choice(frames) + 1
            n = max(0, int.from_bytes(data[j:j + 8], "little") + rng.randint(-12, 12))
            b[j:j + 8] = n.to_bytes(8, "little")
        if not b:
            break
    return bytes(b)


def _payload_bytes(data: bytes, h) -> bytes:
    if isinstance(h.data, Payload):
        return data[h.data.offset:h.data.offset + h.data.length]
    return h.data


def _check(data: bytes) -> str:
    """Parse one mutant both ways; return 'refused' or 'parsed' after checking the outcome."""
    try:
        header = parse_header(data, NAME)
    except CheckpointError as e:
        msg = str(e)
        assert msg.startswith(NAME + ": ") and "\n" not in msg and len(msg) < 400, msg
        with pytest.raises(CheckpointError) as again:
            read_header(io.BytesIO(data), NAME)
        assert str(again.value) == msg
        return "refused"
    # Accepted: an independent walk of the opcodes must agree on where the data is.
    ops = list(pickletools.genops(data))
    assert ops[-1][0].name == "STOP" and header.end == len(data)
    found = [arg for op, arg, _ in ops if op.name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8")
             and arg != b"b"]
    arrays = [header.weight, header.scales] if header.quantized else [header.array]
    got = [_payload_bytes(data, h) for h in arrays]
    assert all(len(g) == h.nbytes for g, h in zip(got, arrays))
    assert [g for g in got if g != b"b"] == found
    from_file = read_header(io.BytesIO(data), NAME)
    assert [(h.shape, h.dtype, h.fortran) for h in arrays] == [
        (h.shape, h.dtype, h.fortran) for h in ([from_file.weight, from_file.scales]
                                                if from_file.quantized else [from_file.array])]
    return "parsed"


def _fuzz(files: list[bytes], n: int, seed: int) -> dict:
    rng = random.Random(seed)
    offsets = [_structure_offsets(f) for f in files]
    outcomes = {"refused": 0, "parsed": 0}
    slowest = 0.0
    start = time.perf_counter()
    for _ in range(n):
        k = rng.randrange(len(files))
        mutant = _mutate(rng, files[k], offsets[k])
        t = time.perf_counter()
        outcomes[_check(mutant)] += 1
        slowest = max(slowest, time.perf_counter() - t)
    outcomes["seconds"] = time.perf_counter() - start
    outcomes["slowest"] = slowest
    return outcomes


def test_fuzz_official_tiny_b_files(shared_dir):
    ckpt = shared_dir / "fixtures" / "tiny-b" / "ckpt-0"
    if not ckpt.is_dir():
        pytest.skip(f"official fixture tiny-b not found at {ckpt}")
    files = _with_unframed([p.read_bytes() for p in sorted(ckpt.iterdir())])
    for f in files:  # the originals parse
        assert _check(f) == "parsed"
    result = _fuzz(files, 2500, SEED)
    assert result["refused"] + result["parsed"] == 2500
    assert result["refused"] > 1500  # the mutations mostly hit the structure
    assert result["slowest"] < 1.0 and result["seconds"] < 20, result


def test_fuzz_bundled_demo_files():
    files = _with_unframed(_demo_files())
    for f in files:
        assert _check(f) == "parsed"
    result = _fuzz(files, 1500, SEED + 1)
    assert result["refused"] > 900
    assert result["slowest"] < 1.0 and result["seconds"] < 15, result


# A demo file with a frame, a quantized one and a plain one, for splicing arbitrary bytes in.
_SPLICE_SOURCES = [f for f in _demo_files() if len(f) < 40_000][:3]


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(which=st.integers(0, len(_SPLICE_SOURCES) - 1), at=st.integers(0, 600),
       cut=st.integers(0, 8), junk=st.binary(max_size=64) | st.sampled_from(
           [pickle.MARK * 64, pickle.EMPTY_TUPLE + pickle.TUPLE1 * 64, pickle.BINGET + b"\xff",
            pickle.LONG1 + b"\xff", pickle.FRAME + bytes(8), pickle.MEMOIZE * 70]))
def test_spliced_bytes_never_escape_as_other_errors(which, at, cut, junk):
    data = _SPLICE_SOURCES[which]
    at = min(at, len(data))
    _check(data[:at] + junk + data[at + cut:])


def _outcome(data: bytes):
    try:
        h = parse_header(data, NAME)
    except CheckpointError as e:
        return str(e)
    return h


def test_shortcuts_parse_exactly_like_the_productions(monkeypatch):
    """`_Parser.run` (fixed stretches consumed in one step) changes no outcome on any mutant."""
    from grokcli.checkpoint import schema

    files = _with_unframed(_demo_files())
    offsets = [_structure_offsets(f) for f in files]
    rng = random.Random(SEED + 2)
    mutants = []
    for _ in range(1000):
        k = rng.randrange(len(files))
        mutants.append(_mutate(rng, files[k], offsets[k]))
    mutants += files
    fast = [_outcome(m) for m in mutants]
    monkeypatch.setattr(schema._Parser, "run", lambda self, lit, memo: False)
    slow = [_outcome(m) for m in mutants]
    assert fast == slow
