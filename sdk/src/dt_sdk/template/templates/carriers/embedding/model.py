"""The {{ cookiecutter.name }} Template model: text -> the pipeline's own text embeddings -> a learned gain.

Stage 1 (``process_inputs``, no gradient) encodes ``text`` with the pipeline's own text encoder,
through the backbone adapter's ``encode_prompt_embeddings`` (the code path the pipeline uses for its
prompt). Stage 2 (``forward``, differentiable) scales every channel by a learned gain (ones: the
identity, untrained) and shapes the result for the ``embedding`` carrier::

    append: tokens (1, L, D) = text tokens * gain * scale
    add:    delta (1, 1, D) = mean over the text tokens * gain * scale  (+ pooled_delta where pooled)

Train the gains (or replace them with a network) to turn text into better tokens or slider
directions; the template stays the same.

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
    """Text embeddings (1, L, D) (+ pooled (1, D_pooled)) -> appended tokens or additive deltas."""

    @register_to_config
    def __init__(self, dim: int = 32, pooled_dim: int | None = None):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))
        self.pooled_gain = nn.Parameter(torch.ones(pooled_dim)) if pooled_dim else None

    @classmethod
    def for_adapter(cls, adapter: Any, **config: Any):
        """An untrained model sized for the backbone's prompt embeddings."""
        dim, pooled_dim = adapter.text_embedding_dims()
        return cls(dim=int(dim), pooled_dim=int(pooled_dim) if pooled_dim else None, **config)

    def process_inputs(self, inputs, context=None) -> dict[str, Any]:
        """Stage 1 (no gradient): the text through the pipeline's text encoder."""
        if context is None:
            raise ValueError("the model encodes text with the pipeline's text encoder: give it a context")
        call_kwargs: dict[str, Any] = {"prompt": inputs.text}
        if inputs.max_sequence_length is not None:
            call_kwargs["max_sequence_length"] = inputs.max_sequence_length
        if inputs.text_encoder_out_layers is not None:
            call_kwargs["text_encoder_out_layers"] = tuple(inputs.text_encoder_out_layers)
        with torch.no_grad():
            embeds = context.adapter.encode_prompt_embeddings(call_kwargs, cfg=False)["cond"]
        pooled = embeds.get("pooled")
        return {
            "tokens": embeds["tokens"].to(self.device, torch.float32),
            "pooled": None if pooled is None else pooled.to(self.device, torch.float32),
            "scale": float(inputs.scale),
            "mode": inputs.mode,
        }

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None, scale: float = 1.0,
                mode: str = "append") -> dict[str, torch.Tensor | None]:
        """Stage 2 (differentiable): ``{"tokens": ..., "delta": ..., "pooled_delta": ...}`` (unused: None)."""
        tokens = tokens * self.gain * scale
        if mode == "append":
            return {"tokens": tokens, "delta": None, "pooled_delta": None}
        pooled_delta = None
        if pooled is not None and self.pooled_gain is not None:
            pooled_delta = pooled * self.pooled_gain * scale
        return {"tokens": None, "delta": tokens.mean(dim=1, keepdim=True), "pooled_delta": pooled_delta}
