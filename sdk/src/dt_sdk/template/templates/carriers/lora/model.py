"""The {{ cookiecutter.name }} Template model: learned low-rank factors for a few Linear layers.

For every target Linear (path relative to the denoiser, e.g. ``transformer_blocks.0.attn.to_q``)
the model holds ``down`` (A, shape (rank, in)) and ``up`` (B, shape (out, rank)). Its output is
those factors and a per-module ``scaling = scale * alpha / rank``: the ``lora`` carrier adds
``B(A(x)) * scaling`` to the layer's output during the call and never writes the weights.

To make a Template model that *computes* the factors from richer inputs (an image, a colour),
replace ``forward`` with a network whose outputs are the factors; the rest stays the same.

It is a diffusers-style ``TemplateModel``: ``save_pretrained(folder)`` writes ``config.json`` and
safetensors weights, ``from_pretrained(folder)`` reads only those (never code or pickles).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusion_templates import TemplateModel
from torch import nn

# Fits the tiny test pipelines; the template sizes the model for the real pipeline it runs on.
DEFAULT_TARGETS = {"transformer_blocks.0.attn.to_q": [32, 32]}
# Which Linear children of each attention layer get a low-rank update.
TARGET_NAMES = ("to_q", "to_k", "to_v")


def module_key(path: str) -> str:
    """A ModuleDict key for a module path (module names may not contain dots)."""
    return path.replace(".", "__")


class LowRankFactors(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.empty(out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as PEFT initialises lora_A
        # PEFT starts B at zero so that training starts from the base model. Here it starts small
        # and random, so that the untrained template visibly does something (the conformance kit
        # checks that injecting it changes the output). Zero it before training if you prefer.
        nn.init.normal_(self.up, std=0.02)


class {{ cookiecutter.class_prefix }}Model(TemplateModel):
    """``scale`` -> low-rank factors and scalings for each target Linear."""

    @register_to_config
    def __init__(self, targets: dict[str, list[int]] | None = None, rank: int = 4, alpha: float = 4.0):
        super().__init__()
        self.targets = {path: (int(n_in), int(n_out)) for path, (n_in, n_out) in
                        dict(targets or DEFAULT_TARGETS).items()}
        self.factors = nn.ModuleDict({
            module_key(path): LowRankFactors(n_in, n_out, rank)
            for path, (n_in, n_out) in self.targets.items()
        })

    @classmethod
    def for_attention_layers(cls, attention_layers: Mapping[str, Any], **config: Any):
        """An untrained model targeting ``TARGET_NAMES`` in every attention layer that has them."""
        targets = {}
        for layer in attention_layers.values():
            for name in TARGET_NAMES:
                linear = getattr(layer.module, name, None)
                if isinstance(linear, nn.Linear):
                    targets[f"{layer.path}.{name}"] = [linear.in_features, linear.out_features]
        return cls(targets=targets, **config)

    def process_inputs(self, inputs, context=None) -> dict[str, Any]:
        """Stage 1 (no gradient): the validated inputs as ``forward`` arguments."""
        return {"scale": float(inputs.scale)}

    def forward(self, scale: float) -> dict[str, dict[str, Any]]:
        """Stage 2 (differentiable): ``{"down": {path: A}, "up": {path: B}, "scaling": {path: s}}``."""
        scaling = scale * self.config.alpha / self.config.rank
        down, up = {}, {}
        for path in self.targets:
            factors = self.factors[module_key(path)]
            down[path], up[path] = factors.down, factors.up
        return {"down": down, "up": up, "scaling": {path: scaling for path in self.targets}}
