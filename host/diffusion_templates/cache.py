"""Template caches: the one interface between Template models and carriers.

A cache is a pydantic model holding tensors, one class per carrier. It saves to a single
safetensors file: tensor fields (a tensor, or a ``dict[str, Tensor]``) become tensors named
``field/key``; every other field is stored as JSON in the file's metadata. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CacheError

FORMAT_VERSION = 1
_METADATA_KEY = "diffusion_templates.cache"


class TemplateCache(BaseModel):
    """Base of every typed Template cache. Subclasses set ``carrier`` and declare their fields."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    carrier: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[TemplateCache]]] = {}

    template: str | None = None
    """Name of the template that produced the cache (provenance; merged caches join names with '+')."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("carrier"):
            TemplateCache._registry[cls.carrier] = cls

    @classmethod
    def class_for(cls, carrier: str) -> type[TemplateCache]:
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
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.flat_tensors().items()}
        save_file(tensors, os.fspath(path), metadata={_METADATA_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> TemplateCache:
        """Read a cache written by :meth:`save`. Only safetensors is parsed: nothing is executed."""
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                raw = header.get(_METADATA_KEY)
                if raw is None:
                    raise CacheError(
                        f"{path}: not a Diffusion Templates cache (no {_METADATA_KEY!r} metadata)"
                    )
                meta = json.loads(raw)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except CacheError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CacheError(f"{path}: unreadable cache file: {exc}") from exc
        if meta.get("format") != FORMAT_VERSION:
            raise CacheError(f"{path}: cache format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        target = cls.class_for(meta["carrier"]) if cls is TemplateCache else cls
        if target.carrier != meta["carrier"]:
            raise CacheError(f"{path}: holds a {meta['carrier']!r} cache, not {target.carrier!r}")
        values: dict[str, Any] = dict(meta["fields"])
        for name, kind in meta.get("layout", {}).items():
            if kind == "tensor":
                values[name] = tensors.pop(name)
            else:
                prefix = name + "/"
                values[name] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        return target.model_validate(values)
