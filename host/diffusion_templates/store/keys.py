"""The store's keys: a SHA-256 over everything a Template cache depends on, equal across processes.

* the **template**: its name, and the version of the distribution that provides it (``PluginInfo``)
  plus the plugin's optional ``cache_version`` attribute (for plugins registered in code, which have
  no distribution version: bump ``cache_version`` when the template's output changes);
* the **validated inputs**: every field of the ``Inputs`` model after validation (so defaults
  count), dumped to canonical JSON; tensors, numpy arrays, PIL images and bytes inside them are
  hashed by content (dtype, shape and every byte), never by identity or ``repr``; a ``Path`` by its
  name and, for a regular file, its content (:func:`.files.file_digest`);
* the **backbone**: the adapter name, the denoiser class, a hash of the denoiser's config (without
  diffusers' bookkeeping entries such as ``_use_default_values``, whose order changes from process
  to process) and its dtype;
* the **weights** the template reads: a content digest of the pipeline components named by the
  plugin's ``reads`` (default: all of them), see :mod:`.weights`;
* the CFG branch (``negative``), since ``EncodeContext.negative`` is visible to ``encode``.

Nothing in a key depends on ``hash()``, set or dict iteration order or object identity, so two
processes sharing a disk folder compute the same keys. Invalidation is by key only: nothing is ever
looked up under another template version, backbone or set of weights, so a stale entry can waste
space but can never be applied.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import hashlib
import json
import math
import os
import stat
import threading
import uuid
import weakref
from collections.abc import Mapping
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from .. import __version__
from .files import file_digest

if TYPE_CHECKING:
    from ..backbones.base import BackboneAdapter

#: Bumped when the key recipe or the disk layout changes (old entries are then never looked up).
STORE_FORMAT = 2


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
        # A file input's key follows its content: the same name may hold other bytes tomorrow.
        return {"__path__": str(value), "sha256": _path_digest(value)}
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


def _path_digest(path: PurePath) -> str | None:
    """The content digest of a regular file at ``path``; ``None`` for anything else (a folder, nothing,
    a FIFO or a device: those are never opened)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return file_digest(path)
    except (OSError, ValueError):
        return None


def _config_value(value: Any) -> Any:
    """A JSON-able, process-independent form of one config value (sets sorted, tuples as lists)."""
    try:
        return canonical(value)
    except Uncacheable:  # an object in a config: its class names it (its repr may hold an address)
        return {"__object__": f"{type(value).__module__}.{type(value).__qualname__}"}


def config_digest(config: Any) -> str:
    """SHA-256 of a diffusers config without its bookkeeping entries (names starting with ``_``:
    ``_use_default_values`` lists the defaulted names in set order, which changes with
    ``PYTHONHASHSEED``; ``_name_or_path``, ``_class_name`` and ``_diffusers_version`` say where the
    model came from, not what it computes)."""
    items = {str(k): _config_value(v) for k, v in dict(config or {}).items() if not str(k).startswith("_")}
    return _digest(_dumps(items).encode())


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
        klass = type(denoiser)
        name = f"{klass.__module__}.{klass.__qualname__}"
        memo = (config, config_digest(config), name, _first_parameter(denoiser), {})
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
    weights: str = "",
) -> str:
    """The store key (64 hex digits) of one template call. Raises :class:`Uncacheable`.

    The SHA-256 of the record's canonical JSON (sorted keys)::

        {"backbone": backbone, "cache_version": ..., "distribution": ..., "host": __version__,
         "inputs": canonical(inputs), "negative": ..., "store": STORE_FORMAT, "template": ...,
         "version": ..., "weights": weights}

    ``weights`` is :func:`.weights.pipeline_weights` of the components the template reads.

    Everything but the inputs is the same from call to call, so its JSON before and after the
    inputs is built once (:func:`_record_text`) and only the inputs are dumped per call.
    """
    backbone = backbone if isinstance(backbone, tuple) else tuple(backbone.items())
    parts = (template, version, distribution, cache_version, backbone, bool(negative), weights)
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
    weights: str,
) -> tuple[bytes, bytes]:
    """The key record's JSON before and after the inputs' dump (see :func:`cache_key`): what
    ``json.dumps(record, sort_keys=True, separators=(",", ":"))`` writes, keys in sorted order."""
    head = (
        f'{{"backbone":{_dumps(dict(backbone))},"cache_version":{_dumps(cache_version)},'
        f'"distribution":{_dumps(distribution)},"host":{_dumps(__version__)},"inputs":'
    )
    tail = (
        f',"negative":{_dumps(negative)},"store":{_dumps(STORE_FORMAT)},'
        f'"template":{_dumps(template)},"version":{_dumps(version)},"weights":{_dumps(weights)}}}'
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
