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
    files = [p for p in sorted(d.rglob("*")) if p.is_file() and p.name not in ("manifest.json", "config.json")]
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
    assert report.files_expected == report.files_checked == len(SPECS) + 1
    assert report.bytes_read == sum(p.stat().st_size for p in (ckpt / "ckpt-0").iterdir()) + \
        (ckpt / "tokenizer.model").stat().st_size
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
    assert found == {"size", "sha256", "structure"}
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
    assert {p.check for p in report.failures} == {"size", "sha256", "structure"}


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
    assert {p.check for p in report.failures} == {"tokenizer", "size", "sha256"}


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
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "config.json")
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
