"""``TemplateCacheStore``: computed Template caches by key, in memory and optionally in a folder."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cache import TemplateCache
from .calls import KeyBuilder
from .disk import BrokenEntry, DiskMirror
from .memory import MemoryLRU, copy_caches

log = logging.getLogger("diffusion_templates.store")

#: Default memory budget of the per-pipeline store: 512 MiB of cache tensors.
DEFAULT_MAX_BYTES = 512 * 2**20


@dataclasses.dataclass
class StoreStats:
    """Counters since the store was made (or :meth:`TemplateCacheStore.clear`)."""

    hits: int = 0
    """Served from memory (includes threads that waited for another thread's computation)."""
    disk_hits: int = 0
    misses: int = 0
    """Computed (the template's model ran)."""
    uncacheable: int = 0
    """Computed and not stored: inputs not hashable by content, weights that cannot be hashed, or the
    plugin said ``cacheable = False``."""
    evictions: int = 0
    disk_errors: int = 0
    """Disk entries present but not served (broken, foreign, not a regular file...) and failed writes;
    each is also logged as a warning on the ``diffusion_templates.store`` logger."""


class _Flight:
    """One computation in progress; other threads asking for the same key wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: list[TemplateCache] | None = None


class TemplateCacheStore:
    """Computed Template caches by key: an LRU in memory bounded by bytes, optionally a disk folder.

    ``max_bytes``: memory budget (``None``: unbounded; ``0``: keep nothing in memory). An entry
    larger than the budget is not kept in memory (it is still written to disk).
    ``disk_dir``: a folder of ``<key>.json`` indexes and ``<key>-<i>.safetensors`` files, created on
    first write, that only ever serves and deletes entries the store wrote (:mod:`.disk`).
    ``disk_max_bytes`` bounds it (least recently used entries are deleted first).
    """

    def __init__(
        self,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        *,
        disk_dir: str | os.PathLike | None = None,
        disk_max_bytes: int | None = None,
    ):
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.stats = StoreStats()
        self._memory = MemoryLRU(max_bytes)
        self._disk_max_bytes = disk_max_bytes
        self._disk = DiskMirror(self.disk_dir, disk_max_bytes) if self.disk_dir is not None else None
        self._keys = KeyBuilder()
        self._lock = threading.RLock()
        self._flights: dict[str, _Flight] = {}

    @property
    def max_bytes(self) -> int | None:
        """Memory budget (bytes of cache tensors); lowering it takes effect at the next store."""
        return self._memory.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        self._memory.max_bytes = value

    @property
    def disk_max_bytes(self) -> int | None:
        """Disk budget (bytes of complete entries); applied after each write."""
        return self._disk.max_bytes if self._disk is not None else self._disk_max_bytes

    @disk_max_bytes.setter
    def disk_max_bytes(self, value: int | None) -> None:
        self._disk_max_bytes = value
        if self._disk is not None:
            self._disk.max_bytes = value

    def __repr__(self) -> str:
        budget = "unbounded" if self.max_bytes is None else f"{self.max_bytes / 2**20:.0f} MiB"
        disk = f", disk_dir={str(self.disk_dir)!r}" if self.disk_dir else ""
        return f"TemplateCacheStore({len(self)} entries, {self.nbytes / 2**20:.1f} MiB of {budget}{disk})"

    # -- keys ------------------------------------------------------------------------------------------
    def key_for(self, pipeline: Any, template: str, inputs: Any, *, negative: bool = False) -> str | None:
        """The key of ``template`` with validated ``inputs`` on ``pipeline`` (a TemplatePipeline);
        ``None`` when this call cannot be cached."""
        return self._keys.key_for(pipeline, template, inputs, negative=negative)

    def fetch(
        self,
        pipeline: Any,
        resolved: Any,
        compute: Callable[[], list[TemplateCache]],
        *,
        negative: bool = False,
    ) -> list[TemplateCache]:
        """``TemplatePipeline.encode``'s entry: the stored caches of ``resolved`` (a ResolvedTemplate),
        else ``compute()``'s, stored."""
        key = self.key_for(pipeline, resolved.name, resolved.inputs, negative=negative)
        if key is None:
            with self._lock:
                self.stats.uncacheable += 1
            return compute()
        return self.get_or_compute(key, compute)

    # -- access ----------------------------------------------------------------------------------------
    def get(self, key: str) -> list[TemplateCache] | None:
        """The caches stored under ``key`` (memory, then disk), or ``None``."""
        with self._lock:
            caches = self._memory_get(key)
        if caches is None:
            caches = self._disk_get(key)
            if caches is not None:
                with self._lock:
                    self.stats.disk_hits += 1
                    self._memory_put(key, caches)
        return None if caches is None else copy_caches(caches)

    def put(self, key: str, caches: list[TemplateCache]) -> None:
        caches = self._checked(caches)
        with self._lock:
            self._memory_put(key, caches)
        self._disk_put(key, caches)

    def get_or_compute(self, key: str, compute: Callable[[], list[TemplateCache]]) -> list[TemplateCache]:
        """The caches under ``key``; on a miss ``compute()`` runs once (concurrent askers wait for it)."""
        while True:
            with self._lock:
                caches = self._memory_get(key)
                if caches is not None:
                    return copy_caches(caches)
                flight = self._flights.get(key)
                owner = flight is None
                if owner:
                    flight = self._flights[key] = _Flight()
            if not owner:
                flight.done.wait()
                if flight.result is not None:
                    with self._lock:
                        self.stats.hits += 1
                    return copy_caches(flight.result)
                continue  # the computing thread failed: try ourselves (and raise our own error)
            try:
                caches = self._disk_get(key)
                if caches is not None:
                    with self._lock:
                        self.stats.disk_hits += 1
                        self._memory_put(key, caches)
                else:
                    caches = self._checked(compute())
                    with self._lock:
                        self.stats.misses += 1
                        self._memory_put(key, caches)
                    self._disk_put(key, caches)
                flight.result = caches
                return copy_caches(caches)
            finally:
                with self._lock:
                    self._flights.pop(key, None)
                flight.done.set()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._memory:
                return True
        return self._disk is not None and self._disk.has(key)

    def __len__(self) -> int:
        return len(self._memory)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return self._memory.nbytes

    def keys(self) -> list[str]:
        """Keys in memory, least recently used first."""
        with self._lock:
            return self._memory.keys()

    def clear(self, *, disk: bool = False) -> None:
        """Forget every entry in memory and reset the counters; with ``disk=True`` also delete every
        complete entry the store wrote to its folder (any other file there stays)."""
        with self._lock:
            self._memory.clear()
            self.stats = StoreStats()
        if disk and self._disk is not None:
            self._disk.clear()

    # -- memory ----------------------------------------------------------------------------------------
    @staticmethod
    def _checked(caches: Any) -> list[TemplateCache]:
        if isinstance(caches, TemplateCache):
            caches = [caches]
        if not isinstance(caches, (list, tuple)) or not all(isinstance(c, TemplateCache) for c in caches):
            raise TypeError(f"a store entry is a list of TemplateCache objects, got {type(caches).__name__}")
        return list(caches)

    def _memory_get(self, key: str) -> list[TemplateCache] | None:
        caches = self._memory.get(key)
        if caches is not None:
            self.stats.hits += 1
        return caches

    def _memory_put(self, key: str, caches: list[TemplateCache]) -> None:
        self.stats.evictions += self._memory.put(key, caches)

    # -- disk ------------------------------------------------------------------------------------------
    def _disk_error(self, what: str, key: str, problem: object) -> None:
        with self._lock:
            self.stats.disk_errors += 1
        log.warning("cache store %s: %s %s: %s", self.disk_dir, what, key, problem)

    def _disk_get(self, key: str) -> list[TemplateCache] | None:
        if self._disk is None:
            return None
        try:
            return self._disk.get(key)
        except BrokenEntry as exc:  # a miss; computing the key again replaces the entry
            self._disk_error("not serving entry", key, exc)
            return None

    def _disk_put(self, key: str, caches: list[TemplateCache]) -> None:
        if self._disk is None:
            return
        try:
            self._disk.put(key, caches)
        except Exception as exc:  # e.g. tensors sharing memory, a full disk: memory still has the entry
            self._disk_error("could not write entry", key, f"{type(exc).__name__}: {exc}")


__all__ = ["DEFAULT_MAX_BYTES", "StoreStats", "TemplateCacheStore"]
