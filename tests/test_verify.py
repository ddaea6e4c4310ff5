"""`grok verify-checkpoint`: a fault matrix, each case on a fresh copy of a good tiny checkpoint.

Hashes in the expected manifests are computed here with hashlib (and `sha256sum` where present),
independently of the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from grokcli.checkpoint import dumps_leaf, expected_file_size, random_params, write_checkpoint
from grokcli.config import GROK_1, ModelConfig
from grokcli.params import param_specs
from grokcli.verify import VerifyUsageError, verify_checkpoint

CFG = ModelConfig(vocab_size=64, pad_token=0, eos_token=2, sequence_len=32, embedding_multiplier_scale=1.0,
                  output_multiplier_scale=1.0, emb_size=16, key_size=8, num_q_heads=2, num_kv_heads=1,
                  num_layers=2, widening_factor=2, attn_output_multiplier=0.25, num_experts=4,
                  num_selected_experts=2)
SPECS = param_specs(CFG)
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def train_tokenizer(vocab: int) -> bytes:
    """A tiny SentencePiece model with exactly `vocab` pieces."""
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8)) for i in range(200)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab,
                                   model_type="bpe", minloglevel=2)
    return out.getvalue()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest_by_hand(d: Path) -> None:
    files = [p for p in sorted(d.rglob("*")) if p.is_file() and p.name != "manifest.json"]
    entries = [{"path": p.relative_to(d).as_posix(), "size": p.stat().st_size, "sha256": sha256(p)} for p in files]
    (d / "manifest.json").write_text(json.dumps({"repo_id": "test/tiny", "revision": "abc", "files": entries}))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pristine")
    tok = d.parent / "tok.model"
    tok.write_bytes(train_tokenizer(CFG.vocab_size))
    write_checkpoint(d, random_params(CFG, seed=1), CFG, tokenizer_path=tok)
    write_manifest_by_hand(d)
    return d


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(pristine, d)
    return d


def tensor(d: Path, i: int) -> Path:
    return d / "ckpt-0" / f"tensor{i:05d}_000"


def index_of(name: str, layer: int | None) -> int:
    return next(i for i, s in enumerate(SPECS) if s.name == name and s.layer == layer)


def problems(report, check: str) -> list:
    return [p for p in report.problems if p.check == check]


def test_pristine_copy_passes_with_integrity_proven(ckpt):
    report = verify_checkpoint(ckpt, jobs=2)
    assert report.ok and report.integrity_proven, report.problems
    assert report.problems == ()
    assert report.files_expected == report.files_checked == len(SPECS) + 2  # tensors, tokenizer, config.json
    assert report.bytes_read == sum(p.stat().st_size for p in (ckpt / "ckpt-0").iterdir()) + \
        (ckpt / "tokenizer.model").stat().st_size + (ckpt / "config.json").stat().st_size
    assert json.loads(json.dumps(report.to_json()))["ok"] is True


def test_missing_file(ckpt):
    i = index_of("w_down", 1)
    tensor(ckpt, i).unlink()
    report = verify_checkpoint(ckpt)
    [p] = report.failures
    assert (p.check, p.path) == ("missing", f"ckpt-0/tensor{i:05d}_000")
    assert SPECS[i].path in p.param and "layer 1" in p.param
    assert not report.integrity_proven


def test_extra_file_is_a_warning_unless_fail_on_extra(ckpt):
    shutil.copy(tensor(ckpt, 3), tensor(ckpt, len(SPECS)))
    (ckpt / "notes.txt").write_text("hi")
    report = verify_checkpoint(ckpt)
    assert report.ok and {p.path for p in report.warnings if p.check == "extra"} == {
        f"ckpt-0/tensor{len(SPECS):05d}_000", "notes.txt"}
    strict = verify_checkpoint(ckpt, fail_on_extra=True)
    assert not strict.ok and {p.check for p in strict.failures} == {"extra"}


def test_truncated_file(ckpt):
    i = index_of("w_gate", 0)
    path = tensor(ckpt, i)
    path.write_bytes(path.read_bytes()[:-100])
    report = verify_checkpoint(ckpt)
    found = {p.check for p in report.failures if p.path == f"ckpt-0/tensor{i:05d}_000"}
    assert found == {"size", "structure"}  # a wrong size already proves the hash wrong: no sha256 row
    assert all(p.path == f"ckpt-0/tensor{i:05d}_000" for p in report.failures)
    assert "truncated" in problems(report, "structure")[0].message


def test_one_flipped_bit_in_the_middle_of_a_tensor(ckpt):
    i = index_of("embed", None)
    path = tensor(ckpt, i)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    report = verify_checkpoint(ckpt)
    [p] = report.failures
    assert (p.check, p.path) == ("sha256", f"ckpt-0/tensor{i:05d}_000") and "in_out_embed" in p.param


def test_swapped_files_of_the_same_size(ckpt):
    a, b = tensor(ckpt, index_of("w_up", 0)), tensor(ckpt, index_of("w_up", 1))
    assert a.stat().st_size == b.stat().st_size
    tmp = a.with_name("tmp")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    report = verify_checkpoint(ckpt)
    assert {(p.check, p.path) for p in report.failures} == {
        ("sha256", f"ckpt-0/{a.name}"), ("sha256", f"ckpt-0/{b.name}")}
    assert all("swapped" in p.message for p in report.failures)


def test_wrong_shape(ckpt):
    i = index_of("router", 0)
    tensor(ckpt, i).write_bytes(dumps_leaf(np.zeros((CFG.emb_size, CFG.num_experts + 1), np.float32)))
    report = verify_checkpoint(ckpt)
    structure = [p for p in report.failures if p.check == "structure"]
    assert [p.path for p in structure] == [f"ckpt-0/tensor{i:05d}_000"] and "router" in structure[0].param
    assert "5" in structure[0].message  # names the shape found
    assert {p.check for p in report.failures} == {"size", "structure"}


def test_wrong_dtype(ckpt):
    i = index_of("attn_norm", 1)
    tensor(ckpt, i).write_bytes(pickle.dumps(np.ones(CFG.emb_size, np.float64), protocol=4))
    report = verify_checkpoint(ckpt)
    [s] = [p for p in report.failures if p.check == "structure"]
    assert s.path == f"ckpt-0/tensor{i:05d}_000" and "float64" in s.message and "float32" in s.message


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_reported_unsafe_and_never_runs(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    i = index_of("moe_norm", 0)
    tensor(ckpt, i).write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    report = verify_checkpoint(ckpt)
    assert not marker.exists()
    [u] = problems(report, "unsafe")
    assert u.path == f"ckpt-0/tensor{i:05d}_000" and "system" in u.message
    assert not report.ok


def test_corrupted_manifest_is_named_and_structure_still_checked(ckpt):
    (ckpt / "manifest.json").write_text('{"files": [{"path": "ckpt-0/tensor00000_000", "size": -3}]}')
    tensor(ckpt, 0).write_bytes(b"garbage")
    report = verify_checkpoint(ckpt)
    checks = {(p.check, p.path) for p in report.failures}
    assert ("manifest", "manifest.json") in checks
    assert ("structure", "ckpt-0/tensor00000_000") in checks
    assert not report.integrity_proven


def test_tokenizer_of_the_wrong_vocabulary(ckpt):
    (ckpt / "tokenizer.model").write_bytes(train_tokenizer(CFG.vocab_size + 16))
    report = verify_checkpoint(ckpt)
    [t] = problems(report, "tokenizer")
    assert t.path == "tokenizer.model" and "80 pieces" in t.message and "64" in t.message
    assert {p.check for p in report.failures} == {"tokenizer", "size"}


def test_grok1_config_requires_the_pinned_tokenizer(ckpt):
    from grokcli.verify import _check_tokenizer

    data = (ckpt / "tokenizer.model").read_bytes()
    found = _check_tokenizer("tokenizer.model", data, hashlib.sha256(data).hexdigest(), GROK_1)
    assert any("not the Grok-1 tokenizer" in p.message for p in found)
    real = Path(__file__).resolve().parents[1].parent / "shared" / "grok1" / "tokenizer.model"
    if real.is_file():
        data = real.read_bytes()
        assert _check_tokenizer("tokenizer.model", data, hashlib.sha256(data).hexdigest(), GROK_1) == []


def test_without_manifest_structure_only_with_a_warning(ckpt):
    (ckpt / "manifest.json").unlink()
    report = verify_checkpoint(ckpt)
    assert report.ok and not report.integrity_proven and report.manifest is None
    [w] = report.warnings
    assert w.check == "manifest" and "integrity not proven" in w.message


def test_write_manifest_then_detect_a_flip(ckpt):
    (ckpt / "manifest.json").unlink()
    report = verify_checkpoint(ckpt, write_manifest_file=True)
    assert report.ok and any("wrote" in n for n in report.notes)
    written = json.loads((ckpt / "manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in written["files"]}[f"ckpt-0/tensor{3:05d}_000"] == sha256(tensor(ckpt, 3))
    assert verify_checkpoint(ckpt).integrity_proven
    with pytest.raises(VerifyUsageError, match="already exists"):
        verify_checkpoint(ckpt, write_manifest_file=True)


def test_sha256sums_file_is_accepted_as_manifest(ckpt):
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum not installed")
    (ckpt / "manifest.json").unlink()
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    sums = subprocess.run(["sha256sum", *files], cwd=ckpt, check=True, capture_output=True, text=True).stdout
    (ckpt / "SHA256SUMS").write_text(sums)
    report = verify_checkpoint(ckpt)
    assert report.ok and report.integrity_proven and report.manifest == "SHA256SUMS"
    data = bytearray(tensor(ckpt, 0).read_bytes())
    data[len(data) // 2] ^= 1
    tensor(ckpt, 0).write_bytes(bytes(data))
    assert [(p.check, p.path) for p in verify_checkpoint(ckpt).failures] == [("sha256", "ckpt-0/tensor00000_000")]


def test_quick_checks_existence_and_sizes_without_reading(ckpt):
    i = index_of("w_gate", 1)
    tensor(ckpt, i).write_bytes(tensor(ckpt, i).read_bytes()[:-1])
    data = bytearray(tensor(ckpt, 0).read_bytes())
    data[len(data) // 2] ^= 1  # same size: invisible to --quick
    tensor(ckpt, 0).write_bytes(bytes(data))
    report = verify_checkpoint(ckpt, quick=True)
    assert report.files_checked == 0 and report.bytes_read == 0
    assert [(p.check, p.path) for p in report.failures] == [("size", f"ckpt-0/tensor{i:05d}_000")]


def test_sizes_checked_against_the_format_without_manifest(ckpt):
    (ckpt / "manifest.json").unlink()
    i = index_of("q", 0)
    with open(tensor(ckpt, i), "ab") as f:
        f.write(b"\0")
    report = verify_checkpoint(ckpt, quick=True)
    [p] = report.failures
    assert p.check == "size" and f"{expected_file_size(SPECS[i]):,}" in p.message


def test_progress_reports_every_byte(ckpt):
    seen = []
    report = verify_checkpoint(ckpt, jobs=3, on_progress=seen.append)
    assert seen[-1].bytes_done == seen[-1].bytes_total == report.bytes_read
    assert seen[-1].files_done == seen[-1].files_total == report.files_checked


def test_not_a_directory(tmp_path):
    from grokcli.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(tmp_path / "nope")


def test_hashing_stream_reads_each_byte_once_and_hashes_all(tmp_path):
    # Files larger than the read buffer: hash must equal hashlib's, and the parser must see the payload skipped.
    from grokcli import verify

    spec = next(s for s in SPECS if s.name == "embed")
    leaf = np.arange(np.prod(spec.shape), dtype=np.float32).reshape(spec.shape)
    path = tmp_path / "t"
    path.write_bytes(dumps_leaf(leaf))
    reads = []
    old = verify.CHUNK
    try:
        verify.CHUNK = 1000
        verify._local.buf = bytearray(1000)
        res = verify._read_file(path, "t", spec, False, reads.append)
    finally:
        verify.CHUNK = old
        verify._local.buf = None
    assert res.problems == [] and res.sha256 == sha256(path)
    assert sum(reads) == res.bytes_read == path.stat().st_size


# -- hostile directories: nothing outside it is read, nothing blocks, every finding is a row -----


def _bounded(fn, seconds: float = 20.0):
    """Run fn() in a daemon thread; fail (instead of hanging the suite) if it does not return in time."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _manifest_json(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def test_tampered_config_json_fails_and_an_uncovered_one_too(ckpt):
    text = (ckpt / "config.json").read_text()
    assert '"attn_output_multiplier": 0.25' in text
    (ckpt / "config.json").write_text(text.replace('"attn_output_multiplier": 0.25', '"attn_output_multiplier": 0.75'))
    report = verify_checkpoint(ckpt)
    assert [(p.check, p.path) for p in report.failures] == [("sha256", "config.json")]
    assert not report.ok and not report.integrity_proven

    m = _manifest_json(ckpt)
    m["files"] = [f for f in m["files"] if f["path"] != "config.json"]
    (ckpt / "manifest.json").write_text(json.dumps(m))
    report = verify_checkpoint(ckpt)
    assert not report.ok and not report.integrity_proven
    assert [(p.check, "does not cover config.json" in p.message) for p in report.failures] == [("manifest", True)]


def test_write_manifest_covers_config_json(ckpt):
    (ckpt / "manifest.json").unlink()
    verify_checkpoint(ckpt, write_manifest_file=True)
    assert "config.json" in {f["path"] for f in _manifest_json(ckpt)["files"]}
    assert verify_checkpoint(ckpt).integrity_proven


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.txt", "ckpt-0/../../outside.txt", "/proc/self/pagemap"])
def test_manifest_naming_files_outside_the_directory_is_refused_and_they_are_never_opened(ckpt, monkeypatch, name):
    from grokcli import verify

    (ckpt.parent / "outside.txt").write_text("secret")
    m = _manifest_json(ckpt)
    m["files"].append({"path": name, "size": 6, "sha256": None})
    (ckpt / "manifest.json").write_text(json.dumps(m))
    opened = []
    real = verify.open_regular_file
    monkeypatch.setattr(verify, "open_regular_file", lambda p: opened.append(Path(p)) or real(p))
    report = _bounded(lambda: verify_checkpoint(ckpt))
    [p] = report.failures
    assert p.check == "manifest" and "refused" in p.message and not report.integrity_proven
    assert opened and all(ckpt in o.parents for o in opened)


@pytest.mark.parametrize("target", ["/proc/self/mem", "/proc/self/pagemap"])
def test_links_to_kernel_files_are_refused_without_opening_them(ckpt, target, monkeypatch):
    from grokcli import verify

    opened = []
    real = verify.open_regular_file
    monkeypatch.setattr(verify, "open_regular_file", lambda p: opened.append(os.path.realpath(p)) or real(p))
    i = index_of("router", 1)
    tensor(ckpt, i).unlink()
    tensor(ckpt, i).symlink_to(target)
    (ckpt / "notes.bin").symlink_to(target)
    m = _manifest_json(ckpt)
    m["files"].append({"path": "notes.bin", "size": 0, "sha256": None})  # /proc files say size 0
    (ckpt / "manifest.json").write_text(json.dumps(m))
    report = _bounded(lambda: verify_checkpoint(ckpt))
    rows = {(p.check, p.path) for p in report.failures}
    assert ("unsafe", "notes.bin") in rows and ("size", f"ckpt-0/tensor{i:05d}_000") in rows
    assert ("unsafe", f"ckpt-0/tensor{i:05d}_000") in rows
    assert all("kernel file" in p.message for p in report.failures if p.check == "unsafe")
    assert not [o for o in opened if o.startswith("/proc")]


@pytest.mark.parametrize("victim", ["manifest.json", "SHA256SUMS", "tensor", "tokenizer.model", "config.json"])
def test_fifos_never_block_verify(ckpt, victim):
    from grokcli.errors import ConfigError

    if victim == "SHA256SUMS":
        (ckpt / "manifest.json").unlink()
    path = tensor(ckpt, 3) if victim == "tensor" else ckpt / victim
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    if victim == "config.json":
        with pytest.raises(ConfigError, match="not a regular file"):
            _bounded(lambda: verify_checkpoint(ckpt))
        return
    report = _bounded(lambda: verify_checkpoint(ckpt))
    rel = path.relative_to(ckpt).as_posix()
    assert not report.ok and any(p.path == rel and "regular file" in p.message for p in report.failures)


def test_fifo_tensor_never_blocks_loading(ckpt):
    from grokcli.checkpoint import read_checkpoint
    from grokcli.errors import CheckpointError

    tensor(ckpt, 5).unlink()
    os.mkfifo(tensor(ckpt, 5))
    with pytest.raises(CheckpointError, match="not a regular file"):
        _bounded(lambda: read_checkpoint(ckpt, CFG))


def test_tokenizer_byte_flip_is_a_fail_row_not_an_internal_error(ckpt):
    from grokcli.tokenizer import Tokenizer

    from grokcli.errors import TokenizerError

    data = bytearray((ckpt / "tokenizer.model").read_bytes())
    data[4] ^= 0x80  # breaks a piece's UTF-8: SentencePiece loads it, decoding the pieces fails
    with pytest.raises(TokenizerError, match="damaged"):
        Tokenizer.from_bytes(bytes(data))
    (ckpt / "tokenizer.model").write_bytes(bytes(data))
    report = verify_checkpoint(ckpt)
    rows = {p.check: p for p in report.failures if p.path == "tokenizer.model"}
    assert set(rows) == {"sha256", "tokenizer"}, report.failures
    assert "damaged" in rows["tokenizer"].message and "internal error" not in rows["tokenizer"].message


def test_tokenizer_fifo_or_endless_file_never_blocks_loading(tmp_path):
    from grokcli.errors import TokenizerError
    from grokcli.tokenizer import Tokenizer

    os.mkfifo(tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerError, match="not a regular file"):
        _bounded(lambda: Tokenizer.load(tmp_path))
    with pytest.raises(TokenizerError):
        _bounded(lambda: Tokenizer.load("/dev/zero"))


def test_sparse_file_larger_than_expected_stops_at_the_size_check(ckpt):
    i = index_of("embed", None)
    want = tensor(ckpt, i).stat().st_size
    with open(tensor(ckpt, i), "r+b") as f:
        f.truncate(1 << 40)  # 1 TiB, almost all hole
    report = _bounded(lambda: verify_checkpoint(ckpt, jobs=1))
    rows = [(p.check, p.path) for p in report.failures]
    assert rows[0] == ("size", f"ckpt-0/tensor{i:05d}_000") and {r[1] for r in rows} == {rows[0][1]}
    assert "sha256" not in {r[0] for r in rows}
    others = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file() and p != tensor(ckpt, i)
                 and p.name != "manifest.json")
    assert report.bytes_read <= others + want + (1 << 20)


@pytest.mark.parametrize("layers", [4000, 10 ** 5, 10 ** 9])
def test_num_layers_bounded_by_the_files_on_disk_before_anything_per_layer(ckpt, layers, monkeypatch):
    import time

    from grokcli import verify
    from grokcli.errors import ConfigError

    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_layers": layers}))
    monkeypatch.setattr(verify, "param_specs", lambda cfg: pytest.fail("built per-layer specs"))
    t0 = time.monotonic()
    if layers > 4096:
        with pytest.raises(ConfigError, match="num_layers"):
            verify_checkpoint(ckpt)
    else:
        [p] = verify_checkpoint(ckpt).failures
        assert p.check == "config" and "4,000 layers" in p.message and "holds 26" in p.message
    assert time.monotonic() - t0 < 5


def test_a_million_entry_manifest_is_refused_without_building_a_table(ckpt):
    entry = '{"path": "ckpt-0/x%07d", "size": 1, "sha256": null}'
    (ckpt / "manifest.json").write_text('{"files": [' + ",".join(entry % i for i in range(10 ** 6)) + "]}")
    report = _bounded(lambda: verify_checkpoint(ckpt))
    assert len(report.problems) < 10
    [p] = report.failures
    assert p.check == "manifest" and "larger than" in p.message


def test_many_missing_files_are_summarised(ckpt):
    for i in range(len(SPECS)):
        tensor(ckpt, i).unlink()
    (ckpt / "config.json").unlink()
    m = _manifest_json(ckpt)
    m["files"] = [f for f in m["files"] if f["path"] != "config.json"]
    (ckpt / "manifest.json").write_text(json.dumps(m))
    from grokcli import verify

    report = verify_checkpoint(ckpt, quick=True)  # Grok-1 by default: 770 files expected, none there
    missing = [p for p in report.failures if p.check == "missing"]
    assert len(missing) == verify.MAX_ROWS_PER_CHECK + 1 and "more files missing" in missing[-1].message


def _leaf_with_nonfinite(spec, value: float):
    from grokcli.quant import QuantizedWeight

    rng = np.random.default_rng(0)
    if not spec.quantized:
        leaf = rng.standard_normal(spec.shape).astype(np.float32)
        leaf.reshape(-1)[leaf.size // 2] = value
        return leaf, 1
    import ml_dtypes

    scales = np.ones(spec.scales_shape, ml_dtypes.bfloat16)
    scales.reshape(-1)[[0, -1]] = value
    weight = rng.integers(-127, 128, spec.shape, dtype=np.int8)
    return QuantizedWeight(weight, scales), 2


@pytest.mark.parametrize("name,layer,value", [("embed", None, np.nan), ("final_norm", None, np.inf),
                                              ("attn_norm", 0, -np.inf), ("router", 1, np.nan),
                                              ("w_down", 1, np.inf), ("q", 0, np.nan)])
def test_nonfinite_float_leaves_are_a_fail_and_json_stays_valid(ckpt, name, layer, value):
    i = index_of(name, layer)
    leaf, count = _leaf_with_nonfinite(SPECS[i], value)
    tensor(ckpt, i).write_bytes(dumps_leaf(leaf))
    (ckpt / "manifest.json").unlink()  # no manifest: the value check alone must catch it
    report = verify_checkpoint(ckpt)
    [p] = report.failures
    assert (p.check, p.path) == ("values", f"ckpt-0/tensor{i:05d}_000") and f"{count} NaN/Inf" in p.message
    assert json.loads(json.dumps(report.to_json(), allow_nan=False))["ok"] is False


@pytest.mark.parametrize("rows", [16, 1024])  # 4 KiB: inside a pickle frame; 256 KiB: a skipped payload
def test_nonfinite_scan_across_chunk_boundaries_against_numpy(tmp_path, monkeypatch, rows):
    # An embed payload streamed through 1000-byte chunks at an odd offset: counts as numpy does.
    import dataclasses

    from grokcli import verify

    spec = dataclasses.replace(next(s for s in SPECS if s.name == "embed"), shape=(rows, CFG.emb_size))
    monkeypatch.setattr(verify.os, "pread", lambda *a: pytest.fail("payload read a second time"))
    leaf = np.random.default_rng(1).standard_normal(spec.shape).astype(np.float32)
    flat = leaf.reshape(-1)
    flat[[0, 249, 250, 251, flat.size // 2, flat.size - 1]] = [np.nan, np.inf, -np.inf, np.nan, np.inf, np.nan]
    path = tmp_path / "t"
    path.write_bytes(dumps_leaf(leaf))
    old = verify.CHUNK
    try:
        verify.CHUNK = 1000
        verify._local.buf = bytearray(1000)
        res = verify._read_file(path, "t", spec, False, lambda n: None)
    finally:
        verify.CHUNK = old
        verify._local.buf = None
    [p] = res.problems
    assert f"{int(np.count_nonzero(~np.isfinite(leaf)))} NaN/Inf" in p.message
    assert res.sha256 == sha256(path) and res.bytes_read == path.stat().st_size


def test_cli_verify_of_a_hostile_directory_is_one_line_per_row_and_exit_1(ckpt):
    from typer.testing import CliRunner

    from grokcli import cli

    os.mkfifo(ckpt / "SHA256SUMS")
    tensor(ckpt, 2).unlink()
    os.mkfifo(tensor(ckpt, 2))
    r = _bounded(lambda: CliRunner().invoke(cli.app, ["verify-checkpoint", str(ckpt), "--json"],
                                            env={"GROK_CONSOLE_WIDTH": "200"}, catch_exceptions=False))
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    out = json.loads(r.stdout)
    assert not out["ok"] and any(f["path"] == "ckpt-0/tensor00002_000" for f in out["failures"])
