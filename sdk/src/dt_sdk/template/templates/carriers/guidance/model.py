"""The {{ cookiecutter.name }} Template model: a learned calibration of the guidance target.

The ``guidance`` carrier needs no per-layer tensors, only a target and a strength, so the model is
small: it maps the requested ``target`` and ``strength`` to the values that go into the cache::

    target   -> clamp(target * target_gain + target_bias, 0, 1)
    strength -> strength * scale * strength_gain

Untrained (gains 1, bias 0) it passes them through. Train it to calibrate what users ask for
against what the pipeline produces, or replace ``forward`` with a network that computes the target
from richer inputs (an image, a colour); the template stays the same.

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
    """``target`` and ``strength`` (B,) -> the guidance term's target and strength, each (B,)."""

    @register_to_config
    def __init__(self, kind: str = "luminance"):
        super().__init__()
        self.target_gain = nn.Parameter(torch.ones(1))
        self.target_bias = nn.Parameter(torch.zeros(1))
        self.strength_gain = nn.Parameter(torch.ones(1))

    def process_inputs(self, inputs, context=None) -> dict[str, Any]:
        """Stage 1 (no gradient): the validated inputs as ``forward`` arguments."""
        return {
            "target": torch.tensor([inputs.target], device=self.device),
            "strength": torch.tensor([inputs.strength * inputs.scale], device=self.device),
        }

    def forward(self, target: torch.Tensor, strength: torch.Tensor) -> dict[str, Any]:
        """Stage 2 (differentiable): ``{"kind": ..., "target": (B,), "strength": (B,)}``."""
        return {
            "kind": self.config.kind,
            "target": (target * self.target_gain + self.target_bias).clamp(0.0, 1.0),
            "strength": (strength * self.strength_gain).clamp(min=0.0),
        }
