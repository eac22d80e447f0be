"""The ``kv`` carrier: extra keys/values appended to chosen attention layers.

Cache: per attention layer (the adapter's names, e.g. ``double_0``/``single_3`` on FLUX), key and
value tensors shaped (B, L, heads, head_dim). They are appended on the sequence axis after RoPE and
carry no position, as DiffSynth-Studio's FLUX.2 DiT concatenates ``kv_cache``. A batch of 1 applies
to every image of the call.
Merge: concatenation along the sequence axis per layer; a layer present in only some caches keeps
that cache's tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import model_validator

from ..attention import AttentionPoint, KVEntry, check_layer, point_for
from ..cache import TemplateCache
from ..context import InjectionTarget
from ..errors import CacheError, CarrierConflictError
from ..injection import Injection
from ..limits import check_kv_tokens, check_magnitudes, max_kv_magnitude, max_kv_tokens
from .base import Carrier, joined_template_names


class KVCache(TemplateCache):
    carrier: ClassVar[str] = "kv"

    keys: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]

    @model_validator(mode="after")
    def _check_shapes(self) -> KVCache:
        if set(self.keys) != set(self.values):
            raise ValueError(
                f"kv cache: layers with keys {sorted(self.keys)} differ from layers with values "
                f"{sorted(self.values)}"
            )
        for layer, k in self.keys.items():
            v = self.values[layer]
            if k.ndim != 4 or v.ndim != 4:
                raise ValueError(
                    f"kv cache layer {layer!r}: keys and values must be (B, L, heads, head_dim), "
                    f"got {tuple(k.shape)} and {tuple(v.shape)}"
                )
            if k.shape != v.shape:
                raise ValueError(
                    f"kv cache layer {layer!r}: keys {tuple(k.shape)} and values {tuple(v.shape)} differ"
                )
            if not k.is_floating_point():
                raise ValueError(f"kv cache layer {layer!r}: expected floating tensors, got {k.dtype}")
        return self

    def length(self, layer: str) -> int:
        return self.keys[layer].shape[1]

    def check_values(self) -> None:
        """Keys and values finite, |value| at most ``DT_MAX_KV_MAGNITUDE``."""
        fields = {"keys": self.keys, "values": self.values}
        check_magnitudes(self.describe, fields, max_kv_magnitude(), "DT_MAX_KV_MAGNITUDE")


def _first_parameter(module: torch.nn.Module) -> torch.Tensor:
    """``next(module.parameters())`` (the same parameter: depth first, own parameters first)
    without building torch's generator chain, a few µs per attention layer and call."""
    found = _first_parameter_or_none(module)
    return found if found is not None else next(module.parameters())  # StopIteration, as before


def _first_parameter_or_none(module: torch.nn.Module) -> torch.Tensor | None:
    for param in module._parameters.values():
        if param is not None:
            return param
    for child in module._modules.values():
        if child is not None:
            found = _first_parameter_or_none(child)
            if found is not None:
                return found
    return None


class KVInjection(Injection):
    """Attaches each layer's K/V to that module's attention point (``attention.py``) for one call.

    The K/V reach the rows of ``target.branch`` in each denoiser call (``call.layout``): the whole
    batch when the call computes that branch only, its rows (the batch split at the attention call)
    with batched CFG, nothing when the call has no such rows.
    """

    def __init__(
        self, layers: dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]], target: InjectionTarget
    ):
        self.layers = layers
        self.target = target
        self._attached: list[tuple[AttentionPoint, KVEntry]] = []

    def apply(self) -> None:
        for name, (module, key, value) in self.layers.items():
            point = point_for(module, name)
            entry = KVEntry(key, value, self.target.branch, self.target.call)
            self._attached.append((point, entry))  # first: remove() undoes an attach that raised late
            point.attach(entry)

    def remove(self) -> None:
        while self._attached:
            point, entry = self._attached.pop()
            point.detach(entry)


class KVCarrier(Carrier):
    name = "kv"
    cache_class = KVCache

    def merge_caches(self, caches: list[KVCache]) -> KVCache:
        keys: dict[str, list[torch.Tensor]] = {}
        values: dict[str, list[torch.Tensor]] = {}
        for cache in caches:
            for layer in cache.keys:
                keys.setdefault(layer, []).append(cache.keys[layer])
                values.setdefault(layer, []).append(cache.values[layer])
        merged_k, merged_v = {}, {}
        for layer in keys:
            shapes = {tuple(t.shape[2:]) for t in keys[layer]}
            if len(shapes) > 1:
                raise CarrierConflictError(
                    f"kv caches disagree on (heads, head_dim) at layer {layer!r}: {sorted(shapes)}"
                )
            batches = {t.shape[0] for t in keys[layer]} - {1}
            if len(batches) > 1:
                raise CarrierConflictError(f"kv caches have batch sizes {sorted(batches)} at layer {layer!r}")
            batch = batches.pop() if batches else 1
            dtype = keys[layer][0].dtype
            merged_k[layer] = torch.cat([t.expand(batch, *t.shape[1:]).to(dtype) for t in keys[layer]], dim=1)
            merged_v[layer] = torch.cat(
                [t.expand(batch, *t.shape[1:]).to(dtype) for t in values[layer]], dim=1
            )
        return KVCache(keys=merged_k, values=merged_v, template=joined_template_names(caches))

    def injection(self, cache: KVCache, target: InjectionTarget) -> KVInjection:
        available = target.adapter.attention_layers()
        unknown = sorted(set(cache.keys) - set(available))
        if unknown:
            raise CacheError(
                f"kv cache from template {cache.template!r} names attention layers {unknown} that "
                f"{target.adapter.name!r} does not have; its layers are {list(available)}"
            )
        limit = max_kv_tokens()
        for name, k in cache.keys.items():  # before any cast or copy: refuse absurd lengths up front
            if k.shape[1] > limit:
                check_kv_tokens(cache.template, name, k.shape[1])
        images = target.images  # per-image caches, counted in images (never CFG-doubled rows)
        for name, k in cache.keys.items():
            if images is not None and k.shape[0] not in (1, images):
                raise CacheError(
                    f"kv cache from template {cache.template!r}, layer {name!r}: batch {k.shape[0]}, the "
                    f"call makes {images} image(s); give 1 (it applies to every image) or {images} "
                    "(one per image)"
                )
        layers = {}
        for name, k in cache.keys.items():
            layer = available[name]
            if k.shape[2:] != (layer.heads, layer.head_dim):
                raise CacheError(
                    f"kv cache from template {cache.template!r}, layer {name!r}: (heads, head_dim) is "
                    f"{tuple(k.shape[2:])}, the {target.adapter.name!r} layer expects "
                    f"({layer.heads}, {layer.head_dim})"
                )
            # Before denoising: a processor whose attention call the host cannot reach would ignore the K/V.
            check_layer(name, layer.module, what=f"kv cache from template {cache.template!r}")
            param = _first_parameter(layer.module)
            cast = {"device": param.device, "dtype": param.dtype}
            layers[name] = (layer.module, k.to(**cast), cache.values[name].to(**cast))
        return KVInjection(layers, target)
