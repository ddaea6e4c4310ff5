"""Small file-system facts used everywhere: atomic writes, regular-file opens, byte sizes."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write through `write(file)` into a temp file next to `path`, then rename it into place.

    Readers see the old file or the new one, never a partial one; a failed write leaves no temp file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`atomic_write` of a bytes object."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a str, UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


class NotRegularFileError(OSError):
    """A path that should be a plain file is a FIFO, device, socket or directory."""


@contextlib.contextmanager
def open_regular_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open `path` for binary reading only if it is a regular file; never blocks on a FIFO.

    The file is opened with O_NONBLOCK (a FIFO then opens at once instead of waiting for a
    writer) and checked with fstat on the open descriptor, so a swap between check and open
    cannot slip a device or FIFO in. Raises NotRegularFileError otherwise.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(f"not a regular file: {path}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


class FileTooLargeError(OSError):
    """A file is larger than the caller accepts."""


def read_regular_file(path: str | Path, limit: int) -> bytes:
    """All bytes of a regular file of at most `limit` bytes: never blocks on a FIFO, never reads more.

    Raises NotRegularFileError, FileTooLargeError, or the OSError of the open or read.
    """
    with open_regular_file(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileTooLargeError(f"larger than {limit:,} bytes: {path}")
    return data


def format_bytes(n: float) -> str:
    """1.5 GB style sizes (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def format_rate(nbytes: float, seconds: float) -> str:
    """A transfer rate such as "1.2 GB/s"."""
    return f"{format_bytes(nbytes / max(seconds, 1e-9))}/s"
