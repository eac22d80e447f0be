"""The conformance kit's companion: a tiny template that the kit composes with the one under test.

It is registered in code (``PluginHost.register``), never through an entry point, under the name
:data:`COMPANION`. It supports every backbone and produces, on the pipeline's first attention
layer, either two extra K/V tokens (``carrier="kv"``) or a rank-1 LoRA on a Linear of that layer
(``carrier="lora"``). Its values are small and seeded, so calls are deterministic.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusion_templates import (
    EncodeContext,
    KVCache,
    LoraCache,
    Template,
    TemplateInputs,
    UnsupportedError,
)
from pydantic import Field

COMPANION = "dt-conformance-companion"
CARRIERS = ("kv", "lora")
_LINEAR_NAMES = ("to_q", "to_k", "to_v", "to_out.0")


class CompanionInputs(TemplateInputs):
    carrier: Literal["kv", "lora"] = "kv"
    tokens: int = Field(2, ge=1, le=16)
    seed: int = 0


class CompanionTemplate(Template):
    Inputs = CompanionInputs
    carriers = CARRIERS
    backbones = ("*",)

    def encode(self, inputs: CompanionInputs, context: EncodeContext) -> KVCache | LoraCache:
        layers = context.adapter.attention_layers()
        if not layers:
            raise UnsupportedError(f"{COMPANION}: backbone {context.adapter.name!r} has no attention layers")
        first = next(iter(layers.values()))
        generator = torch.Generator().manual_seed(inputs.seed)
        if inputs.carrier == "kv":
            shape = (1, inputs.tokens, first.heads, first.head_dim)
            return KVCache(keys={first.name: torch.randn(shape, generator=generator)},
                           values={first.name: torch.randn(shape, generator=generator)})
        path, linear = _first_linear(first.module)
        if linear is None:
            raise UnsupportedError(f"{COMPANION}: attention layer {first.name!r} has no Linear for a LoRA")
        down = torch.randn(1, linear.in_features, generator=generator) / linear.in_features ** 0.5
        up = torch.randn(linear.out_features, 1, generator=generator) * 0.1
        module = f"{first.path}.{path}"
        return LoraCache(down={module: down}, up={module: up}, scaling={module: 1.0})


def _first_linear(module: torch.nn.Module) -> tuple[str, torch.nn.Linear | None]:
    for name in _LINEAR_NAMES:
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(sub, torch.nn.Linear):
            return name, sub
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear):
            return name, sub
    return "", None
