"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): StableDiffusion3Pipeline and variants.

Layers: ``joint_<i>`` for ``transformer_blocks[i].attn`` (joint text+image attention) and
``joint_<i>_attn2`` for the extra image self-attention of SD3.5 dual-attention blocks. The
processors call ``F.scaled_dot_product_attention`` directly (no RoPE). CFG is batched: the
denoiser sees ``[uncond, cond]`` in one call.
"""

from __future__ import annotations

from .base import AttentionLayer, BackboneAdapter, legacy_attention


class SD3Adapter(BackboneAdapter):
    name = "sd3"
    denoiser_classes = ("SD3Transformer2DModel",)
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline", "StableDiffusion3ControlNetPipeline")
    cfg_style = "batched"
    carriers = frozenset({"kv", "lora"})

    def attention_layers_of(self, denoiser) -> dict[str, AttentionLayer]:
        layers = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            layers[f"joint_{i}"] = legacy_attention(f"joint_{i}", f"transformer_blocks.{i}.attn", block.attn)
            if getattr(block, "attn2", None) is not None:
                name = f"joint_{i}_attn2"
                layers[name] = legacy_attention(name, f"transformer_blocks.{i}.attn2", block.attn2)
        return layers
