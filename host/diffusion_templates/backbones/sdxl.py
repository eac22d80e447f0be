"""Stable Diffusion XL (``UNet2DConditionModel``): StableDiffusionXLPipeline and variants.

Layers: every ``attn1`` (self-attention) and ``attn2`` (cross-attention to the text) of the
UNet's transformer blocks, named by their module path with ``_`` for ``.``, e.g.
``down_blocks_1_attentions_0_transformer_blocks_0_attn1``. The processors call
``F.scaled_dot_product_attention`` directly. CFG is batched: ``[uncond, cond]`` in one call.
"""

from __future__ import annotations

from .base import AttentionLayer, BackboneAdapter, legacy_attention


class SDXLAdapter(BackboneAdapter):
    name = "sdxl"
    denoiser_attr = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetPipeline")
    cfg_style = "batched"
    carriers = frozenset({"kv", "lora"})
    lora_prefix = "unet"

    @classmethod
    def matches(cls, pipe) -> bool:
        # SD 1.x/2.x pipelines share the UNet class; SDXL is told apart by its second text encoder.
        return super().matches(pipe) and hasattr(pipe, "text_encoder_2")

    def attention_layers_of(self, denoiser) -> dict[str, AttentionLayer]:
        layers = {}
        for path, module in denoiser.named_modules():
            if path.endswith((".attn1", ".attn2")) and ".transformer_blocks." in path:
                name = path.replace(".", "_")
                layers[name] = legacy_attention(name, path, module)
        return layers
