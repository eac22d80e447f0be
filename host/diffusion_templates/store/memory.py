"""The store's memory side: an LRU of computed caches bounded by the bytes of their tensors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel

from ..cache import TemplateCache


def _walk_tensors(value: Any, seen: set[int], depth: int = 0):
    if depth > 8:
        return
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen.add(id(value))
            yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _walk_tensors(getattr(value, name), seen, depth + 1)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _walk_tensors(v, seen, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk_tensors(v, seen, depth + 1)


def caches_nbytes(caches: list[TemplateCache]) -> int:
    """Bytes of every tensor the caches hold, nested ones included, each storage counted once."""
    storages: dict[tuple[str, int], int] = {}
    seen: set[int] = set()
    for cache in caches:
        for t in _walk_tensors(cache, seen):
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            storages[key] = max(storages.get(key, 0), storage.nbytes())
    return sum(storages.values())


def _copy(cache: TemplateCache) -> TemplateCache:
    """A copy whose dict and list fields are new containers (tensors are shared, never copied), so a
    caller replacing an entry of a returned cache does not change what the store holds.

    What pydantic's ``__copy__`` does (a new instance sharing the field values, its own fields-set,
    extra and private dicts), written out so that a store hit does not go through ``copy.copy`` three
    times; caches with private attributes take pydantic's own path."""
    if getattr(cache, "__pydantic_private__", None) is not None:
        copy = cache.__copy__()
        fields = copy.__dict__
        for name, value in fields.items():
            if type(value) is dict:
                fields[name] = dict(value)
            elif type(value) is list:
                fields[name] = list(value)
        return copy
    klass = type(cache)
    copy = klass.__new__(klass)
    fields = {}
    for name, value in cache.__dict__.items():
        kind = type(value)
        fields[name] = dict(value) if kind is dict else list(value) if kind is list else value
    extra = cache.__pydantic_extra__
    _set = object.__setattr__
    _set(copy, "__dict__", fields)
    _set(copy, "__pydantic_extra__", None if extra is None else dict(extra))
    _set(copy, "__pydantic_fields_set__", set(cache.__pydantic_fields_set__))
    _set(copy, "__pydantic_private__", None)
    return copy


def copy_caches(caches: list[TemplateCache]) -> list[TemplateCache]:
    """What a store hit returns: :func:`_copy` of each cache."""
    return [_copy(c) for c in caches]


class MemoryLRU:
    """Entries by key, least recently used first, their tensors' bytes at most ``max_bytes``.

    ``max_bytes=None``: unbounded; ``0``: keeps nothing. An entry larger than the whole budget is not
    kept. Not thread safe on its own: :class:`TemplateCacheStore` holds its lock around every call."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, tuple[list[TemplateCache], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, key: str) -> list[TemplateCache] | None:
        """The stored caches (not copies), which become the most recently used; ``None`` if absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, caches: list[TemplateCache]) -> int:
        """Store ``caches`` under ``key`` (replacing any entry); returns how many entries were evicted."""
        size = caches_nbytes(caches)
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        if self.max_bytes is not None and size > self.max_bytes:
            return 0
        self._entries[key] = (caches, size)
        self.nbytes += size
        evicted = 0
        while self.max_bytes is not None and self.nbytes > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.nbytes -= freed
            evicted += 1
        return evicted

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
