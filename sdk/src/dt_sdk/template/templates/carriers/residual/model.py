"""The {{ cookiecutter.name }} Template model: token positions -> static per-block residuals.

For every block group of the denoiser (FLUX.1 ``double``/``single``, SD3 ``double``) the model makes
``count`` residuals, each ``(1, tokens, dim)``: a sinusoidal embedding of every token's index goes
through one Linear per residual. The ``residual`` carrier spreads ``count`` residuals over the
group's blocks (diffusers' interval rule) and adds them to the hidden states, as a ControlNet's.

To make residuals that depend on richer inputs (an image, a depth map), replace ``forward`` with a
network whose outputs are those tensors; the rest stays the same.

It is a diffusers-style ``TemplateModel``: ``save_pretrained(folder)`` writes ``config.json`` and
safetensors weights, ``from_pretrained(folder)`` reads only those (never code or pickles).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusion_templates import TemplateModel
from torch import nn

# Fits the tiny test pipelines; the template sizes the model for the real pipeline it runs on.
DEFAULT_GROUPS = {"double": [2, 32]}


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) -> (N, dim): cosines and sines of ``x`` at geometrically spaced frequencies."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=x.device) / half
    angles = x.float()[:, None] * torch.exp(-math.log(max_period) * exponent)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def module_key(group: str) -> str:
    """A ModuleDict key for a block group (``double`` would clash with ``nn.Module.double``)."""
    return f"group_{group}"


class {{ cookiecutter.class_prefix }}Model(TemplateModel):
    """``scale`` and a token count -> ``{group: [residual (1, tokens, dim)] * count}``."""

    @register_to_config
    def __init__(self, groups: dict[str, list[int]] | None = None, embed_dim: int = 64):
        super().__init__()
        self.groups = {group: (int(count), int(dim)) for group, (count, dim) in
                       dict(groups or DEFAULT_GROUPS).items()}
        self.to_residual = nn.ModuleDict({
            module_key(group): nn.ModuleList(nn.Linear(embed_dim, dim) for _ in range(count))
            for group, (count, dim) in self.groups.items()
        })
        for layers in self.to_residual.values():
            for layer in layers:
                # Small, so that the untrained template nudges the denoiser rather than wrecking it.
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    @classmethod
    def for_adapter(cls, adapter: Any, per_group: int = 2, **config: Any):
        """An untrained model with up to ``per_group`` residuals per block group of the backbone."""
        groups = {
            group: [min(slots.blocks, per_group), int(adapter.residual_shape(group, 0, None, None)[-1])]
            for group, slots in adapter.residual_slots().items()
        }
        return cls(groups=groups, **config)

    def process_inputs(self, inputs, context=None) -> dict[str, Any]:
        """Stage 1 (no gradient): the scale and the number of image tokens of the call's size."""
        if context is None:  # without a pipeline: the FLUX.1 token grid (16 x 16 pixels per token)
            tokens = (inputs.height // 16) * (inputs.width // 16)
        else:
            group = next(iter(self.groups))
            tokens = int(context.adapter.residual_shape(group, 0, inputs.height, inputs.width)[0])
        return {"scale": float(inputs.scale), "tokens": tokens}

    def forward(self, scale: float, tokens: int) -> dict[str, list[torch.Tensor]]:
        """Stage 2 (differentiable): ``{group: [(1, tokens, dim), ...]}``."""
        positions = sinusoidal_embedding(torch.arange(tokens, device=self.device), self.config.embed_dim)
        return {
            group: [layer(positions)[None] * scale for layer in self.to_residual[module_key(group)]]
            for group in self.groups
        }
