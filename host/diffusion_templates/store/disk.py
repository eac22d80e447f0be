"""The store's disk mirror: a folder that only ever holds, serves and deletes what the store wrote.

Layout, for an entry of ``n`` caches under ``key`` (keys are letters, digits, ``_`` and ``-``)::

    <key>.json               the index, written last (its ``os.replace`` is the moment the entry exists)
    <key>-0.safetensors ...  <key>-<n-1>.safetensors, one TemplateCache each (TemplateCache.save)

The folder may be shared by several processes and users and is not trusted:

* File names are derived from the key, never read from an index, so nothing outside the folder and
  no other key's file is ever opened, replaced or deleted. The index records, per file, its length,
  the SHA-256 of its bytes and its carrier; an entry is served only when its index has exactly the
  expected form and names its own key, and every file has that length and digest. Anything else is a
  miss, counted (``StoreStats.disk_errors``) and logged, never an exception; the next computation of
  that key replaces the entry.
* Only regular files are opened (:mod:`.files`): never a FIFO or a device; the store's own files are
  opened with ``O_NOFOLLOW`` (symbolic links are not followed).
* Writes go to a temporary file with an unguessable name created with ``O_EXCL`` and are moved into
  place with ``os.replace``: a crash mid-write leaves at worst a temporary file or data files without
  a matching index, which are never served (the digests would not match).
* Trimming to ``disk_max_bytes`` and :meth:`DiskMirror.clear` delete only complete entries: an index
  of the store's own form for its own key whose files are regular files of the recorded lengths.
  Foreign files, including ``.json``/``.safetensors`` files the store did not write, stay. Leftovers
  of interrupted writes stay too (they are replaced when that key is written again).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from .. import limits
from ..cache import TemplateCache
from .files import NotRegularFile, digest_fd, fd_path, open_regular, read_fd, write_new
from .keys import STORE_FORMAT

log = logging.getLogger("diffusion_templates.store")

#: What a key must look like to be mirrored to disk (store keys are 64 hex digits).
DISK_KEY = re.compile(r"[0-9A-Za-z_-]{1,128}")
#: Index files larger than this are not the store's.
MAX_INDEX_BYTES = 64 * 1024
#: Most caches one entry may hold on disk.
MAX_FILES = 256
_INDEX = re.compile(r"([0-9A-Za-z_-]{1,128})\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MARK = "diffusion-templates store"


class BrokenEntry(Exception):
    """An entry that is present but must not be served (the message says why)."""


@dataclasses.dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str
    carrier: str


def index_name(key: str) -> str:
    return f"{key}.json"


def data_name(key: str, i: int) -> str:
    return f"{key}-{i}.safetensors"


def disk_safe(value: Any, depth: int = 0) -> bool:
    """Whether ``TemplateCache.save`` keeps everything: no nested tensors, no excluded fields set."""
    if depth > 8:
        return False
    if isinstance(value, BaseModel):
        tensor_fields = value.tensor_fields() if isinstance(value, TemplateCache) else {}
        for name, info in type(value).model_fields.items():
            field = getattr(value, name)
            if info.exclude and field is not None:
                return False
            if name in tensor_fields:
                continue
            if not disk_safe(field, depth + 1):
                return False
        return True
    if isinstance(value, torch.Tensor):
        return depth == 0
    if isinstance(value, Mapping):
        return all(disk_safe(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(disk_safe(v, depth + 1) for v in value)
    return True


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid in a store index")


def parse_index(raw: bytes, key: str) -> list[FileRecord]:
    """The file records of an index that has exactly the store's form for ``key``; raises
    :class:`BrokenEntry` otherwise."""
    try:
        meta = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BrokenEntry(f"index is not JSON ({exc})") from None
    if not isinstance(meta, dict) or set(meta) != {"store", "format", "key", "files"}:
        raise BrokenEntry("index is not an object with exactly store, format, key and files")
    if meta["store"] != _MARK or meta["format"] != STORE_FORMAT:
        raise BrokenEntry(f"index of another store or format ({meta['store']!r}, {meta['format']!r})")
    if meta["key"] != key:
        raise BrokenEntry(f"index names key {meta['key']!r}")
    files = meta["files"]
    if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILES:
        raise BrokenEntry(f"index must list 1 to {MAX_FILES} files")
    records = []
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or set(entry) != {"bytes", "sha256", "carrier"}:
            raise BrokenEntry(f"file {i}: not an object with exactly bytes, sha256 and carrier")
        size, digest, carrier = entry["bytes"], entry["sha256"], entry["carrier"]
        if type(size) is not int or size < 0 or size > _max_file_bytes():
            raise BrokenEntry(f"file {i}: length {size!r}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BrokenEntry(f"file {i}: sha256 {digest!r}")
        if not isinstance(carrier, str):
            raise BrokenEntry(f"file {i}: carrier {carrier!r}")
        records.append(FileRecord(size, digest, carrier))
    return records


def _max_file_bytes() -> int:
    return limits.max_cache_bytes() + limits.MAX_HEADER_BYTES + 8


def _regular_size(path: Path) -> int | None:
    """``lstat`` size of ``path`` if it is a regular file (not a symlink), else ``None``."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _touch(fd: int, path: Path) -> None:
    """Mark the entry used (its index's mtime orders trimming), on the file that was read."""
    try:
        if os.utime in os.supports_fd:
            os.utime(fd)
        elif os.utime in os.supports_follow_symlinks:
            os.utime(path, follow_symlinks=False)
    except OSError:
        pass  # only the LRU order of trimming suffers


class DiskMirror:
    """The folder half of a :class:`~diffusion_templates.store.TemplateCacheStore` (see the module)."""

    def __init__(self, folder: Path, max_bytes: int | None = None) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    # -- reading ---------------------------------------------------------------------------------
    def get(self, key: str) -> list[TemplateCache] | None:
        """The entry's caches, or ``None`` when there is none; raises :class:`BrokenEntry`."""
        if not DISK_KEY.fullmatch(key):
            return None
        index = self.folder / index_name(key)
        try:
            with open_regular(index) as fd:
                records = parse_index(read_fd(fd, MAX_INDEX_BYTES, "index"), key)
                caches = [self._load(key, i, record) for i, record in enumerate(records)]
                _touch(fd, index)
                return caches
        except FileNotFoundError:
            return None
        except BrokenEntry:
            raise
        except (OSError, ValueError) as exc:  # a FIFO, a device, a symlink, unreadable, too large
            raise BrokenEntry(str(exc)) from None

    def _load(self, key: str, i: int, record: FileRecord) -> TemplateCache:
        path = self.folder / data_name(key, i)
        try:
            with open_regular(path) as fd:
                size = os.fstat(fd).st_size
                if size != record.bytes:
                    raise BrokenEntry(f"{path.name}: {size} bytes, the index says {record.bytes}")
                digest, _ = digest_fd(fd)
                if digest != record.sha256:
                    raise BrokenEntry(f"{path.name}: content does not match the digest in the index")
                # Load the file just checked (its descriptor), not whatever the name points to now.
                cache = TemplateCache.load(fd_path(fd, str(path)))
        except BrokenEntry:
            raise
        except FileNotFoundError:
            raise BrokenEntry(f"{path.name} is missing") from None
        except Exception as exc:  # CacheError, OSError, NotRegularFile
            raise BrokenEntry(f"{path.name}: {exc}") from None
        if cache.carrier != record.carrier:
            raise BrokenEntry(f"{path.name}: a {cache.carrier!r} cache, the index says {record.carrier!r}")
        return cache

    def has(self, key: str) -> bool:
        """Whether a complete entry (see :meth:`_entry_size`) is on disk for ``key``."""
        return DISK_KEY.fullmatch(key) is not None and self._entry_size(key) is not None

    # -- writing ---------------------------------------------------------------------------------
    def put(self, key: str, caches: list[TemplateCache]) -> bool:
        """Write the entry (``False`` when it is not written: key or caches not storable on disk).
        Raises ``OSError``/``ValueError`` etc. on failure, after removing its temporary files."""
        if not caches or not DISK_KEY.fullmatch(key) or not all(disk_safe(c) for c in caches):
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        token = f"{os.getpid()}.{secrets.token_hex(8)}"
        temps: list[Path] = []
        try:
            records = []
            for i, cache in enumerate(caches):
                tmp = self.folder / f".{data_name(key, i)}.{token}.tmp"
                temps.append(tmp)
                write_new(tmp, b"")  # claim the name (O_EXCL, no symlink), then let save fill it
                cache.save(tmp)
                with open_regular(tmp) as fd:
                    digest, size = digest_fd(fd)
                records.append({"bytes": size, "sha256": digest, "carrier": cache.carrier})
            for i, tmp in enumerate(temps):
                os.replace(tmp, self.folder / data_name(key, i))
            meta = {"store": _MARK, "format": STORE_FORMAT, "key": key, "files": records}
            tmp = self.folder / f".{index_name(key)}.{token}.tmp"
            temps.append(tmp)
            write_new(tmp, json.dumps(meta, allow_nan=False).encode())
            os.replace(tmp, self.folder / index_name(key))  # the entry exists from here on
            self._remove_beyond(key, len(caches))
        finally:
            for tmp in temps:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                except OSError as exc:  # pragma: no cover - reported, nothing else to do
                    log.warning("could not remove temporary file %s: %s", tmp, exc)
        if self.max_bytes is not None:
            self.trim(self.max_bytes)
        return True

    # -- removing --------------------------------------------------------------------------------
    def _entry_size(self, key: str) -> tuple[int, float, int] | None:
        """``(bytes, index mtime, file count)`` of a complete entry: an index of the store's own form
        for ``key`` (read without following links or opening anything but a regular file), each of
        whose files is a regular file of the recorded length. ``None`` for anything else."""
        index = self.folder / index_name(key)
        try:
            with open_regular(index) as fd:
                st = os.fstat(fd)
                records = parse_index(read_fd(fd, MAX_INDEX_BYTES, "index"), key)
        except (OSError, ValueError, BrokenEntry):
            return None
        total = st.st_size
        for i, record in enumerate(records):
            if _regular_size(self.folder / data_name(key, i)) != record.bytes:
                return None
            total += record.bytes
        return total, st.st_mtime, len(records)

    def _remove(self, key: str, count: int) -> None:
        """Delete a complete entry: the index first (so it is never served half deleted), then its files."""
        for name in [index_name(key)] + [data_name(key, i) for i in range(count)]:
            path = self.folder / name
            if _regular_size(path) is None:  # replaced by something else since it was checked
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _remove_beyond(self, key: str, count: int) -> None:
        """Delete the files of an earlier, longer entry of ``key`` (``<key>-<count>.safetensors`` on)."""
        for i in range(count, MAX_FILES):
            path = self.folder / data_name(key, i)
            if _regular_size(path) is None:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                break

    def _entries(self) -> list[tuple[float, str, int, int]]:
        """``(index mtime, key, bytes, file count)`` of every complete entry in the folder."""
        found = []
        try:
            with os.scandir(self.folder) as listing:
                names = [entry.name for entry in listing]
        except OSError:
            return []
        for name in names:
            match = _INDEX.fullmatch(name)
            if match is None:
                continue
            size = self._entry_size(match.group(1))
            if size is not None:
                found.append((size[1], match.group(1), size[0], size[2]))
        return found

    def trim(self, max_bytes: int) -> None:
        """Delete complete entries, least recently used first, until they total at most ``max_bytes``."""
        entries = sorted(self._entries())
        total = sum(e[2] for e in entries)
        for _, key, size, count in entries:
            if total <= max_bytes:
                break
            self._remove(key, count)
            total -= size

    def clear(self) -> int:
        """Delete every complete entry (nothing else); returns how many."""
        entries = self._entries()
        for _, key, _, count in entries:
            self._remove(key, count)
        return len(entries)


__all__ = ["BrokenEntry", "DiskMirror", "NotRegularFile", "disk_safe"]
