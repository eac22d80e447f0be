"""Template caches: the one interface between Template models and carriers.

A cache is a pydantic model holding tensors, one class per carrier. It saves to a single
safetensors file: tensor fields (a tensor, or a ``dict[str, Tensor]``) become tensors named
``field/key``; every other field is stored as JSON in the file's metadata. Loading never unpickles.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from . import limits
from .errors import CacheError

FORMAT_VERSION = 1
_METADATA_KEY = "diffusion_templates.cache"


class TemplateCache(BaseModel):
    """Base of every typed Template cache. Subclasses set ``carrier`` and declare their fields."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    carrier: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[TemplateCache]]] = {}

    #: Tensor fields that may hold integer or bool tensors; every other tensor field of a loaded cache
    #: must be floating point (a file with an int tensor there is refused before it is read).
    integer_fields: ClassVar[frozenset[str]] = frozenset()

    template: str | None = None
    """Name of the template that produced the cache (provenance; merged caches join names with '+')."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("carrier"):
            TemplateCache._registry[cls.carrier] = cls

    @classmethod
    def class_for(cls, carrier: str) -> type[TemplateCache]:
        """The cache class of ``carrier``, importing the carrier plugin that defines it if needed."""
        if not isinstance(carrier, str):
            raise CacheError(f"carrier names are strings, got {carrier!r}")
        if carrier not in cls._registry:  # importing the carrier plugin registers its cache class
            from .errors import PluginError
            from .plugins import default_host

            try:
                default_host().get("carrier", carrier)
            except PluginError:
                pass
        try:
            return cls._registry[carrier]
        except KeyError:
            raise CacheError(f"no cache class is registered for carrier {carrier!r}") from None

    # -- tensors -----------------------------------------------------------------------------
    def tensor_fields(self) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) or (
                isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())
            ):
                out[name] = value
        return out

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        flat: dict[str, torch.Tensor] = {}
        for name, value in self.tensor_fields().items():
            if isinstance(value, torch.Tensor):
                flat[name] = value
            else:
                for key, tensor in value.items():
                    flat[f"{name}/{key}"] = tensor
        return flat

    def describe(self) -> str:
        """How errors name this cache: ``"kv cache from template 'x'"``."""
        return f"{self.carrier or type(self).__name__} cache from template {self.template!r}"

    def check_values(self) -> None:
        """Refuse values a carrier must not inject: here NaN or infinity in any floating tensor.

        Each carrier's cache class adds its bounds (``limits.py``: magnitudes, [0, 1] ranges, scalar
        settings). The host calls it for every cache before merging and injecting (``Carrier``'s
        hooks), whatever made the cache: a plugin's encode, a file, the user. Cheap on caches seen
        before: each tensor is measured once per version (:func:`limits.value_ranges`).
        """
        floating = {k: t for k, t in self.flat_tensors().items() if t.is_floating_point()}
        limits.check_finite(self.describe, floating)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat_tensors().values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TemplateCache:
        """A copy with every floating tensor moved/cast (integer tensors keep their dtype)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        update = {}
        for name, value in self.tensor_fields().items():
            update[name] = (
                move(value) if isinstance(value, torch.Tensor) else {k: move(v) for k, v in value.items()}
            )
        return self.model_copy(update=update)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to one safetensors file (tensors + JSON metadata)."""
        tensor_names = set(self.tensor_fields())
        fields = self.model_dump(mode="json", exclude=tensor_names)
        # Record which tensor fields were dicts, so an empty-but-present dict round-trips too.
        layout = {
            n: ("tensor" if isinstance(v, torch.Tensor) else "dict") for n, v in self.tensor_fields().items()
        }
        meta = {"format": FORMAT_VERSION, "carrier": self.carrier, "fields": fields, "layout": layout}
        try:  # NaN/Infinity are not JSON: a file holding them could not be loaded again
            text = json.dumps(meta, allow_nan=False)
        except ValueError:
            raise CacheError(f"{self.describe()}: a field holds NaN or infinity: {fields}") from None
        flat = self.flat_tensors()
        for key, tensor in flat.items():
            if tensor.is_floating_point() and tensor.element_size() == 1:
                raise CacheError(
                    f"{self.describe()}: tensor {key!r} is {tensor.dtype}; cache files hold "
                    f"{', '.join(sorted(_FLOAT_DTYPES))} floating tensors (cast it first)"
                )
        tensors = {k: v.detach().contiguous().cpu() for k, v in flat.items()}
        save_file(tensors, os.fspath(path), metadata={_METADATA_KEY: text})

    @classmethod
    def load(cls, path: str | os.PathLike) -> TemplateCache:
        """Read a cache written by :meth:`save`. Only safetensors is parsed: nothing is executed.

        The file is untrusted: its safetensors header is parsed and checked here first (length,
        JSON, every tensor's dtype, shape and byte range against the file size, the total against
        ``DT_MAX_CACHE_BYTES``), then the metadata and tensor names against the cache class, all
        before any tensor is read; loaded floating tensors must be finite. Anything wrong is a
        :class:`CacheError` naming the file and the problem.
        """
        path = os.fspath(path)
        entries, header_meta = _read_header(path)
        meta = _cache_metadata(path, header_meta)
        try:
            target = cls.class_for(meta["carrier"]) if cls is TemplateCache else cls
        except CacheError as exc:
            raise CacheError(f"{path}: {exc}") from None
        if target.carrier != meta["carrier"]:
            raise CacheError(f"{path}: holds a {meta['carrier']!r} cache, not {target.carrier!r}")
        layout: dict[str, str] = meta["layout"]
        fields = target.model_fields
        for name in layout:
            if name not in fields:
                raise CacheError(f"{path}: {target.__name__} has no tensor field {name!r}")
        for key, (dtype, _, _, _) in entries.items():
            name = _field_of(key, layout)
            if name is None:
                raise CacheError(f"{path}: tensor {key!r} belongs to no tensor field {sorted(layout)}")
            if dtype not in _FLOAT_DTYPES and name not in target.integer_fields:
                raise CacheError(
                    f"{path}: tensor {key!r} is {dtype}; field {name!r} of {target.__name__} needs "
                    f"floating point ({', '.join(sorted(_FLOAT_DTYPES))})"
                )
        for name, kind in layout.items():
            if kind == "tensor" and name not in entries:
                raise CacheError(f"{path}: tensor field {name!r} has no tensor in the file")
        tensors = _read_tensors(path, entries)
        values: dict[str, Any] = dict(meta["fields"])
        for name, kind in layout.items():
            if kind == "tensor":
                values[name] = tensors.pop(name)
            else:
                prefix = name + "/"
                values[name] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            return target.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<cache>'}: {e['msg']}" for e in exc.errors()
            )
            raise CacheError(f"{path}: not a valid {target.__name__}: {problems}") from None


# -- reading untrusted files -----------------------------------------------------------------------------
# safetensors dtype -> bytes per element. Caches hold floating tensors; integer and bool tensors are
# allowed only in fields a cache class lists in ``integer_fields``. Other dtypes are refused, float8
# (F8_E4M3, F8_E5M2) included: torch has no reductions for them, so their values cannot be checked.
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_INT_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ITEMSIZE = {**_FLOAT_DTYPES, **_INT_DTYPES}

#: name -> (dtype, shape, begin, end) as the header declares them (offsets relative to the data)
_Entries = dict[str, tuple[str, tuple[int, ...], int, int]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_header(path: str) -> tuple[_Entries, dict[str, str]]:
    """Parse and check a safetensors header without reading any tensor data.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor data. Each
    tensor's ``data_offsets`` must lie in the data, match ``numel * itemsize`` and, all together,
    cover the data exactly (as safetensors requires); the declared bytes must stay under
    ``DT_MAX_CACHE_BYTES``.
    """

    def bad(problem: str) -> CacheError:
        return CacheError(f"{path}: unreadable cache file: {problem}")

    limit = limits.max_cache_bytes()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"truncated: {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > size - 8:
                raise bad(
                    f"header length {n} bytes runs past the end of the file ({size} bytes): "
                    "truncated file or lying header"
                )
            if n > limits.MAX_HEADER_BYTES:
                raise bad(f"header of {n} bytes, more than {limits.MAX_HEADER_BYTES}")
            raw = f.read(n)
    except OSError as exc:
        raise bad(str(exc)) from exc
    if len(raw) != n:
        raise bad(f"truncated header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("header __metadata__ must map strings to strings")
    data_size = size - 8 - n
    entries: _Entries = {}
    total = 0
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: header entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise bad(f"tensor {name!r}: dtype {dtype!r} is not allowed (allowed: {', '.join(_ITEMSIZE)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if (
            not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets))
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r}: data_offsets {offsets!r} must be two integers 0 <= begin <= end")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * _ITEMSIZE[dtype]
        if nbytes > limit:
            raise bad(
                f"tensor {name!r}: shape {shape} of {dtype} declares {nbytes} bytes, more than the limit "
                f"of {limit} bytes (DT_MAX_CACHE_BYTES)"
            )
        begin, end = offsets
        if end - begin != nbytes:
            raise bad(
                f"tensor {name!r}: data_offsets [{begin}, {end}] span {end - begin} bytes, but shape "
                f"{shape} of {dtype} needs {nbytes}: lying header"
            )
        if end > data_size:
            raise bad(
                f"tensor {name!r}: data_offsets [{begin}, {end}] run past the end of the data "
                f"({data_size} bytes): truncated file or lying header"
            )
        total += nbytes
        if total > limit:
            raise bad(f"tensors declare more than {limit} bytes in total (DT_MAX_CACHE_BYTES)")
        entries[name] = (dtype, tuple(shape), begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise bad(
                f"tensor {name!r} starts at byte {begin} of the data, expected {position} "
                "(tensors must be contiguous and must not overlap)"
            )
        position = end
    if position != data_size:
        raise bad(f"tensors cover {position} bytes but the file holds {data_size} bytes of data")
    return entries, metadata


def _refuse_constant(name: str) -> Any:
    """``json.loads`` accepts NaN, Infinity and -Infinity by default; JSON has no such numbers."""
    raise ValueError(f"{name} is not a JSON number (values must be finite)")


def _cache_metadata(path: str, header_meta: dict[str, str]) -> dict[str, Any]:
    """The Diffusion Templates metadata of a cache file, checked for shape."""
    raw = header_meta.get(_METADATA_KEY)
    if raw is None:
        raise CacheError(f"{path}: not a Diffusion Templates cache (no {_METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise CacheError(f"{path}: unreadable cache metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise CacheError(f"{path}: cache metadata is a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT_VERSION:
        raise CacheError(f"{path}: cache format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    if not isinstance(meta.get("carrier"), str):
        raise CacheError(f"{path}: cache metadata names no carrier (got {meta.get('carrier')!r})")
    meta.setdefault("fields", {})
    meta.setdefault("layout", {})
    if not isinstance(meta["fields"], dict):
        raise CacheError(f"{path}: cache metadata 'fields' must be an object")
    layout = meta["layout"]
    if not isinstance(layout, dict) or not all(kind in ("tensor", "dict") for kind in layout.values()):
        raise CacheError(f"{path}: cache metadata 'layout' must map field names to 'tensor' or 'dict'")
    return meta


def _field_of(key: str, layout: dict[str, str]) -> str | None:
    if layout.get(key) == "tensor":
        return key
    name = key.split("/", 1)[0]
    return name if "/" in key and layout.get(name) == "dict" else None


def _read_tensors(path: str, entries: _Entries) -> dict[str, torch.Tensor]:
    """Read the tensors the checked header declared; floating ones must be finite."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt") as f:
            if set(f.keys()) != set(entries):
                raise CacheError(f"{path}: the file changed while it was read")
            for key, (dtype, shape, _, _) in entries.items():
                sliced = f.get_slice(key)  # dtype and shape only: no data read yet
                if sliced.get_dtype() != dtype or tuple(sliced.get_shape()) != shape:
                    raise CacheError(f"{path}: the file changed while it was read")
                tensors[key] = f.get_tensor(key)
    except CacheError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CacheError(f"{path}: unreadable cache file: {exc}") from exc
    floating = [key for key, tensor in tensors.items() if tensor.is_floating_point()]
    # One aminmax per tensor (remembered: the carrier's bound check reuses it); counted only if bad.
    for key, (low, high) in zip(floating, limits.value_ranges([tensors[k] for k in floating]), strict=True):
        if not (math.isfinite(low) and math.isfinite(high)):
            tensor = tensors[key]
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            raise CacheError(f"{path}: tensor {key!r} holds {bad} NaN/Inf value(s) of {tensor.numel()}")
    return tensors
