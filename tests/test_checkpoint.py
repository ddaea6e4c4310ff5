"""The release's checkpoint layout: leaf order, restricted unpickler, reader, writer, sizes.

Oracles: the official fixtures (their leaves.json, their file bytes and sha256), an independent
walk of the pickle opcodes with pickletools, and the real Grok-1 file sizes from the fixtures
README.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import subprocess

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grokcli.checkpoint import (check_checkpoint_shapes, dumps_leaf, expected_file_size,
                                iter_leaves, load_leaf, random_params, read_checkpoint, read_header,
                                read_leaf, write_checkpoint)
from grokcli.config import GROK_1, ModelConfig, load_config
from grokcli.errors import CheckpointError, ConfigError
from grokcli.params import LAYER_PARAMS, get_leaf, param_specs
from grokcli.quant import QuantizedWeight, quantize

FIXTURES = ("tiny-a", "tiny-b")
BF16 = np.dtype(ml_dtypes.bfloat16)

# Real Grok-1 file sizes, from the fixtures README.
REAL_SIZES = {
    "embed": 3_221_225_637, "w_gate": 1_611_137_347, "w_up": 1_611_137_347,
    "w_down": 1_611_399_491, "o": 37_847_359, "q": 37_761_334, "k": 6_293_814, "v": 6_293_814,
    "router": 196_770, "final_norm": 24_727, "attn_norm": 24_727, "attn_post_norm": 24_727,
    "moe_norm": 24_727, "moe_post_norm": 24_727,
}
REAL_TOTAL = 318_239_886_140


def fixture(fixtures_dir, name):
    d = fixtures_dir / name
    return d, load_config(d), json.loads((d / "leaves.json").read_text())


def raw_payloads(data: bytes) -> list[bytes]:
    """Independent oracle: the array payloads of a pickle, in stream order, via pickletools
    (leaving out numpy's one-byte b'b' argument to _reconstruct)."""
    return [arg for op, arg, _ in pickletools.genops(data)
            if op.name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8") and arg != b"b"]


def assert_leaves_equal(a, b):
    if isinstance(a, QuantizedWeight):
        assert isinstance(b, QuantizedWeight)
        for x, y in ((a.weight, b.weight), (a.scales, b.scales)):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes()
    else:
        x, y = np.asarray(a), np.asarray(b)
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# --- leaf order -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
def test_param_specs_match_fixture_leaves(fixtures_dir, name):
    _, cfg, leaves = fixture(fixtures_dir, name)
    specs = param_specs(cfg)
    assert len(specs) == len(leaves) == 2 + 12 * cfg.num_layers
    for spec, leaf in zip(specs, leaves):
        assert spec.path == leaf["path"]
        assert list(spec.shape) == leaf["shape"]
        assert spec.quantized == leaf["quantized"]
        if spec.quantized:
            assert list(spec.scales_shape) == leaf["scales_shape"]
            assert spec.row_blocks == leaf["row_blocks"]


def test_leaf_order_sorts_layers_as_strings():
    cfg = ModelConfig(**{**GROK_1.__dict__, "num_layers": 12})
    specs = param_specs(cfg)
    layer_order = [s.layer for s in specs[2::12]]
    assert layer_order == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    # Within a layer: moe/linear, linear_1, linear_v, key, linear, query, value, 4 norms, router.
    assert [s.name for s in specs[2:14]] == list(LAYER_PARAMS)
    # The README: in the real checkpoint tensor00026_000 is layer 10's moe/linear.
    real = param_specs(GROK_1)
    assert real[26].path == "params/transformer/decoder_layer_10/moe/linear/w"
    assert real[0].path == "params/language_model/in_out_embed/embeddings"
    assert real[1].path == "params/language_model/rms_norm/scale"


# --- the restricted unpickler on the fixtures -------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
def test_unpickler_reads_every_fixture_file_and_writer_reproduces_it(fixtures_dir, name):
    d, cfg, leaves = fixture(fixtures_dir, name)
    for spec, entry in zip(param_specs(cfg), leaves):
        data = (d / "ckpt-0" / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        leaf = load_leaf(data, entry["file"])
        payloads = raw_payloads(data)
        if entry["quantized"]:
            assert isinstance(leaf, QuantizedWeight)
            assert leaf.weight.dtype == np.int8 and leaf.scales.dtype == BF16
            assert list(leaf.weight.shape) == entry["weight_shape"]
            assert list(leaf.scales.shape) == entry["scales_shape"]
            assert [leaf.weight.tobytes(), leaf.scales.tobytes()] == payloads
        else:
            assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32
            assert list(leaf.shape) == entry["shape"]
            assert [leaf.tobytes()] == payloads
        # The writer turns what the reader read back into the very same file.
        assert dumps_leaf(leaf) == data
        assert expected_file_size(spec) == len(data) == entry["file_bytes"]


@pytest.mark.parametrize("name", FIXTURES)
def test_read_checkpoint_fixture_matches_per_file_parse(fixtures_dir, name):
    d, cfg, _ = fixture(fixtures_dir, name)
    params = read_checkpoint(d, cfg, workers=2)
    for i, spec in enumerate(param_specs(cfg)):
        data = (d / "ckpt-0" / f"tensor{i:05d}_000").read_bytes()
        assert_leaves_equal(get_leaf(params, spec), load_leaf(data, spec.path))
    assert params["embed"].ctypes.data % 64 == 0  # payloads land in aligned buffers
    assert params["embed"].flags.writeable


def test_load_leaf_from_file_objects(fixtures_dir):
    path = fixtures_dir / "tiny-b" / "ckpt-0" / "tensor00003_000"
    data = path.read_bytes()
    from_bytes = load_leaf(data, path.name)
    with open(path, "rb") as f:
        assert_leaves_equal(load_leaf(f, path.name), from_bytes)

    class Stream(io.RawIOBase):  # not seekable
        def __init__(self):
            self.inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self.inner.readinto(b)

    assert_leaves_equal(load_leaf(io.BufferedReader(Stream()), path.name), from_bytes)


def test_numpy2_protocol4_pickles_are_accepted():
    # numpy >= 2 spells the reconstructor numpy._core.multiarray._reconstruct.
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = pickle.dumps(a, protocol=4)
    assert b"numpy._core.multiarray" in data
    np.testing.assert_array_equal(load_leaf(data, "x"), a)


# --- refusing everything else ---------------------------------------------------------------

class _Reduce:
    """Pickles as `func(*args)`: how a malicious checkpoint would run code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _refused(data: bytes, fragment: str) -> str:
    with pytest.raises(CheckpointError) as e:
        load_leaf(data, "tensor00005_000")
    msg = str(e.value)
    assert msg.startswith("tensor00005_000: ")
    assert "\n" not in msg and len(msg) < 300
    assert fragment in msg
    return msg


def _op_str(s: str) -> bytes:
    b = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def _global(module: str, name: str) -> bytes:
    return _op_str(module) + _op_str(name) + pickle.STACK_GLOBAL


def _unframed(data: bytes) -> bytes:
    """The same pickle without its FRAME opcodes (frames are optional), so tests can splice it."""
    out, last = bytearray(), 0
    for op, _, pos in pickletools.genops(data):
        if op.name == "FRAME":
            out += data[last:pos]
            last = pos + 9
    return bytes(out + data[last:])


PROTO4 = b"\x80\x04"
# An unframed float32 [4] file and where its shape tuple (BININT1 4, TUPLE1, MEMOIZE) sits.
NORM = _unframed(dumps_leaf(np.arange(4, dtype=np.float32)))
SHAPE = b"K\x04\x85\x94"
SHAPE_AT = NORM.index(b"(K\x01" + SHAPE) + 3
PAYLOAD_AT = NORM.index(b"C\x10")  # SHORT_BINBYTES 16
MEMOIZE, BINGET = pickle.MEMOIZE, pickle.BINGET


def _with_shape(shape_bytes: bytes) -> bytes:
    """NORM with its shape tuple replaced by `shape_bytes` (the rest of the file kept)."""
    return NORM[:SHAPE_AT] + shape_bytes + NORM[SHAPE_AT + len(SHAPE):]


def test_variants_the_release_grammar_allows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5), dtype=np.float32)
    cases = [
        dumps_leaf(x),  # 4 dimensions: MARK ... TUPLE
        dumps_leaf(np.float32(2.5).reshape(())),  # 0 dimensions: EMPTY_TUPLE
        _unframed(dumps_leaf(x)),  # no frames
        pickle.dumps(np.asfortranarray(x), protocol=4),  # column-major data
        pickle.dumps(np.array([98], np.int8), protocol=4),  # payload b"b": a memo reference
        pickle.dumps(np.zeros((2**31, 0), np.float32), protocol=4),  # a LONG1 dimension
        # QuantizedWeight8bit whose scales share the weight's dtype (a memo reference to it).
        dumps_leaf(QuantizedWeight(np.arange(12, dtype=np.int8).reshape(3, 4),
                                   np.ones((1, 4), np.int8))),
    ]
    for data in cases:
        want = pickle.loads(data) if b"QuantizedWeight8bit" not in data else None
        got = load_leaf(data, "x")
        if want is not None:
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype and got.shape == want.shape
        else:
            assert got.weight.dtype == got.scales.dtype == np.int8
            assert got.weight.tobytes() == np.arange(12, dtype=np.int8).tobytes()
    # Wider encodings of the same values: LONG_BINGET, BINUNICODE, BINBYTES8.
    qw = _unframed(dumps_leaf(quantize(rng.standard_normal((64, 8), dtype=np.float32), 1)))
    want = load_leaf(qw, "x")
    ops = [(op.name, pos) for op, _, pos in pickletools.genops(qw)]
    get = next(pos for name, pos in ops if name == "BINGET")
    s = next(pos for name, pos in ops if name == "SHORT_BINUNICODE")
    b = next(pos for name, pos in ops if name == "BINBYTES")
    n = qw[s + 1]
    for data in (qw[:get] + b"j" + qw[get + 1:get + 2] + bytes(3) + qw[get + 2:],
                 qw[:s] + b"X" + n.to_bytes(4, "little") + qw[s + 2:],
                 qw[:b] + b"\x8e" + qw[b + 1:b + 5] + bytes(4) + qw[b + 5:]):
        assert_leaves_equal(load_leaf(data, "x"), want)


@pytest.mark.parametrize("protocol, fragment", [
    (0, "refused pickle opcode GLOBAL at byte 0: expected PROTO 4"),
    (2, "a protocol-2 pickle at byte 0"),
    (4, f"refused pickle global {os.system.__module__}.system at byte 11"),
])
def test_refuses_os_system_and_runs_nothing(tmp_path, protocol, fragment):
    marker = tmp_path / "pwned"
    data = pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=protocol)
    _refused(data, fragment)
    # Deep inside a legitimate QuantizedWeight8bit header, in place of the weight array.
    evil = (PROTO4 + _global("__main__", "QuantizedWeight8bit") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
            + pickle.EMPTY_DICT + pickle.MARK + _op_str("weight"))
    at = len(evil)
    evil += pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=4)[11:]
    _refused(evil, f"refused pickle global {os.system.__module__}.system at byte {at}")
    assert not marker.exists()


@pytest.mark.parametrize("func, args, name", [
    (eval, ("1+1",), "builtins.eval"),
    (subprocess.Popen, (["true"],), "subprocess.Popen"),
    (np.load, ("x.npy",), "numpy.load"),
    (getattr, (np.ndarray, "dump"), "builtins.getattr"),
])
def test_refuses_other_globals(func, args, name):
    _refused(pickle.dumps(_Reduce(func, *args), protocol=4), f"refused pickle global {name} at byte 11")


def test_refuses_numpy2_protocol5_pickles():
    _refused(pickle.dumps(np.arange(3, dtype=np.float32), protocol=5), "a protocol-5 pickle at byte 0")
    # The same opcodes under a PROTO 4 header still name a global the format never uses.
    data = PROTO4 + pickle.dumps(np.arange(3, dtype=np.float32), protocol=5)[2:]
    _refused(data, "refused pickle global numpy._core.numeric._frombuffer at byte 11")


def _norm_with(old: bytes, new: bytes) -> bytes:
    assert NORM.count(old) == 1
    return NORM.replace(old, new)


@pytest.mark.parametrize("data, fragment", [
    # Allowed globals with malicious arguments: object dtype, an unknown dtype string.
    (_norm_with(_op_str("f4"), _op_str("O8")), "unsupported dtype 'O8' at byte"),
    (_norm_with(_op_str("f4"), _op_str("os.system")), "unsupported dtype 'os.system'"),
    (pickle.dumps(np.array([1, "x"], dtype=object), protocol=4), "unsupported dtype 'O8' at byte 104"),
    (pickle.dumps(np.ones(2, ">f4"), protocol=4), "unsupported byte order > for float32"),
    (pickle.dumps(np.zeros(2, [("a", "f4")]), protocol=4), "unsupported dtype 'V4'"),
    # _reconstruct with anything but (ndarray, (0,), b'b').
    (pickle.dumps(_Reduce(np._core.multiarray._reconstruct, np.dtype, (0,), b"b"), protocol=4),
     "unexpected numpy.dtype at byte 53: expected numpy.ndarray"),
    (_norm_with(b"K\x00\x85", b"K\x01\x85"), "unexpected arguments to numpy _reconstruct"),
    # An allowed global that is only a type marker, called or built on.
    (PROTO4 + _global("numpy", "ndarray") + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP,
     "the pickle starts with numpy.ndarray at byte 2"),
    (PROTO4 + _global("ml_dtypes", "bfloat16") + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP,
     "the pickle starts with ml_dtypes.bfloat16 at byte 2"),
    (PROTO4 + _global("numpy", "dtype") + pickle.EMPTY_DICT + _op_str("__call__") + pickle.NONE
     + pickle.SETITEM + pickle.BUILD + pickle.STOP, "the pickle starts with numpy.dtype at byte 2"),
    # QuantizedWeight8bit with one state key, an extra one, or with arguments.
    (PROTO4 + _global("__main__", "QuantizedWeight8bit") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
     + pickle.EMPTY_DICT + _op_str("weight") + pickle.NONE + pickle.SETITEM + pickle.BUILD
     + pickle.STOP, "unexpected pickle opcode SHORT_BINUNICODE at byte 37: expected MARK"),
    (PROTO4 + _global("__main__", "QuantizedWeight8bit") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
     + pickle.EMPTY_DICT + pickle.MARK + _op_str("bias"), "unexpected QuantizedWeight8bit state key bias"),
    (PROTO4 + _global("__main__", "QuantizedWeight8bit") + _op_str("rm -rf") + pickle.TUPLE1
     + pickle.REDUCE + pickle.STOP, "unexpected pickle opcode SHORT_BINUNICODE at byte 34: expected EMPTY_TUPLE"),
    # BUILD on a payload, persistent ids, extension codes, anything but a leaf.
    (PROTO4 + pickle.BINBYTES + (5000).to_bytes(4, "little") + bytes(5000) + pickle.EMPTY_DICT
     + pickle.BUILD + pickle.STOP, "unexpected pickle opcode BINBYTES at byte 2"),
    (PROTO4 + _op_str("x") + pickle.BINPERSID + pickle.STOP, "refused pickle opcode BINPERSID at byte 5"),
    (PROTO4 + pickle.EXT1 + b"\x01" + pickle.STOP, "refused pickle opcode EXT1 at byte 2"),
    (pickle.dumps({"a": 1}, protocol=4), "unexpected pickle opcode EMPTY_DICT at byte 11"),
    (b"", "truncated: the file ends at byte 0, before an opcode"),
    (b"\xff" * 10, "byte 0xff (not a pickle opcode) at byte 0"),
    # Lengths far beyond the file allocate nothing and read nothing.
    (PROTO4 + pickle.BINUNICODE8 + (2**60).to_bytes(8, "little") + b"abc",
     "unexpected pickle opcode BINUNICODE8 at byte 2"),
    (PROTO4 + pickle.BINUNICODE + (2**31).to_bytes(4, "little") + b"abc",
     "a 2147483648-byte string at byte 2"),
    (PROTO4 + b"\x95" + (2**62).to_bytes(8, "little") + b"abc", "a pickle frame of 4611686018427387904 bytes"),
    (PROTO4 + b"\x95" + (1000).to_bytes(8, "little") + b"abc", "truncated: a 1000-byte pickle frame at byte 2"),
    (_norm_with(b"C\x10", b"B\xff\xff\xff\xff"),
     f"needs 16 bytes of data, the payload at byte {PAYLOAD_AT} has 4294967295"),
    (_with_shape(b"\x8a\x04\x00\x00\x00\x40\x85").replace(b"C\x10", b"\x8e" + (2**32).to_bytes(8, "little")),
     f"truncated: a 4294967296-byte payload at byte {PAYLOAD_AT + 3} runs past the end of the file"),
    # Memo references to nothing, or to the wrong kind of value; a memo entry made twice.
    (_norm_with(b"h\x03", b"h\x63"), f"memo index 99 is not defined at byte {NORM.index(BINGET)}"),
    (_norm_with(b"h\x03", b"h\x02"), f"unexpected numpy _reconstruct at byte {NORM.index(BINGET)}: expected an array dtype"),
    (_with_shape(b"h\x00"), f"a memo reference at byte {SHAPE_AT} is not an array shape"),
    (NORM.replace(b"\x94", b"\x94\x94", 1), f"unexpected pickle opcode MEMOIZE at byte {NORM.index(MEMOIZE) + 1}"),
    # Frames that do not frame opcodes.
    (PROTO4 + b"\x95" + (3).to_bytes(8, "little") + _op_str("numpy"),
     "a string crosses the end of its pickle frame at byte 14"),
    # Trailing bytes.
    (NORM + b"xx", "2 unexpected bytes after the end of the pickle at byte"),
])
def test_refuses_malformed_streams(data, fragment):
    _refused(data, fragment)
    # The file reader gives the same message.
    with pytest.raises(CheckpointError) as e:
        read_header(io.BytesIO(data), "tensor00005_000")
    assert fragment in str(e.value)


def test_unpickler_never_imports_modules():
    data = PROTO4 + _global("grokcli_no_such_module", "boom") + pickle.STOP
    _refused(data, "refused pickle global grokcli_no_such_module.boom at byte 2")
    _refused(PROTO4 + _global("os\n\x1b[31m", "system") + pickle.STOP, r"refused pickle global 'os\n\x1b[31m'.system")


# --- the crafted files of issue #18: each one a CheckpointError, at once, in bounded memory ---

_DEEP = 1_000_000


def _shared_lists() -> bytes:
    """879 bytes: 8 levels of a list of 40 references to the level below, over 200 bytes."""
    out = PROTO4 + pickle.SHORT_BINBYTES + bytes([200]) + bytes(200) + pickle.MEMOIZE
    for level in range(8):
        out += pickle.MARK + (pickle.BINGET + bytes([level])) * 40 + pickle.LIST + pickle.MEMOIZE
    return out + pickle.STOP


CRAFTED = {
    # name: (file bytes, fragment of the message)
    "deep-tuple-dict-key": (PROTO4 + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * _DEEP
                            + pickle.NONE + pickle.SETITEM + pickle.STOP,
                            "unexpected pickle opcode EMPTY_DICT at byte 2"),
    "shared-lists": (_shared_lists(), "unexpected pickle opcode SHORT_BINBYTES at byte 2"),
    "deep-lists": (PROTO4 + pickle.EMPTY_LIST * _DEEP + pickle.APPEND * (_DEEP - 1) + pickle.STOP,
                   "unexpected pickle opcode EMPTY_LIST at byte 2"),
    "deep-tuples": (PROTO4 + pickle.EMPTY_TUPLE + pickle.TUPLE1 * _DEEP + pickle.STOP,
                    "unexpected pickle opcode EMPTY_TUPLE at byte 2"),
    "deep-marks": (PROTO4 + pickle.MARK * _DEEP + pickle.STOP, "unexpected pickle opcode MARK at byte 2"),
    "huge-int": (PROTO4 + pickle.LONG4 + _DEEP.to_bytes(4, "little") + b"\xff" * _DEEP + pickle.STOP,
                 "unexpected pickle opcode LONG4 at byte 2"),
    "huge-int-text": (b"I" + b"9" * _DEEP + b"\n.", "unexpected pickle opcode INT at byte 0"),
    # The same structures where a real header has its shape.
    "shape-deep-tuple": (_with_shape(pickle.EMPTY_TUPLE + pickle.TUPLE1 * _DEEP),
                         f"unexpected pickle opcode TUPLE1 at byte {SHAPE_AT + 1}"),
    "shape-shared-lists": (_with_shape(_shared_lists()[2:]), f"unexpected pickle opcode SHORT_BINBYTES at byte {SHAPE_AT}"),
    "shape-deep-marks": (_with_shape(pickle.MARK * _DEEP), f"unexpected pickle opcode MARK at byte {SHAPE_AT + 1}"),
    "shape-many-dims": (_with_shape(pickle.MARK + b"K\x01" * _DEEP + pickle.TUPLE),
                        f"more than 64 dimensions at byte {SHAPE_AT}"),
    "shape-huge-int": (_with_shape(pickle.LONG1 + b"\xff" + b"\x7f" * 255 + pickle.TUPLE1),
                       f"a 255-byte integer at byte {SHAPE_AT}"),
    "shape-huge-int4": (_with_shape(pickle.LONG4 + _DEEP.to_bytes(4, "little") + b"\x7f" * _DEEP + pickle.TUPLE1),
                        f"unexpected pickle opcode LONG4 at byte {SHAPE_AT}"),
    "shape-overflow": (_with_shape((pickle.LONG1 + b"\x08" + (2**62).to_bytes(8, "little")) * 3 + pickle.TUPLE3),
                       "needs more than the file's"),
    "shape-negative": (_with_shape(pickle.BININT + (-4).to_bytes(4, "little", signed=True) + pickle.TUPLE1),
                       f"a negative array dimension -4 at byte {SHAPE_AT}"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_files_are_refused_at_once_in_bounded_memory(name, tmp_path):
    import time
    import tracemalloc

    data, fragment = CRAFTED[name]
    path = tmp_path / "tensor00005_000"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        msg = _refused(data, fragment)
        with open(path, "rb", buffering=0) as f, pytest.raises(CheckpointError) as e:
            read_header(f, "tensor00005_000")
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(e.value) == msg  # the file and the bytes readers agree
    assert elapsed < 2
    assert peak < 1 << 20, peak  # well under a MiB whatever the file holds


def _demo_with_crafted_files(tmp_path):
    """A copy of the bundled demo model with crafted files in place of four of its tensor files."""
    import shutil

    from grokcli.paths import demo_model_dir

    d = tmp_path / "demo"
    shutil.copytree(demo_model_dir(), d)
    for p in d.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    files = {}
    for i, name in zip((3, 5, 9, 13), ("deep-tuple-dict-key", "shared-lists", "shape-deep-tuple",
                                       "shape-overflow")):
        rel = f"ckpt-0/tensor{i:05d}_000"
        (d / rel).write_bytes(CRAFTED[name][0])
        files[rel] = CRAFTED[name][1]
    return d, files


def _run_bounded(cmd, env, tmp_path, timeout=180):
    """Run a command to completion: (rc, stdout, stderr, peak RSS of that process in MB)."""
    import time

    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                p.wait()
                pytest.fail(f"{cmd[1:]} still running after {timeout} s")
            time.sleep(0.05)
    p.returncode = os.waitstatus_to_exitcode(status)
    return (p.returncode, (tmp_path / "out").read_text(), (tmp_path / "err").read_text(),
            usage.ru_maxrss / 1024)


@pytest.mark.slow
def test_cli_refuses_crafted_files_with_one_line(tmp_path):
    """`grok verify-checkpoint` and `grok complete` on a checkpoint with crafted tensor files."""
    from conftest import grok_command

    d, files = _demo_with_crafted_files(tmp_path)
    cmd, env = grok_command()
    rc, out, err, rss = _run_bounded(cmd + ["verify-checkpoint", str(d), "--json"], env, tmp_path)
    assert rc == 1, err
    assert rss < 500, rss
    report = json.loads(out)
    structural = {p["path"]: p["message"] for p in report["failures"] if p["check"] in ("unsafe", "structure")}
    assert set(structural) == set(files)
    for rel, fragment in files.items():
        assert fragment in structural[rel] and "\n" not in structural[rel]
    rc, out, err, rss = _run_bounded(cmd + ["complete", "-c", str(d), "-n", "1", "hello"], env, tmp_path)
    assert rc == 1 and out == ""
    assert rss < 500, rss
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: tensor00003_000: ") and files["ckpt-0/tensor00003_000"] in lines[0]


@pytest.mark.parametrize("name", ["deep-tuple-dict-key", "shape-overflow"])
def test_load_refuses_a_crafted_file_with_one_line(tmp_path, name):
    import grokcli

    d, _ = _demo_with_crafted_files(tmp_path)
    (d / "ckpt-0" / "tensor00003_000").write_bytes(CRAFTED[name][0])
    with pytest.raises(CheckpointError) as e:
        grokcli.load(d)
    msg = str(e.value)
    assert msg.startswith("tensor00003_000: ") and CRAFTED[name][1] in msg and "\n" not in msg


# --- reader errors --------------------------------------------------------------------------

def _spec(cfg, name, layer=0):
    return next(s for s in param_specs(cfg) if s.name == name and s.layer == layer)


def test_read_leaf_errors_name_file_and_parameter(tmp_path, tiny_config, tiny_checkpoint):
    cfg = tiny_config()
    ckpt0 = tiny_checkpoint(cfg) / "ckpt-0"
    specs = param_specs(cfg)
    i = next(i for i, s in enumerate(specs) if s.name == "w_gate" and s.layer == 1)
    spec, path = specs[i], ckpt0 / f"tensor{i:05d}_000"
    assert isinstance(read_leaf(path, spec), QuantizedWeight)

    def error(p, s=spec) -> str:
        with pytest.raises(CheckpointError) as e:
            read_leaf(p, s)
        return str(e.value)

    # Missing.
    msg = error(tmp_path / "tensor99999_000")
    assert "tensor99999_000" in msg and "missing" in msg and spec.path in msg
    # Truncated inside the payload, inside the header, and emptied.
    data = path.read_bytes()
    for cut in (len(data) - 10, 100, 0):
        bad = tmp_path / f"cut{cut}"
        bad.write_bytes(data[:cut])
        msg = error(bad, spec)
        assert bad.name in msg and "truncated" in msg
    # Trailing garbage.
    bad = tmp_path / "long"
    bad.write_bytes(data + b"xx")
    assert "unexpected bytes" in error(bad)
    # Wrong dtype: a float16 norm (as numpy itself pickles it) and a float32 weight.
    norm = _spec(cfg, "attn_norm")
    bad = tmp_path / "f16"
    bad.write_bytes(pickle.dumps(np.ones(norm.shape, np.float16), protocol=4))
    msg = error(bad, norm)
    assert "f16" in msg and norm.path in msg and "expected float32 ndarray [32]" in msg
    assert "float16" in msg
    bad.write_bytes(dumps_leaf(np.ones(spec.shape, np.float32)))
    msg = error(bad, spec)
    assert "expected QuantizedWeight8bit int8" in msg and "found ndarray float32" in msg
    # Wrong shape, and scales with the wrong number of row blocks.
    bad.write_bytes(dumps_leaf(np.ones((33,), np.float32)))
    msg = error(bad, norm)
    assert norm.path in msg and "emb_size 33, config says 32" in msg
    down = _spec(cfg, "w_down")
    bad.write_bytes(dumps_leaf(quantize(np.ones(down.shape, np.float32), 1)))
    msg = error(bad, down)
    assert down.path in msg and "scales are [8, 1, 32], expected [8, 8, 32]" in msg


def test_checkpoint_directory_errors(tmp_path, tiny_config, tiny_checkpoint):
    cfg = tiny_config()
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint_shapes(tmp_path / "nope", cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a Grok-1 checkpoint directory: no ckpt-0/ folder"):
        check_checkpoint_shapes(tmp_path / "empty", cfg)
    (tmp_path / "empty" / "ckpt-0").mkdir()
    with pytest.raises(CheckpointError, match="ckpt-0 is empty"):
        read_checkpoint(tmp_path / "empty", cfg)
    d = tiny_checkpoint(cfg)
    with pytest.raises(CheckpointError, match="looks like the ckpt-0/ folder itself"):
        check_checkpoint_shapes(d / "ckpt-0", cfg)
    (d / "ckpt-0" / "tensor00007_000").unlink()
    with pytest.raises(CheckpointError, match=r"tensor00007_000 is missing \(params/transformer/"):
        check_checkpoint_shapes(d, cfg)


def test_config_disagreeing_with_tensors_is_a_config_error(tiny_config, tiny_checkpoint):
    written = tiny_config(num_layers=4, num_experts=4)
    d = tiny_checkpoint(written)
    with pytest.raises(ConfigError, match=r"^layer 0 moe/linear has 4 experts, config says 8 "):
        check_checkpoint_shapes(d, tiny_config(num_layers=4, num_experts=8))
    with pytest.raises(ConfigError, match="emb_size 32, config says 48"):
        check_checkpoint_shapes(d, tiny_config(num_layers=4, num_experts=4, emb_size=48))
    with pytest.raises(ConfigError, match="num_kv_heads\\*key_size 16, config says 32"):
        check_checkpoint_shapes(d, tiny_config(num_layers=4, num_experts=4, num_kv_heads=4))
    with pytest.raises(ConfigError, match="holds 50 tensor files, which is a 4-layer model; "
                                          "the config says num_layers=2"):
        check_checkpoint_shapes(d, tiny_config(num_layers=2, num_experts=4))
    with pytest.raises(CheckpointError, match="would make a 4-layer model"):
        check_checkpoint_shapes(d, tiny_config(num_layers=6, num_experts=4))
    # The bulk reader checks first, before reading any payload.
    with pytest.raises(ConfigError, match="4 experts, config says 8"):
        read_checkpoint(d, tiny_config(num_layers=4, num_experts=8))
    assert len(check_checkpoint_shapes(d, written)) == 50


def test_check_reads_headers_not_payloads(tiny_config, tiny_checkpoint, monkeypatch):
    cfg = tiny_config(vocab_size=4096, emb_size=64)
    d = tiny_checkpoint(cfg)
    import grokcli.checkpoint.reader as reader

    import contextlib

    read_sizes = []

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            out = self.f.read(n)
            read_sizes.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open_regular = reader.open_regular_file

    @contextlib.contextmanager
    def spy_open(path):
        with real_open_regular(path) as f:
            yield Spy(f)

    monkeypatch.setattr(reader, "open_regular_file", spy_open)
    check_checkpoint_shapes(d, cfg)
    # Payloads of 64 KiB or more sit outside pickle frames and are skipped, never read: the
    # 1 MiB embedding table for one. (Smaller ones arrive inside a frame with the header.)
    assert max(read_sizes) < 64 * 1024 + 9
    total = sum(p.stat().st_size for p in (d / "ckpt-0").iterdir())
    assert sum(read_sizes) <= total - 4096 * 64 * 4


# --- writer -> reader round trips -----------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(),  # GQA, 8 experts
    dict(num_kv_heads=4, num_experts=4),  # no GQA, 4 experts
    dict(num_layers=12, num_experts=4, num_selected_experts=1, emb_size=16, key_size=4),
    dict(num_q_heads=6, num_kv_heads=3, key_size=16, emb_size=48, widening_factor=8 / 3),
])
def test_write_read_round_trip_is_lossless(tiny_config, tiny_checkpoint, overrides):
    cfg = tiny_config(**overrides)
    d = tiny_checkpoint(cfg, seed=3)
    params = tiny_checkpoint.params["ckpt"]
    assert load_config(d) == cfg
    got = read_checkpoint(d, cfg, workers=3)
    for spec in param_specs(cfg):
        assert_leaves_equal(get_leaf(got, spec), get_leaf(params, spec))
    # Every file has the size the formula predicts.
    for i, spec in enumerate(param_specs(cfg)):
        assert (d / "ckpt-0" / f"tensor{i:05d}_000").stat().st_size == expected_file_size(spec)
    assert not [p for p in (d / "ckpt-0").iterdir() if p.name.startswith(".")]  # no temp files


def test_writer_quantizes_float_matrices(tmp_path, tiny_config):
    cfg = tiny_config()
    params = random_params(cfg, seed=1)
    floats = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    for layer in floats["layers"]:
        for name, value in layer.items():
            if isinstance(value, QuantizedWeight):
                layer[name] = value.dequantize(np.float32)
    write_checkpoint(tmp_path, floats, cfg)
    got = read_checkpoint(tmp_path, cfg)
    for spec in param_specs(cfg):
        if spec.quantized:
            want = quantize(get_leaf(floats, spec), spec.row_blocks)
            assert_leaves_equal(get_leaf(got, spec), want)


def test_writer_replaces_a_larger_checkpoint_and_copies_the_tokenizer(tmp_path, tiny_config,
                                                                        tiny_checkpoint):
    big, small = tiny_config(num_layers=3), tiny_config(num_layers=1)
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"sentencepiece bytes")
    tiny_checkpoint(big, name="out")
    d = tiny_checkpoint(small, name="out", tokenizer_path=tok)
    assert len(list((d / "ckpt-0").iterdir())) == 14
    assert (d / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
    assert load_config(d) == small
    check_checkpoint_shapes(d, small)


def test_writer_rejects_params_that_do_not_fit_the_config(tmp_path, tiny_config):
    cfg = tiny_config()
    params = random_params(cfg)
    params["layers"][1]["router"] = np.zeros((32, 4), np.float32)
    with pytest.raises(ConfigError, match="decoder_layer_1/router/w: shape \\[32, 4\\], config expects \\[32, 8\\]"):
        write_checkpoint(tmp_path, params, cfg)


def test_random_params_follow_the_fixture_generator(tiny_config):
    cfg = tiny_config(emb_size=64)
    p = random_params(cfg, seed=0)
    assert abs(np.std(p["embed"]) - 3 / 8) < 0.02
    assert abs(np.mean(p["layers"][0]["attn_post_norm"]) - 12) < 0.5
    assert abs(np.mean(p["layers"][0]["attn_norm"]) - 1) < 0.05
    w = p["layers"][0]["q"]
    assert isinstance(w, QuantizedWeight) and w.weight.dtype == np.int8 and w.scales.dtype == BF16
    assert np.abs(w.weight).max() == 127
    assert_leaves_equal(random_params(cfg, seed=0)["layers"][1]["w_down"], p["layers"][1]["w_down"])


# --- streaming reads ------------------------------------------------------------------------

def test_iter_leaves_streams_with_bounded_in_flight_files(tiny_config, tiny_checkpoint):
    cfg = tiny_config(num_layers=3)
    d = tiny_checkpoint(cfg)
    calls = []
    seen = []
    for spec, leaf in iter_leaves(d, cfg, workers=2, max_in_flight=2,
                                  progress=lambda *a: calls.append(a)):
        seen.append(spec.path)
        done_files = calls[-1][2]
        assert done_files == len(seen)
    assert sorted(seen) == sorted(s.path for s in param_specs(cfg))
    total = sum(p.stat().st_size for p in (d / "ckpt-0").iterdir())
    assert calls[-1] == (total, total, len(seen), len(seen))
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))  # bytes_done never goes back
    # Stopping early is fine and leaves nothing running.
    it = iter_leaves(d, cfg, workers=2)
    next(it)
    it.close()


def test_iter_leaves_reports_a_corrupt_file(tiny_config, tiny_checkpoint):
    cfg = tiny_config()
    d = tiny_checkpoint(cfg)
    path = d / "ckpt-0" / "tensor00004_000"
    path.write_bytes(pickle.dumps(_Reduce(os.system, "true"), protocol=4))
    with pytest.raises(CheckpointError, match="tensor00004_000: refused pickle global"):
        list(iter_leaves(d, cfg, check=False))


# --- the full Grok-1 config, shapes only ----------------------------------------------------

REAL_SHAPES = {
    "embed": (131072, 6144), "final_norm": (6144,), "w_gate": (8, 6144, 32768),
    "w_up": (8, 6144, 32768), "w_down": (8, 32768, 6144), "q": (6144, 6144), "k": (6144, 1024),
    "v": (6144, 1024), "o": (6144, 6144), "router": (6144, 8), "attn_norm": (6144,),
}


def test_grok1_shapes_without_allocating():
    specs = param_specs(GROK_1)
    assert len(specs) == 770

    def build():
        leaves = {}
        for s in specs:
            if s.quantized:
                leaves[(s.name, s.layer)] = QuantizedWeight(jnp.zeros(s.shape, jnp.int8),
                                                            jnp.zeros(s.scales_shape, jnp.bfloat16))
            else:
                leaves[(s.name, s.layer)] = jnp.zeros(s.shape, jnp.float32)
        from grokcli.params import assemble

        return assemble(GROK_1, leaves)

    abstract = jax.eval_shape(build)
    flat = jax.tree.leaves(abstract)
    assert len(flat) == 770 + 7 * 64  # each QuantizedWeight is two arrays
    for s in specs:
        leaf = get_leaf(abstract, s)
        if s.name in REAL_SHAPES:
            assert s.shape == REAL_SHAPES[s.name]
        if s.quantized:
            assert leaf.weight.shape == s.shape and leaf.weight.dtype == jnp.int8
            assert leaf.scales.dtype == jnp.bfloat16
            assert leaf.scales.shape == (s.shape[:-2] + ((8 if s.name in ("o", "w_down") else 1), s.shape[-1]))
        else:
            assert leaf.shape == s.shape and leaf.dtype == jnp.float32
    assert sum(x.size * x.dtype.itemsize for x in flat) < REAL_TOTAL  # payload < file bytes


def test_expected_file_size_reproduces_the_real_grok1_sizes():
    for s in param_specs(GROK_1):
        assert expected_file_size(s) == REAL_SIZES[s.name], s.path
    assert sum(expected_file_size(s) for s in param_specs(GROK_1)) == REAL_TOTAL


def _int_bytes(n: int) -> int:
    """Bytes pickle uses for a non-negative int: BININT1, BININT2 or BININT."""
    return 2 if n < 256 else 3 if n < 65536 else 5


# Per file class: (real spec name, small weight/array shape, small scales shape or None). Small
# shapes keep each payload on the same side of the 256 B and 64 KiB boundaries as the real
# payload (SHORT_BINBYTES vs BINBYTES, in frame vs out of frame) so only int widths differ.
_SMALL_ANALOGS = [
    ("embed", (300, 100), None), ("router", (300, 100), None), ("final_norm", (100,), None),
    ("q", (400, 200), (1, 200)), ("k", (400, 200), (1, 200)),
    ("o", (16, 4200), (8, 4200)),
    ("w_gate", (8, 8, 4200), (8, 1, 4200)), ("w_down", (8, 8, 4200), (8, 8, 4200)),
]


@pytest.mark.parametrize("name, small_shape, small_scales", _SMALL_ANALOGS)
def test_small_file_sizes_extrapolate_to_the_real_sizes(name, small_shape, small_scales):
    """Write a small file per class, derive its header overhead, predict the real size."""
    rng = np.random.default_rng(0)
    real = next(s for s in param_specs(GROK_1) if s.name == name)
    if small_scales is None:
        small = dumps_leaf(rng.standard_normal(small_shape, dtype=np.float32))
        shapes = [(small_shape, real.shape, 4)]
    else:
        w = quantize(rng.standard_normal(small_shape, dtype=np.float32), small_scales[-2])
        small = dumps_leaf(w)
        shapes = [(small_shape, real.shape, 1), (small_scales, real.scales_shape, 2)]
    small_payload = sum(np.prod(s) * item for s, _, item in shapes)
    overhead = len(small) - small_payload
    predicted = overhead + sum(np.prod(r) * item for _, r, item in shapes)
    predicted += sum(_int_bytes(b) - _int_bytes(a) for s, r, _ in shapes for a, b in zip(s, r))
    assert predicted == REAL_SIZES[name]


def test_layer_names_in_errors_match_the_reference_paths():
    spec = _spec(GROK_1, "w_gate", layer=3)
    assert spec.where == "layer 3 moe/linear"
    assert re.fullmatch(r"params/transformer/decoder_layer_3/moe/linear/w", spec.path)


def test_full_grok1_layout_is_checked_in_seconds(tmp_path):
    """770 sparse files with the real sizes (~300 GB apparent, ~13 MB on disk)."""
    import time

    from grokcli.checkpoint import write_sparse_checkpoint

    d = write_sparse_checkpoint(tmp_path, GROK_1)
    files = sorted((d / "ckpt-0").iterdir())
    assert len(files) == 770
    assert sum(f.stat().st_size for f in files) == REAL_TOTAL
    start = time.perf_counter()
    headers = check_checkpoint_shapes(d, GROK_1)
    assert time.perf_counter() - start < 10
    assert headers[26].weight.shape == (8, 6144, 32768)
    with pytest.raises(ConfigError, match="^layer 0 moe/linear has 8 experts, config says 4 "):
        check_checkpoint_shapes(d, ModelConfig(**{**GROK_1.__dict__, "num_experts": 4}))
    with pytest.raises(ConfigError, match="which is a 64-layer model; the config says num_layers=63"):
        check_checkpoint_shapes(d, ModelConfig(**{**GROK_1.__dict__, "num_layers": 63}))
    router = read_leaf(files[13], param_specs(GROK_1)[13])
    assert router.shape == (6144, 8) and not router.any()


def test_written_files_get_the_usual_permissions(tmp_path, tiny_config, tiny_checkpoint):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        out = tiny_checkpoint(tiny_config())
    finally:
        os.umask(mask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in [out / "config.json", *(out / "ckpt-0").iterdir()]}
    assert modes == {0o644}

