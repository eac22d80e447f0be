"""A store of computed Template caches, so that a template's model runs once per distinct input.

A Template cache depends on four things only, and the store's key is a SHA-256 over all four:

* the **template**: its name, and the version of the distribution that provides it (``PluginInfo``)
  plus the plugin's optional ``cache_version`` attribute (for plugins registered in code, which have
  no distribution version: bump ``cache_version`` when the template's output changes);
* the **validated inputs**: every field of the ``Inputs`` model after validation (so defaults
  count), dumped to canonical JSON; tensors, numpy arrays, PIL images and bytes inside them are
  hashed by content (dtype, shape and every byte), never by identity or ``repr``;
* the **backbone**: the adapter name, the denoiser class, a hash of the denoiser's config and
  its dtype;
* the CFG branch (``negative``), since ``EncodeContext.negative`` is visible to ``encode``.

Invalidation is by key only: nothing is ever looked up under another template version or another
backbone, so a stale entry can waste space but can never be applied. Inputs holding an object the
store cannot hash by content make the template uncacheable for that call (it is computed, not
stored); a template whose output is not a function of its key (randomness without a seed, state
outside its inputs) sets ``cacheable = False`` on its plugin class.

Entries live in memory in an LRU bounded by bytes (``TemplateCache.nbytes`` and any tensors nested
deeper), and optionally in a folder of safetensors files (``TemplateCache.save``/``load``; loading
never unpickles), which survives the process and may be shared by several. The store is thread
safe, and two threads asking for the same missing key compute it once.

``TemplatePipeline`` uses one in-memory store per pipeline by default (:data:`DEFAULT_MAX_BYTES`);
``TemplatePipeline(pipe, store=None)`` turns it off and ``store=TemplateCacheStore(disk_dir=...)``
adds the disk folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import functools
import hashlib
import json
import math
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from . import __version__
from .cache import TemplateCache

if TYPE_CHECKING:
    from .backbones.base import BackboneAdapter

#: Default memory budget of the per-pipeline store: 512 MiB of cache tensors.
DEFAULT_MAX_BYTES = 512 * 2**20
#: Bumped when the key recipe or the disk layout changes (old entries are then never looked up).
STORE_FORMAT = 1

_INDEX_SUFFIX = ".json"


class Uncacheable(TypeError):
    """Raised by :func:`canonical` for a value it cannot hash by content."""


# --------------------------------------------------------------------------------------- key recipe
def _digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy())


@functools.lru_cache(maxsize=1024)
def _model_layout(klass: type[BaseModel]) -> tuple[str, tuple[str, ...]]:
    """A pydantic model class's qualified name and field names (read once per class: pydantic's
    ``model_fields`` class property costs more than the rest of a small model's key)."""
    fields = getattr(klass, "__pydantic_fields__", None)
    if fields is None:
        fields = klass.model_fields
    return f"{klass.__module__}.{klass.__qualname__}", tuple(fields)


def canonical(value: Any) -> Any:
    """A JSON-able form of ``value`` that equals another's exactly when their contents are equal.

    Arrays (tensors, numpy arrays, PIL images, bytes) become their type, shape, dtype and a SHA-256
    of their bytes. Raises :class:`Uncacheable` for anything else that is not plain data.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # json writes floats with repr (exact); NaN/inf are written as names.
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, enum.Enum):
        klass = type(value)
        return {"__enum__": f"{klass.__module__}.{klass.__qualname__}", "value": canonical(value.value)}
    if isinstance(value, BaseModel):
        name, field_names = _model_layout(type(value))
        fields = value.__dict__
        return {"__model__": name, "fields": {f: canonical(fields[f]) for f in field_names}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "__dataclass__": f"{type(value).__module__}.{type(value).__qualname__}",
            "fields": {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    if isinstance(value, Mapping):
        items = [(canonical(k), canonical(v)) for k, v in value.items()]
        if all(isinstance(k, str) for k, _ in items):
            return {"__dict__": dict(sorted(items, key=lambda kv: kv[0]))}
        return {"__pairs__": sorted(items, key=lambda kv: json.dumps(kv[0], sort_keys=True))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted((canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))}
    if isinstance(value, torch.Tensor):
        if value.is_sparse or value.is_quantized or value.is_complex():
            raise Uncacheable(f"cannot hash a {value.layout}/{value.dtype} tensor by content")
        return {
            "__tensor__": str(value.dtype),
            "shape": list(value.shape),
            "sha256": _digest(_tensor_bytes(value)),
        }
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__bytes__": _digest(bytes(value))}
    if isinstance(value, PurePath):
        return {"__path__": str(value)}
    if isinstance(value, (datetime.date, datetime.time, datetime.timedelta)):
        return {"__time__": repr(value)}
    if isinstance(value, uuid.UUID):
        return {"__uuid__": str(value)}
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        import numpy as np

        if isinstance(value, np.generic):
            return {"__numpy_scalar__": value.dtype.str, "value": canonical(value.item())}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise Uncacheable("cannot hash a numpy array of Python objects by content")
            array = np.ascontiguousarray(value)
            return {
                "__ndarray__": array.dtype.str,
                "shape": list(array.shape),
                "sha256": _digest(memoryview(array).cast("B")),
            }
    if module == "PIL":
        from PIL import Image

        if isinstance(value, Image.Image):
            palette = value.getpalette() if value.mode in ("P", "PA") else None
            return {
                "__image__": value.mode,
                "size": list(value.size),
                "palette": palette,
                "sha256": _digest(value.tobytes()),
            }
    raise Uncacheable(f"cannot hash a {type(value).__module__}.{type(value).__qualname__} by content")


#: The key's JSON: sorted keys, no spaces, no NaN (one encoder object, not one per dump).
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode


def inputs_digest(inputs: Any) -> str:
    """SHA-256 of the canonical JSON dump of validated inputs (raises :class:`Uncacheable`)."""
    return _digest(_dumps(canonical(inputs)).encode())


_backbone_memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_backbone_lock = threading.Lock()


def _first_parameter(denoiser: torch.nn.Module) -> tuple[torch.nn.Module, str] | None:
    for name, _ in denoiser.named_parameters():
        owner, _, attr = name.rpartition(".")
        return (denoiser.get_submodule(owner) if owner else denoiser), attr
    return None


def backbone_identity(adapter: BackboneAdapter) -> dict[str, str]:
    """What a cache computed for ``adapter``'s backbone depends on: adapter, denoiser class, config, dtype.

    Memoised per denoiser: the config hash while the config object stays the same (diffusers
    replaces the frozen config object when it changes), the dtype read from the denoiser's first
    parameter at every call (``.to(dtype)`` changes it in place).
    """
    return dict(_backbone_items(adapter))


def _backbone_items(adapter: BackboneAdapter) -> tuple[tuple[str, str], ...]:
    """:func:`backbone_identity` as ``(key, value)`` pairs (what the store's key is built from)."""
    denoiser = adapter.denoiser
    config = getattr(denoiser, "config", None)
    with _backbone_lock:
        memo = _backbone_memo.get(denoiser)
    if memo is None or memo[0] is not config:
        text = json.dumps(dict(config or {}), sort_keys=True, default=repr)
        klass = type(denoiser)
        name = f"{klass.__module__}.{klass.__qualname__}"
        memo = (config, _digest(text.encode()), name, _first_parameter(denoiser), {})
        with _backbone_lock:
            _backbone_memo[denoiser] = memo
    first = memo[3]
    param = first[0]._parameters.get(first[1]) if first is not None else None
    dtype = param.dtype if param is not None else adapter.dtype
    items = memo[4].get((adapter.name, dtype))  # one tuple per adapter name and dtype seen
    if items is None:
        items = (("adapter", adapter.name), ("denoiser", memo[2]), ("config", memo[1]), ("dtype", str(dtype)))
        memo[4][(adapter.name, dtype)] = items
    return items


def cache_key(
    *,
    template: str,
    version: str,
    inputs: Any,
    backbone: Mapping[str, str] | tuple[tuple[str, str], ...],
    negative: bool = False,
    distribution: str = "",
    cache_version: str | None = None,
) -> str:
    """The store key (64 hex digits) of one template call. Raises :class:`Uncacheable`.

    The SHA-256 of the record's canonical JSON (sorted keys)::

        {"backbone": backbone, "cache_version": ..., "distribution": ..., "host": __version__,
         "inputs": canonical(inputs), "negative": ..., "store": STORE_FORMAT, "template": ...,
         "version": ...}

    Everything but the inputs is the same from call to call, so its JSON before and after the
    inputs is built once (:func:`_record_text`) and only the inputs are dumped per call.
    """
    backbone = backbone if isinstance(backbone, tuple) else tuple(backbone.items())
    parts = (template, version, distribution, cache_version, backbone, bool(negative))
    try:
        head, tail = _record_text(*parts)
    except TypeError:  # an unhashable value (not from this module): build the text uncached
        head, tail = _record_text.__wrapped__(*parts)
    digest = hashlib.sha256(head)
    digest.update(_dumps(canonical(inputs)).encode())
    digest.update(tail)
    return digest.hexdigest()


@functools.lru_cache(maxsize=512, typed=True)
def _record_text(
    template: str,
    version: str,
    distribution: str,
    cache_version: str | None,
    backbone: tuple[tuple[str, str], ...],
    negative: bool,
) -> tuple[bytes, bytes]:
    """The key record's JSON before and after the inputs' dump (see :func:`cache_key`): what
    ``json.dumps(record, sort_keys=True, separators=(",", ":"))`` writes, keys in sorted order."""
    head = (
        f'{{"backbone":{_dumps(dict(backbone))},"cache_version":{_dumps(cache_version)},'
        f'"distribution":{_dumps(distribution)},"host":{_dumps(__version__)},"inputs":'
    )
    tail = (
        f',"negative":{_dumps(negative)},"store":{_dumps(STORE_FORMAT)},'
        f'"template":{_dumps(template)},"version":{_dumps(version)}}}'
    )
    return head.encode(), tail.encode()


#: Keys of calls whose inputs are plain scalars, by everything the key depends on (see
#: :func:`_scalar_signature`): a repeated call skips the JSON dump and the hash. Cleared when full.
_key_memo: dict[tuple, str] = {}
_KEY_MEMO_SIZE = 4096
_SCALAR_TYPES = frozenset({str, int, bool, type(None)})


def _scalar_signature(inputs: Any) -> tuple | None:
    """A hashable stand-in for ``canonical(inputs)``, equal for two inputs exactly when their
    canonical JSON is equal, or ``None`` unless ``inputs`` is a pydantic model whose fields are all
    ``str``, ``int``, ``bool``, ``None`` or ``float`` (exact types: no subclasses, no containers).

    Each value comes with its type (``1``, ``1.0`` and ``True`` are equal in Python, not in JSON),
    and floats as ``repr`` (``0.0 == -0.0``; ``repr`` is exact, and every NaN dumps alike).
    """
    if not isinstance(inputs, BaseModel):
        return None
    klass = type(inputs)
    _, names = _model_layout(klass)
    values = inputs.__dict__
    signature: list[Any] = [klass]
    for name in names:
        value = values[name]
        kind = type(value)
        if kind is float:
            signature += (kind, repr(value))
        elif kind in _SCALAR_TYPES:
            signature += (kind, value)
        else:
            return None
    return tuple(signature)


# ------------------------------------------------------------------------------------------ helpers
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


def _disk_safe(value: Any, depth: int = 0) -> bool:
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
            if not _disk_safe(field, depth + 1):
                return False
        return True
    if isinstance(value, torch.Tensor):
        return depth == 0
    if isinstance(value, Mapping):
        return all(_disk_safe(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_disk_safe(v, depth + 1) for v in value)
    return True


@dataclasses.dataclass
class StoreStats:
    """Counters since the store was made (or :meth:`TemplateCacheStore.clear`)."""

    hits: int = 0
    """Served from memory (includes threads that waited for another thread's computation)."""
    disk_hits: int = 0
    misses: int = 0
    """Computed (the template's model ran)."""
    uncacheable: int = 0
    """Computed and not stored: inputs not hashable by content, or the plugin said ``cacheable = False``."""
    evictions: int = 0
    disk_errors: int = 0


class _Flight:
    """One computation in progress; other threads asking for the same key wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: list[TemplateCache] | None = None


# -------------------------------------------------------------------------------------------- store
class TemplateCacheStore:
    """Computed Template caches by key: an LRU in memory bounded by bytes, optionally a disk folder.

    ``max_bytes``: memory budget (``None``: unbounded; ``0``: keep nothing in memory). An entry
    larger than the budget is not kept in memory (it is still written to disk).
    ``disk_dir``: a folder of ``<key>.json`` indexes and ``<key>-<i>.safetensors`` files, created on
    first write. ``disk_max_bytes`` bounds it (least recently used entries are deleted first).
    """

    def __init__(
        self,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        *,
        disk_dir: str | os.PathLike | None = None,
        disk_max_bytes: int | None = None,
    ):
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.disk_max_bytes = disk_max_bytes
        self.stats = StoreStats()
        self._entries: OrderedDict[str, tuple[list[TemplateCache], int]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.RLock()
        self._flights: dict[str, _Flight] = {}
        self._info_memo: dict[tuple[int, str], tuple[Any, ...]] = {}
        self._last_backbone: tuple[Any, ...] | None = None

    def __repr__(self) -> str:
        budget = "unbounded" if self.max_bytes is None else f"{self.max_bytes / 2**20:.0f} MiB"
        disk = f", disk_dir={str(self.disk_dir)!r}" if self.disk_dir else ""
        return f"TemplateCacheStore({len(self)} entries, {self.nbytes / 2**20:.1f} MiB of {budget}{disk})"

    # -- keys ------------------------------------------------------------------------------------------
    def key_for(self, pipeline: Any, template: str, inputs: Any, *, negative: bool = False) -> str | None:
        """The key of ``template`` with validated ``inputs`` on ``pipeline`` (a TemplatePipeline);
        ``None`` when this call cannot be cached."""
        plugins = pipeline.plugins
        plugin = plugins.get("template", template)
        if not getattr(plugin, "cacheable", True):
            return None
        info = self._template_info(plugins, template, plugin)
        version = info.version if info is not None else ""
        distribution = info.distribution if info is not None else ""
        cache_version = getattr(plugin, "cache_version", None)
        if cache_version is not None:
            cache_version = str(cache_version)
        if not version:  # registered in code: no distribution version, name the code instead
            klass = plugin if isinstance(plugin, type) else type(plugin)
            distribution = f"{distribution}:{klass.__module__}.{klass.__qualname__}"
        backbone = self._backbone(pipeline.adapter)
        memo_key = None
        if type(version) is str and type(distribution) is str:
            signature = _scalar_signature(inputs)
            if signature is not None:
                memo_key = (template, version, distribution, cache_version, backbone, bool(negative))
                memo_key += signature
                key = _key_memo.get(memo_key)
                if key is not None:
                    return key
        try:
            key = cache_key(
                template=template,
                version=version,
                distribution=distribution,
                cache_version=cache_version,
                inputs=inputs,
                backbone=backbone,
                negative=negative,
            )
        except Uncacheable:
            return None
        if memo_key is not None:
            if len(_key_memo) >= _KEY_MEMO_SIZE:
                _key_memo.clear()
            _key_memo[memo_key] = key
        return key

    def _backbone(self, adapter: Any) -> tuple[tuple[str, str], ...]:
        """``_backbone_items(adapter)``, with the last result remembered for as long as the adapter,
        its denoiser, the denoiser's config object and its first parameter's dtype stay the same
        (the same checks ``backbone_identity`` makes, with fewer objects touched per call). Held
        through weak references: a store shared by several pipelines keeps no model alive."""
        denoiser = adapter.denoiser
        last = self._last_backbone
        if last is not None and last[0]() is adapter and last[1]() is denoiser:
            owner = last[3]()
            param = owner._parameters.get(last[4]) if owner is not None else None
            if getattr(denoiser, "config", None) is last[2] and param is not None and param.dtype == last[5]:
                return last[6]
        items = _backbone_items(adapter)
        memo = _backbone_memo.get(denoiser)
        first = memo[3] if memo is not None else None
        param = first[0]._parameters.get(first[1]) if first is not None else None
        if param is not None and str(param.dtype) == items[3][1]:
            with contextlib.suppress(TypeError):  # not weakly referenceable: no memo
                self._last_backbone = (
                    weakref.ref(adapter),
                    weakref.ref(denoiser),
                    memo[0],
                    weakref.ref(first[0]),
                    first[1],
                    param.dtype,
                    items,
                )
        return items

    def _template_info(self, plugins: Any, template: str, plugin: Any) -> Any:
        """``plugins.info("template", template)``, remembered while the host, its list of infos and
        the loaded plugin object stay the same (the info's fields are read at every call: a new
        version there still changes the key)."""
        infos = plugins.infos
        memo = self._info_memo.get((id(plugins), template))
        if (
            memo is not None
            and memo[0]() is plugins
            and memo[1] is plugin
            and memo[2] is infos
            and memo[3] == len(infos)
        ):
            return memo[4]
        info = plugins.info("template", template)
        with contextlib.suppress(TypeError):  # a host that cannot be weakly referenced: no memo
            self._info_memo[(id(plugins), template)] = (weakref.ref(plugins), plugin, infos, len(infos), info)
        return info

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
        return None if caches is None else [_copy(c) for c in caches]

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
                    return [_copy(c) for c in caches]
                flight = self._flights.get(key)
                owner = flight is None
                if owner:
                    flight = self._flights[key] = _Flight()
            if not owner:
                flight.done.wait()
                if flight.result is not None:
                    with self._lock:
                        self.stats.hits += 1
                    return [_copy(c) for c in flight.result]
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
                return [_copy(c) for c in caches]
            finally:
                with self._lock:
                    self._flights.pop(key, None)
                flight.done.set()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._entries:
                return True
        return self.disk_dir is not None and (self.disk_dir / (key + _INDEX_SUFFIX)).is_file()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return self._nbytes

    def keys(self) -> list[str]:
        """Keys in memory, least recently used first."""
        with self._lock:
            return list(self._entries)

    def clear(self, *, disk: bool = False) -> None:
        """Forget every entry in memory (and on disk with ``disk=True``); reset the counters."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0
            self.stats = StoreStats()
        if disk and self.disk_dir is not None and self.disk_dir.is_dir():
            for path in self.disk_dir.iterdir():
                if path.suffix in (_INDEX_SUFFIX, ".safetensors"):
                    with contextlib.suppress(OSError):
                        path.unlink()

    # -- memory ----------------------------------------------------------------------------------------
    @staticmethod
    def _checked(caches: Any) -> list[TemplateCache]:
        if isinstance(caches, TemplateCache):
            caches = [caches]
        if not isinstance(caches, (list, tuple)) or not all(isinstance(c, TemplateCache) for c in caches):
            raise TypeError(f"a store entry is a list of TemplateCache objects, got {type(caches).__name__}")
        return list(caches)

    def _memory_get(self, key: str) -> list[TemplateCache] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[0]

    def _memory_put(self, key: str, caches: list[TemplateCache]) -> None:
        size = caches_nbytes(caches)
        old = self._entries.pop(key, None)
        if old is not None:
            self._nbytes -= old[1]
        if self.max_bytes is not None and size > self.max_bytes:
            return
        self._entries[key] = (caches, size)
        self._nbytes += size
        while self.max_bytes is not None and self._nbytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._nbytes -= evicted
            self.stats.evictions += 1

    # -- disk ------------------------------------------------------------------------------------------
    def _disk_get(self, key: str) -> list[TemplateCache] | None:
        if self.disk_dir is None:
            return None
        index = self.disk_dir / (key + _INDEX_SUFFIX)
        try:
            meta = json.loads(index.read_text())
        except (OSError, ValueError):
            return None
        try:
            if meta.get("format") != STORE_FORMAT:
                raise ValueError(f"store format {meta.get('format')!r}")
            caches = [TemplateCache.load(self.disk_dir / name) for name in meta["files"]]
            with contextlib.suppress(OSError):
                os.utime(index)  # least recently used goes first when the folder is over budget
            return caches
        except Exception:  # a broken or foreign entry is a miss; drop it so it is rewritten
            with self._lock:
                self.stats.disk_errors += 1
            self._disk_remove(key, meta.get("files", []) if isinstance(meta, dict) else [])
            return None

    def _disk_put(self, key: str, caches: list[TemplateCache]) -> None:
        if self.disk_dir is None or not all(_disk_safe(c) for c in caches):
            return
        files = []
        try:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            for i, cache in enumerate(caches):
                name = f"{key}-{i}.safetensors"
                tmp = self.disk_dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
                cache.save(tmp)
                os.replace(tmp, self.disk_dir / name)
                files.append(name)
            meta = {"format": STORE_FORMAT, "files": files, "carriers": [c.carrier for c in caches]}
            tmp = self.disk_dir / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, self.disk_dir / (key + _INDEX_SUFFIX))  # the entry exists from here on
        except Exception:  # e.g. tensors sharing memory, a full disk: memory still has the entry
            with self._lock:
                self.stats.disk_errors += 1
            for path in self.disk_dir.glob(f".{key}*.tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()
            return
        if self.disk_max_bytes is not None:
            self._disk_trim()

    def _disk_remove(self, key: str, files: list[str]) -> None:
        assert self.disk_dir is not None
        with contextlib.suppress(OSError):
            (self.disk_dir / (key + _INDEX_SUFFIX)).unlink()
        for name in files:
            with contextlib.suppress(OSError):
                (self.disk_dir / name).unlink()

    def _disk_trim(self) -> None:
        assert self.disk_dir is not None and self.disk_max_bytes is not None
        entries = []
        for index in self.disk_dir.glob("*" + _INDEX_SUFFIX):
            try:
                files = json.loads(index.read_text())["files"]
                size = sum((self.disk_dir / name).stat().st_size for name in files)
                entries.append((index.stat().st_mtime, index.name[: -len(_INDEX_SUFFIX)], files, size))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        total = sum(e[3] for e in entries)
        for _, key, files, size in sorted(entries):
            if total <= self.disk_max_bytes:
                break
            self._disk_remove(key, files)
            total -= size
