"""Files written whole or not at all, the one way this code base writes a file it keeps.

A crash (SIGKILL, power loss) or a failed write (ENOSPC, EIO) at any point of
`write_atomic` leaves the file as it was (or absent) or as written, complete:
the bytes go to a temporary file in the same directory (created with the final
mode, so a secret is never readable by others, not even for a moment), which is
fsynced, renamed over the target and the rename made durable by an fsync of the
directory. A failed write removes its temporary file; only a kill can leave one
behind (``.NAME.<random>.tmp``, never under the target's name), and
`leftover_temporaries` finds those for a caller that owns the directory.

`DNA_TEST_KILL_AT_STEP` is for tests only: set to N, the process SIGKILLs
itself at the Nth step (`crash_point`) of its file writes, so that a test can
cut a real process short between any two of them.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import signal
from pathlib import Path

TEST_KILL_ENV = "DNA_TEST_KILL_AT_STEP"  # tests only: see the module docstring
_steps = itertools.count(1)


def crash_point() -> None:
    """One step of a write that a test may cut short (DNA_TEST_KILL_AT_STEP)."""
    at = os.environ.get(TEST_KILL_ENV)
    if at is not None and next(_steps) == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, overwrite: bool = True) -> None:
    """Write ``path`` whole or not at all (the module docstring), created with ``mode``
    (less the umask). ``overwrite=False``: an existing ``path`` is kept, FileExistsError.
    An error names ``path``, not the temporary file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_then_place(tmp, path, data, mode, overwrite)
    except OSError as exc:
        if exc.errno is None or exc.filename == str(path):
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None  # ENOSPC, EIO, ENOENT


def _write_then_place(tmp: Path, path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            crash_point()  # a torn temporary file
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        crash_point()  # a whole temporary file, not in place yet
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
        sync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crash_point()  # in place


# A file system without hard links (FAT on a USB stick) says so with one of these.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}


def _place_new(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path`` unless ``path`` exists: a hard link fails on an existing
    name whoever made it meanwhile; without hard links, the check comes before the rename."""
    try:
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def sync_directory(path: Path) -> None:
    """Make the names created, renamed or removed in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def leftover_temporaries(path: Path) -> list[Path]:
    """Temporary files `write_atomic` left beside ``path`` when killed while writing it."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))
