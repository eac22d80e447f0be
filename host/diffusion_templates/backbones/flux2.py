"""FLUX.2 (``Flux2Transformer2DModel``): Flux2KleinPipeline, Flux2Pipeline.

Layer names follow DiffSynth-Studio's FLUX.2 ``kv_cache`` keys: ``double_<i>`` for the
dual-stream blocks, ``single_<i>`` for the single-stream blocks. CFG (klein base) runs the branches
one after the other under ``transformer.cache_context("cond"/"uncond")``.
"""

from __future__ import annotations

from .base import AttentionLayer, BackboneAdapter, blocks_attention


class Flux2Adapter(BackboneAdapter):
    name = "flux2"
    denoiser_classes = ("Flux2Transformer2DModel",)
    pipeline_classes = ("Flux2KleinPipeline", "Flux2Pipeline")
    cfg_style = "sequential"
    carriers = frozenset({"kv", "lora"})

    def attention_layers_of(self, denoiser) -> dict[str, AttentionLayer]:
        return {
            **blocks_attention(denoiser, "transformer_blocks", "double"),
            **blocks_attention(denoiser, "single_transformer_blocks", "single"),
        }
