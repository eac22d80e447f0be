"""Test-only template plugins emitting kv and lora caches with seeded random content.

Installed for the test session through a real ``*.dist-info`` with entry points (see
``tests/conftest.py``), so the host finds them exactly as it finds a pip-installed plugin.
"""

from __future__ import annotations

import torch
from pydantic import Field

from diffusion_templates import KVCache, LoraCache, Template, TemplateInputs


class KVInputs(TemplateInputs):
    scale: float = Field(1.0, ge=0.0, le=4.0, description="multiplies the random keys and values")
    length: int = Field(3, ge=1, le=4096, description="extra tokens per layer")
    seed: int = 0
    layers: list[str] | None = Field(None, description="attention layers to reach (default: all)")
    head_dim: int | None = Field(None, description="override the head dim (to provoke a mismatch)")
    batch: int = Field(1, ge=1)


class TestKV(Template):
    """Seeded random extra keys/values for every attention layer."""

    Inputs = KVInputs
    carriers = ("kv",)

    def encode(self, inputs: KVInputs, context) -> KVCache:
        generator = torch.Generator().manual_seed(inputs.seed)
        keys, values = {}, {}
        for name, layer in context.adapter.attention_layers().items():
            if inputs.layers is not None and name not in inputs.layers:
                continue
            shape = (inputs.batch, inputs.length, layer.heads, inputs.head_dim or layer.head_dim)
            keys[name] = torch.randn(shape, generator=generator) * inputs.scale
            values[name] = torch.randn(shape, generator=generator) * inputs.scale
        for name in inputs.layers or ():  # unknown names pass through, for error tests
            if name not in keys:
                keys[name] = values[name] = torch.zeros(1, inputs.length, 2, 16)
        return KVCache(keys=keys, values=values)


class LoraInputs(TemplateInputs):
    targets: list[str] = Field(default_factory=lambda: ["transformer_blocks.0.attn.to_q"])
    rank: int = Field(4, ge=1, le=64)
    scale: float = Field(1.0, ge=-4.0, le=4.0)
    seed: int = 0


class TestLora(Template):
    """Seeded random low-rank deltas on the given Linear modules."""

    Inputs = LoraInputs
    carriers = ("lora",)

    def encode(self, inputs: LoraInputs, context) -> LoraCache:
        return random_lora(context.adapter.denoiser, inputs.targets, inputs.rank, inputs.seed, inputs.scale)


def random_lora(
    denoiser: torch.nn.Module,
    targets: list[str],
    rank: int,
    seed: int,
    scale: float = 1.0,
    template: str | None = None,
) -> LoraCache:
    generator = torch.Generator().manual_seed(seed)
    down, up = {}, {}
    for path in targets:
        try:
            module = denoiser.get_submodule(path)
            features_in, features_out = module.in_features, module.out_features
        except AttributeError:  # a target the denoiser lacks: let the carrier report it
            features_in = features_out = 16
        down[path] = torch.randn(rank, features_in, generator=generator) * 0.3
        up[path] = torch.randn(features_out, rank, generator=generator) * 0.3
    return LoraCache(down=down, up=up, scaling={p: scale for p in targets}, template=template)


class FlakyInputs(TemplateInputs):
    fail_in: str = Field("encode", pattern="^(encode|to_cache|type)$")


class TestFlaky(Template):
    """Fails on purpose: raises in encode or to_cache, or returns the wrong type."""

    Inputs = FlakyInputs
    carriers = ("kv",)

    def encode(self, inputs: FlakyInputs, context):
        if inputs.fail_in == "encode":
            raise RuntimeError("boom in encode")
        return inputs.fail_in

    def to_cache(self, representation, context):
        if representation == "to_cache":
            raise RuntimeError("boom in to_cache")
        return {"not": "a cache"}
