"""The {{ cookiecutter.name }} Template model: a value encoder that produces extra attention K/V.

In the style of the Diffusion Templates paper, a scalar input becomes tokens that the base
model's attention layers attend to::

    scale -> sinusoidal embedding  ┐
    token index -> sinusoidal emb. ┴-> Linear -> SiLU -> Linear (one per attention layer)
                                                          -> (tokens, heads, head_dim) keys and values

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
DEFAULT_LAYERS = {"double_0": [2, 16]}


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) -> (N, dim): cosines and sines of ``x`` at geometrically spaced frequencies."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=x.device) / half
    angles = x.float()[:, None] * torch.exp(-math.log(max_period) * exponent)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def module_key(layer: str) -> str:
    """A ModuleDict key for an adapter's layer name (module names may not contain dots)."""
    return layer.replace(".", "__")


class {{ cookiecutter.class_prefix }}Model(TemplateModel):
    """``scale`` (B,) and a token count -> per-layer keys and values, each (B, tokens, heads, head_dim)."""

    @register_to_config
    def __init__(
        self, layers: dict[str, list[int]] | None = None, embed_dim: int = 64, hidden_dim: int = 128
    ):
        super().__init__()
        self.layers = {name: (int(heads), int(head_dim)) for name, (heads, head_dim) in
                       dict(layers or DEFAULT_LAYERS).items()}
        self.embed = nn.Sequential(nn.Linear(2 * embed_dim, hidden_dim), nn.SiLU())
        self.to_kv = nn.ModuleDict({
            module_key(name): nn.Linear(hidden_dim, 2 * heads * head_dim)
            for name, (heads, head_dim) in self.layers.items()
        })

    @classmethod
    def for_attention_layers(cls, attention_layers: Mapping[str, Any], **config: Any):
        """An untrained model with one K/V head per attention layer of a backbone adapter."""
        layers = {name: [layer.heads, layer.head_dim] for name, layer in attention_layers.items()}
        return cls(layers=layers, **config)

    def process_inputs(self, inputs, context=None) -> dict[str, Any]:
        """Stage 1 (no gradient): the validated inputs as ``forward`` arguments."""
        return {"scale": torch.tensor([inputs.scale], device=self.device), "tokens": inputs.tokens}

    def forward(self, scale: torch.Tensor, tokens: int) -> dict[str, dict[str, torch.Tensor]]:
        """Stage 2 (differentiable): ``{"keys": {layer: k}, "values": {layer: v}}``."""
        embed_dim = self.config.embed_dim
        # scale lives in [0, 2]: stretch it as diffusion models stretch guidance, so that the
        # embedding's frequencies resolve it.
        scale_emb = sinusoidal_embedding(scale * 1000, embed_dim)  # (B, E)
        index_emb = sinusoidal_embedding(torch.arange(tokens, device=scale.device), embed_dim)  # (L, E)
        batch = scale.shape[0]
        x = torch.cat([scale_emb[:, None].expand(batch, tokens, embed_dim),
                       index_emb[None].expand(batch, tokens, embed_dim)], dim=-1)
        hidden = self.embed(x)  # (B, L, hidden)
        keys, values = {}, {}
        for name, (heads, head_dim) in self.layers.items():
            kv = self.to_kv[module_key(name)](hidden).view(batch, tokens, 2, heads, head_dim)
            keys[name], values[name] = kv.unbind(dim=2)
        return {"keys": keys, "values": values}
