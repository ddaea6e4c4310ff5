"""fsutil: atomic writes, regular-file-only opens, the one byte formatter."""

import os
import time

import pytest

from grokcli import layout
from grokcli.fsutil import NotRegularFileError, atomic_write, atomic_write_text, format_bytes, open_regular_file


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_open_regular_file_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(NotRegularFileError, match="not a regular file"):
        with open_regular_file(fifo):
            pass
    assert time.monotonic() - t0 < 2


def test_open_regular_file_refuses_a_directory_and_reads_a_file(tmp_path):
    with pytest.raises(NotRegularFileError):
        with open_regular_file(tmp_path):
            pass
    (tmp_path / "x").write_bytes(b"abc")
    with open_regular_file(tmp_path / "x") as f:
        assert f.read() == b"abc"


def test_format_bytes_uses_decimal_units():
    assert format_bytes(999) == "999 B"
    assert format_bytes(1500) == "1.5 KB"
    assert format_bytes(2.5e9) == "2.5 GB"


def test_layout_names_round_trip():
    assert layout.tensor_relpath(42) == "ckpt-0/tensor00042_000"
    assert layout.tensor_index(layout.tensor_name(770)) == 770
    assert layout.tensor_index("tensor00001_001") is None and layout.tensor_index("x") is None
