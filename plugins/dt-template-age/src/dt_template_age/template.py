"""The ``age`` template: an attribute slider in text-embedding space (embedding carrier, additive mode).

The Template model is the pipeline's own text encoder(s): ``encode`` encodes the two anchor prompts exactly
as the pipeline encodes a prompt (the adapter's ``encode_prompt_embeddings``, i.e. the pipeline's
``encode_prompt``), averages each anchor's token embeddings (over its real tokens where the pipeline
returns a mask, Qwen-Image; over every position otherwise, padding included, as the denoiser sees them)
and takes the difference ``d = mean(old) - mean(young)``, plus ``d_pooled`` of the pooled embeddings
where the backbone has them. The cache is an :class:`EmbeddingCache` whose ``delta`` (1, 1, D), added to
every token of the prompt, and ``pooled_delta`` are

    c * d,   c = strength * (age - (young_age + old_age) / 2) / (old_age - young_age)

so the shift is linear in ``age``, zero at the anchors' midpoint and ``+-strength * d / 2`` at the anchors.
The embedding carrier adds it to the prompt embeddings the pipeline computes for the call; a negative
template shifts the negative prompt's embeddings instead.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from diffusion_templates import EmbeddingCache, EncodeContext, Template, TemplateError, UnsupportedError

from .inputs import AgeInputs


class AgeTemplate(Template):
    Inputs = AgeInputs
    # Keep both in sync with the dt-carrier:/dt-backbone: keywords in pyproject.toml.
    carriers = ("embedding",)
    backbones = ("flux", "flux2", "qwen_image", "sd3", "sdxl")
    # ``dt demo`` (a FLUX.2 klein model that encodes with text_encoder_out_layers (1, 2)): an older look.
    demo_inputs = {"age": 0.9, "prompt_kwargs": {"text_encoder_out_layers": [1, 2]}}

    def __init__(self) -> None:
        # pipeline (weakly) -> (text encoders, anchors, encoding arguments) -> (d, d_pooled)
        self._directions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def direction(
        self, inputs: AgeInputs, context: EncodeContext
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(d, d_pooled)``: mean old-anchor minus mean young-anchor embedding (float32), memoised per
        pipeline, text encoders, anchors and encoding arguments (the text encoders' weights are frozen)."""
        adapter = context.adapter
        kwargs = inputs.prompt_kwargs.as_call_kwargs()
        encoders = tuple(
            id(getattr(context.pipe, n, None)) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
        )
        key = (encoders, adapter.name, inputs.young_prompt, inputs.old_prompt, tuple(sorted(kwargs.items())))
        with self._lock:
            memo = self._directions.setdefault(context.pipe, {})
            found = memo.get(key)
        if found is not None:
            return found
        try:
            with torch.no_grad():
                embeds = adapter.encode_prompt_embeddings(
                    {"prompt": [inputs.young_prompt, inputs.old_prompt], **kwargs}, False
                )["cond"]
        except Exception as exc:
            raise TemplateError(
                f"template {context.template!r}: the pipeline's text encoder could not encode the anchor "
                f"prompts with prompt_kwargs={kwargs}: {type(exc).__name__}: {exc}. Give prompt_kwargs the "
                "call's own "
                "text-encoding arguments (e.g. text_encoder_out_layers for FLUX.2, max_sequence_length)"
            ) from exc
        tokens = embeds["tokens"].float()  # (2, L, D)
        mask = embeds.get("mask")
        if mask is not None:
            weights = mask.to(tokens.device, torch.float32)[..., None]
            means = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        else:
            means = tokens.mean(dim=1)
        direction = (means[1] - means[0]).cpu()
        pooled = embeds.get("pooled")
        pooled_direction = None if pooled is None else (pooled[1].float() - pooled[0].float()).cpu()
        with self._lock:
            if len(memo) >= 64:
                memo.clear()
            memo[key] = (direction, pooled_direction)
        return direction, pooled_direction

    def encode(self, inputs: AgeInputs, context: EncodeContext) -> dict[str, Any]:
        adapter = context.adapter
        reason = getattr(adapter, "unsupported_reason", lambda carrier: None)("embedding")
        if reason or not hasattr(adapter, "encode_prompt_embeddings"):
            raise UnsupportedError(
                f"template {context.template!r} cannot drive {type(context.pipe).__name__}: "
                f"{reason or 'its adapter cannot encode prompts'}"
            )
        direction, pooled_direction = self.direction(inputs, context)
        coefficient = inputs.coefficient
        return {
            "delta": (coefficient * direction)[None, None],
            "pooled_delta": None
            if pooled_direction is None or not inputs.pooled
            else (coefficient * pooled_direction)[None],
        }

    def to_cache(self, representation: dict[str, Any], context: EncodeContext) -> EmbeddingCache:
        return EmbeddingCache(
            delta=representation["delta"],
            pooled_delta=representation["pooled_delta"],
            template=context.template,
        )
