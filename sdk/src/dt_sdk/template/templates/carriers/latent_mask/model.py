"""The {{ cookiecutter.name }} Template model: a learned refinement of the user's mask.

The ``latent_mask`` carrier takes a mask and a picture. The model maps the validated mask to the
mask that goes into the cache::

    mask -> clamp(mask * mask_gain + mask_bias, 0, 1)

Untrained (gain 1, bias 0) it passes the mask through. Train it (or replace ``forward`` with a
network, e.g. one that grows or feathers the mask from the picture); the template stays the same.

It is a diffusers-style ``TemplateModel``: ``save_pretrained(folder)`` writes ``config.json`` and
safetensors weights, ``from_pretrained(folder)`` reads only those (never code or pickles).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusion_templates import TemplateModel
from torch import nn


class {{ cookiecutter.class_prefix }}Model(TemplateModel):
    """``image`` (B, 3, H, W) and ``mask`` (B, 1, H, W) -> the cache's image and mask."""

    @register_to_config
    def __init__(self, init_gain: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.mask_gain = nn.Parameter(torch.full((1,), float(init_gain)))
        self.mask_bias = nn.Parameter(torch.full((1,), float(init_bias)))

    def process_inputs(self, inputs, context=None) -> dict[str, Any]:
        """Stage 1 (no gradient): the validated inputs as ``forward`` arguments."""
        return {"image": inputs.image.to(self.device), "mask": inputs.mask.to(self.device)}

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage 2 (differentiable): ``{"image": (B, 3, H, W), "mask": (B, 1, H, W)}``."""
        return {"image": image, "mask": (mask * self.mask_gain + self.mask_bias).clamp(0.0, 1.0)}
