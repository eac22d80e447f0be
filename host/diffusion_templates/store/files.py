"""Opening files without trusting what they are: regular files only, never a FIFO or a device.

The store's folder may be shared with other processes and users, and a template's file inputs are
paths a caller typed. Opening a FIFO blocks until a writer appears (forever, while the caller holds
the denoiser lock); opening a device file can have side effects. So every open here checks the
file type with ``lstat``/``stat`` first, opens with ``O_NONBLOCK`` (opening a FIFO for reading then
returns at once) and checks again with ``fstat`` on the descriptor it got, which is the file that
is actually read, whatever was swapped in between.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

#: Chunk size when hashing a file (bounded memory whatever the file's size).
_CHUNK = 1 << 20
#: A file whose status changed less than this many seconds before it was hashed is hashed again at
#: its next use (see :func:`file_digest`): file times are coarse, so a rewrite within the same tick
#: as the previous write could otherwise leave every field of ``stat`` unchanged.
RACY_SECONDS = 2.0

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)


class NotRegularFile(OSError):
    """A path that is not a regular file (a FIFO, a device, a folder, or a symlink when not followed)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, *, follow_symlinks: bool = False) -> Iterator[int]:
    """An ``os.open`` descriptor of ``path`` for reading, only if it is a regular file.

    ``follow_symlinks=False`` (the store's own files) refuses symbolic links too, with ``O_NOFOLLOW``
    where the platform has it. Raises :class:`NotRegularFile` or ``OSError`` (``FileNotFoundError``
    when there is nothing at ``path``)."""
    path = os.fspath(path)
    st = os.stat(path, follow_symlinks=follow_symlinks)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{path} is {_kind(st.st_mode)}")
    flags = os.O_RDONLY | _NONBLOCK | _CLOEXEC | _BINARY | (0 if follow_symlinks else _NOFOLLOW)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped after the stat above
            raise NotRegularFile(f"{path} is {_kind(mode)}")
        yield fd
    finally:
        os.close(fd)


def read_fd(fd: int, limit: int, what: str) -> bytes:
    """All bytes of the open regular file ``fd``, refusing more than ``limit`` bytes."""
    size = os.fstat(fd).st_size
    if size > limit:
        raise ValueError(f"{what}: {size} bytes, more than {limit}")
    chunks = []
    total = 0
    while True:
        chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise ValueError(f"{what}: more than {limit} bytes")
    return b"".join(chunks)


def digest_fd(fd: int) -> tuple[str, int]:
    """SHA-256 (hex) and length of everything the open file ``fd`` holds from its current offset."""
    digest = hashlib.sha256()
    total = 0
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return digest.hexdigest(), total
        digest.update(chunk)
        total += len(chunk)


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist: ``O_EXCL``, never through a symlink) holding ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def fd_path(fd: int, fallback: str) -> str:
    """A path naming exactly the open file ``fd`` (``/proc/self/fd/N`` on Linux), so that a reader
    which only takes paths reads the file that was checked, not whatever the name points to now."""
    return f"/proc/self/fd/{fd}" if _PROC_FD else fallback


_PROC_FD = os.path.isdir("/proc/self/fd")


# ------------------------------------------------------------------------------------ file inputs
#: (device, inode) -> (size, mtime_ns, ctime_ns, digest) of files hashed while they were stable.
_digests: dict[tuple[int, int], tuple[int, int, int, str]] = {}
_digests_lock = threading.Lock()
_DIGESTS_SIZE = 4096


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the content of the regular file at ``path`` (symlinks followed, as for any input).

    For template inputs that name a file (a LoRA, a picture): keys must follow the content, not the
    name, the size or the modification time, which ``os.utime`` sets to anything. The digest is
    remembered per file only when the file's *status change* time (``ctime``, which no unprivileged
    process can set back, and which any write, rename or ``utime`` moves) was more than
    :data:`RACY_SECONDS` before the file was hashed, and it is reused only while device, inode, size,
    mtime and ctime are all unchanged; otherwise the file is read again (as git does with racily
    clean index entries). Raises ``OSError`` (:class:`NotRegularFile` for a FIFO or a device)."""
    with open_regular(path, follow_symlinks=True) as fd:
        before = os.fstat(fd)
        ident = (before.st_dev, before.st_ino)
        seen = (before.st_size, before.st_mtime_ns, before.st_ctime_ns)
        with _digests_lock:
            memo = _digests.get(ident)
        if memo is not None and memo[:3] == seen:
            return memo[3]
        started = time.time_ns()
        digest, _ = digest_fd(fd)
        after = os.fstat(fd)
    stable = (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == seen
    if stable and started - before.st_ctime_ns > RACY_SECONDS * 1e9:
        with _digests_lock:
            if len(_digests) >= _DIGESTS_SIZE:
                _digests.clear()
            _digests[ident] = (*seen, digest)
    return digest
