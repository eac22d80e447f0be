"""FLUX.1 (``FluxTransformer2DModel``): FluxPipeline and its variants.

Same layer naming as FLUX.2 (``double_<i>``, ``single_<i>``). Real CFG (``true_cfg_scale > 1``
with a negative prompt) runs the branches under ``transformer.cache_context("cond"/"uncond")``.
"""

from __future__ import annotations

from .base import AttentionLayer, BackboneAdapter, blocks_attention


class FluxAdapter(BackboneAdapter):
    name = "flux"
    denoiser_classes = ("FluxTransformer2DModel",)
    pipeline_classes = (
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxControlNetPipeline",
    )
    cfg_style = "sequential"
    carriers = frozenset({"kv", "lora"})

    def attention_layers_of(self, denoiser) -> dict[str, AttentionLayer]:
        return {
            **blocks_attention(denoiser, "transformer_blocks", "double"),
            **blocks_attention(denoiser, "single_transformer_blocks", "single"),
        }
