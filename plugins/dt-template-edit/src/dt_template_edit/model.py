"""The edit Template model: reference-image K/V from the frozen base model, with trainable gains.

Split as the paper's two-stage training needs:

* ``process_inputs`` (no gradient, the frozen base model): the host's reference capture
  (:func:`diffusion_templates.reference.capture_reference_kv`) VAE-encodes the picture and runs the
  denoiser once on its clean tokens, returning every attention layer's post-RoPE keys and values;
* ``forward`` (differentiable): one key gain and one value gain per attention layer and head,
  ``k * key_gain``, ``v * value_gain``. Untrained, every gain is exactly 1, so the keys and values are
  the captured ones, bit for bit (``Flux2KleinKVPipeline``'s).

A diffusers-style ``TemplateModel``: ``save_pretrained`` writes config.json and safetensors,
``from_pretrained`` reads only those.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusion_templates import TemplateModel
from torch import nn

# Fits the tiny test pipelines; the template sizes the model for the pipeline it runs on.
DEFAULT_LAYERS = {"double_0": [2, 16]}


def _key(layer: str) -> str:
    return layer.replace(".", "__")  # ParameterDict keys may not contain dots


class EditModel(TemplateModel):
    """Reference keys/values -> the same, scaled per layer and head by learned gains (1 untrained)."""

    @register_to_config
    def __init__(self, layers: dict[str, list[int]] | None = None):
        super().__init__()
        self.layers = {name: (int(heads), int(head_dim)) for name, (heads, head_dim) in
                       dict(layers or DEFAULT_LAYERS).items()}
        self.key_gain = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.ones(h)) for n, (h, _) in self.layers.items()}
        )
        self.value_gain = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.ones(h)) for n, (h, _) in self.layers.items()}
        )

    @classmethod
    def for_attention_layers(cls, attention_layers: Mapping[str, Any]) -> EditModel:
        """An untrained model (all gains 1) for a backbone adapter's attention layers."""
        return cls(layers={name: [layer.heads, layer.head_dim] for name, layer in attention_layers.items()})

    @torch.no_grad()
    def process_inputs(self, inputs: Any, context: Any = None) -> dict[str, Any]:
        """Stage 1 (frozen base model): the picture's reference keys and values."""
        from diffusion_templates.reference import capture_reference_kv

        cache = capture_reference_kv(context.adapter, inputs.image, index=inputs.reference_index)
        return {"keys": cache.keys, "values": cache.values}

    def forward(self, keys: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Stage 2 (differentiable): ``{"keys": {layer: k * gain}, "values": {layer: v * gain}}``."""
        unknown = sorted(set(keys) - set(self.layers))
        if unknown:
            raise ValueError(f"EditModel has no gains for layers {unknown} (it has {sorted(self.layers)})")
        out_k, out_v = {}, {}
        for name, key in keys.items():
            k_gain = self.key_gain[_key(name)].to(key.dtype).view(1, 1, -1, 1)
            v_gain = self.value_gain[_key(name)].to(key.dtype).view(1, 1, -1, 1)
            out_k[name], out_v[name] = key * k_gain, values[name] * v_gain
        return {"keys": out_k, "values": out_v}
