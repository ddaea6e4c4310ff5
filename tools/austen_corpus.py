"""The demo model's corpus: Jane Austen's six novels, from Debian's `r-cran-janeaustenr` package.

The package (MIT-licensed packaging of public-domain Project Gutenberg texts) stores the novels
as R character vectors (one element per printed line) in an R lazy-load database
(`data/Rdata.rdb` + index `data/Rdata.rdx`). This module reads that database with a small
reader of R's XDR serialisation format (enough for lists, strings and attributes), so that
neither R nor any other tool is needed beyond `apt-get download` and `dpkg-deb`.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

PACKAGE = "r-cran-janeaustenr"
VERSION = "1.0.0-1"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"

# R SEXP types used by the data we read.
_NILVALUE, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = (
    254, 1, 2, 9, 10, 13, 14, 16, 19)
_REFSXP = 255


class _RReader:
    """Reads one object in R's XDR ("X\\n") serialisation format (the subset the package uses)."""

    def __init__(self, raw: bytes):
        if raw[:2] != b"X\n":
            raise ValueError("not an R XDR serialisation stream")
        self.raw, self.pos, self.refs = raw, 2, []
        version = self._int()
        self._int(), self._int()  # writer and minimal reader R versions
        if version == 3:
            length = self._int()  # then the native encoding's name
            self.pos += length

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.raw, self.pos)
        self.pos += 4
        return value

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
        if kind == _NILVALUE:
            return None
        if kind == _REFSXP:
            return self.refs[(flags >> 8) - 1]
        if kind == _SYMSXP:
            name = self.read()  # a CHARSXP
            self.refs.append(name)
            return name
        if kind == _CHARSXP:
            length = self._int()
            if length == -1:
                return None
            text = self.raw[self.pos:self.pos + length].decode("utf-8")
            self.pos += length
            return text
        if kind == _LISTSXP:  # pairlist: attributes, or a tagged list
            items = {}
            while kind == _LISTSXP:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                items[tag] = self.read()
                flags = self._int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
            if kind != _NILVALUE:
                raise ValueError(f"unexpected pairlist terminator {kind}")
            return items
        if kind in (_STRSXP, _VECSXP, _INTSXP, _LGLSXP, _REALSXP):
            n = self._int()
            if kind == _STRSXP or kind == _VECSXP:
                value = [self.read() for _ in range(n)]
            elif kind == _REALSXP:
                value = list(struct.unpack_from(f">{n}d", self.raw, self.pos))
                self.pos += 8 * n
            else:
                value = list(struct.unpack_from(f">{n}i", self.raw, self.pos))
                self.pos += 4 * n
            if has_attr:
                attrs = self.read()
                names = attrs.get("names")
                if names is not None and kind == _VECSXP:
                    return dict(zip(names, value))
            return value
        raise ValueError(f"unsupported R object type {kind}")


def _unserialize(raw: bytes):
    return _RReader(raw).read()


def read_novels(data_dir: Path) -> dict[str, list[str]]:
    """{name: lines} for every novel in an extracted package's `data/` folder."""
    index = _unserialize(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    db = (data_dir / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        blob = db[offset:offset + length]
        # Each entry: 4-byte big-endian uncompressed length, then a zlib stream.
        novels[name] = _unserialize(zlib.decompress(blob[4:]))
    return novels


def fetch_deb(dest: Path) -> Path:
    """Download the pinned package with `apt-get download` and check its SHA-256."""
    subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=dest, check=True,
                   stdout=subprocess.DEVNULL)
    deb = next(dest.glob(f"{PACKAGE}_*.deb"))
    return deb


def extract_deb(deb: Path, dest: Path) -> Path:
    """Check the .deb's hash and unpack it; returns its R `data/` folder."""
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != DEB_SHA256:
        raise SystemExit(f"{deb}: SHA-256 {digest} is not the pinned {PACKAGE} {VERSION} ({DEB_SHA256})")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest / _DATA_DIR


def paragraphs(lines: list[str]) -> list[str]:
    """Re-flow hard-wrapped lines into paragraphs; drop the `_italics_` markers."""
    out, current = [], []
    for line in lines + [""]:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            text = " ".join(current).replace("_", "")
            out.append(re.sub(r"\s+", " ", text))
            current = []
    return out


def load(deb: Path | None = None) -> dict[str, list[str]]:
    """{novel: paragraphs}, from a given .deb or one fetched with apt-get into a temp folder."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb = deb or fetch_deb(tmp)
        data_dir = extract_deb(deb, tmp / "pkg")
        return {name: paragraphs(lines) for name, lines in sorted(read_novels(data_dir).items())}
