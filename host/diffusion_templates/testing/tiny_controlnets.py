"""Tiny ControlNets with random weights matching the tiny pipelines of :mod:`.tiny`.

One builder per family that diffusers drives with ControlNet residuals: FLUX.1
(``FluxControlNetModel``), SD3 (``SD3ControlNetModel``), Qwen-Image (``QwenImageControlNetModel``)
and SDXL (``ControlNetModel``). Each config mirrors the denoiser of the tiny pipeline of the same
family (inner dim, text dims, latent channels), with fewer blocks than the denoiser so that
diffusers' block-interval mapping is exercised.

ControlNets start with zero-initialised output layers (``zero_module``), which would make every
residual zero; the builders refill every all-zero parameter with seeded noise so that the
residuals matter. As in :mod:`.tiny`, building is seeded in a forked CPU RNG, modules are cast to
``dtype`` and put in ``eval()`` mode.

``TINY_CONTROLNETS`` maps a family (the keys of :data:`.tiny.TINY_PIPELINES`) to a
:class:`TinyControlNetSpec`, which also names diffusers' own ControlNet pipeline of that family::

    spec = TINY_CONTROLNETS["flux"]
    controlnet = spec.build(seed=1)
    native = spec.pipeline_class()(**pipe.components, controlnet=controlnet)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ControlNetModel, FluxControlNetModel, QwenImageControlNetModel, SD3ControlNetModel

from .tiny import _seeded

__all__ = [
    "TINY_CONTROLNETS",
    "TinyControlNetSpec",
    "build_flux_controlnet",
    "build_qwen_image_controlnet",
    "build_sd3_controlnet",
    "build_sdxl_controlnet",
    "native_controlnet_pipeline",
]

#: Standard deviation of the noise that replaces zero-initialised ControlNet parameters.
_ZERO_INIT_STD = 0.1


def _finish_controlnet(controlnet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Refill all-zero parameters with noise (in the caller's seeded RNG), cast, eval()."""
    with torch.no_grad():
        for param in controlnet.parameters():
            if not param.any():
                param.normal_(0.0, _ZERO_INIT_STD)
    torch.nn.Module.to(controlnet, dtype=dtype)
    return controlnet.eval()


def build_flux_controlnet(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 1,
    num_single_layers: int = 1,
    guidance_embeds: bool = True,
    num_mode: int | None = None,
) -> FluxControlNetModel:
    """An InstantX-style FLUX.1 ControlNet for ``tiny.build_flux`` (inner dim 32, packed 16 channels)."""
    with _seeded(seed):
        controlnet = FluxControlNetModel(
            patch_size=1,
            in_channels=16,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
            num_mode=num_mode,
        )
        return _finish_controlnet(controlnet, dtype)


def build_sd3_controlnet(
    seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 1, **config: Any
) -> SD3ControlNetModel:
    """An SD3 ControlNet for ``tiny.build_sd3`` (inner dim 32, 4 latent channels, patch 2)."""
    with _seeded(seed):
        controlnet = SD3ControlNetModel(
            **{
                "sample_size": 8,
                "patch_size": 2,
                "in_channels": 4,
                "num_layers": num_layers,
                "attention_head_dim": 8,
                "num_attention_heads": 4,
                "joint_attention_dim": 64,
                "caption_projection_dim": 32,
                "pooled_projection_dim": 64,
                "out_channels": 4,
                "force_zeros_for_pooled_projection": False,
                **config,
            }
        )
        return _finish_controlnet(controlnet, dtype)


def build_qwen_image_controlnet(
    seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 1
) -> QwenImageControlNetModel:
    """A Qwen-Image ControlNet for ``tiny.build_qwen_image`` (inner dim 48, packed 16 channels)."""
    with _seeded(seed):
        controlnet = QwenImageControlNetModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=num_layers,
            attention_head_dim=16,
            num_attention_heads=3,
            joint_attention_dim=16,
            axes_dims_rope=(8, 4, 4),
        )
        return _finish_controlnet(controlnet, dtype)


def build_sdxl_controlnet(
    seed: int = 0, dtype: torch.dtype = torch.float32, global_pool_conditions: bool = False
) -> ControlNetModel:
    """An SDXL ControlNet for ``tiny.build_sdxl`` (the UNet's down half; 8x conditioning embedding)."""
    with _seeded(seed):
        controlnet = ControlNetModel(
            in_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=64,
            norm_num_groups=4,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            conditioning_embedding_out_channels=(4, 8, 8, 16),
            global_pool_conditions=global_pool_conditions,
        )
        return _finish_controlnet(controlnet, dtype)


@dataclass(frozen=True)
class TinyControlNetSpec:
    """A tiny ControlNet builder (``seed``/``dtype`` keywords) and diffusers' pipeline that runs it."""

    build: Callable[..., torch.nn.Module]
    pipeline: str

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline)


TINY_CONTROLNETS: dict[str, TinyControlNetSpec] = {
    "flux": TinyControlNetSpec(build_flux_controlnet, "FluxControlNetPipeline"),
    "sd3": TinyControlNetSpec(build_sd3_controlnet, "StableDiffusion3ControlNetPipeline"),
    "qwen_image": TinyControlNetSpec(build_qwen_image_controlnet, "QwenImageControlNetPipeline"),
    "sdxl": TinyControlNetSpec(build_sdxl_controlnet, "StableDiffusionXLControlNetPipeline"),
}


def native_controlnet_pipeline(pipe: Any, controlnet: Any, family: str) -> Any:
    """diffusers' ControlNet pipeline of ``family`` built from ``pipe``'s own components."""
    klass = TINY_CONTROLNETS[family].pipeline_class()
    native = klass(**pipe.components, controlnet=controlnet)
    native.set_progress_bar_config(disable=True)
    return native

