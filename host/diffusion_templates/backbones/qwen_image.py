"""Qwen-Image (``QwenImageTransformer2DModel``): QwenImagePipeline and variants.

Layers: ``double_<i>`` for ``transformer_blocks[i].attn`` (joint text+image attention through
``dispatch_attention_fn``, with a text padding mask). Real CFG (``true_cfg_scale > 1`` with a
negative prompt) runs the branches under ``transformer.cache_context("cond"/"uncond")``.
"""

from __future__ import annotations

from .base import AttentionLayer, BackboneAdapter, legacy_attention


class QwenImageAdapter(BackboneAdapter):
    name = "qwen_image"
    denoiser_classes = ("QwenImageTransformer2DModel",)
    pipeline_classes = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                        "QwenImageControlNetPipeline")
    cfg_style = "sequential"
    carriers = frozenset({"kv", "lora"})

    def attention_layers_of(self, denoiser) -> dict[str, AttentionLayer]:
        return {f"double_{i}": legacy_attention(f"double_{i}", f"transformer_blocks.{i}.attn", block.attn)
                for i, block in enumerate(denoiser.transformer_blocks)}
