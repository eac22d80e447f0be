"""The superres input schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from diffusion_templates import TemplateInputs
from diffusion_templates.pictures import to_image

MAX_TARGET_SIDE = 8192


class SuperResInputs(TemplateInputs):
    factor: Literal[2, 4] = Field(2, description="Upscaling factor: 2 or 4 (output = factor x input size).")
    image: Any = Field(
        description=(
            "The low-resolution picture: a PIL image (mode RGB or L), a file path, a numpy array (H, W) or "
            "(H, W, 3) (uint8, or float in [0, 1]) or a tensor (3, H, W). The output is factor x its size."
        ),
    )
    strength: float = Field(
        0.35,
        ge=0.0,
        le=1.0,
        description=(
            "How much is regenerated, 0 to 1 (img2img strength): 0 returns the VAE round trip of the "
            "upsampled picture, 1 generates from noise at the target size; 0.2-0.5 adds detail while "
            "keeping the content."
        ),
    )
    prompt: str | None = Field(
        None, description="Prompt for the upscaling call, used when the call itself gives no prompt."
    )
    tile_size: int | None = Field(
        None,
        ge=16,
        le=MAX_TARGET_SIDE,
        description=(
            "Tile side in pixels for outputs larger than it (rounded down to the backbone's tiling unit, "
            "16 px on FLUX/SD3/Qwen-Image); default: the backbone's default image size (1024 px on "
            "FLUX.1/FLUX.2/Qwen-Image). Outputs at most this size are denoised whole."
        ),
    )
    tile_overlap: int | None = Field(
        None,
        ge=0,
        le=MAX_TARGET_SIDE,
        description=(
            "Overlap of neighbouring tiles in pixels, blended with feathered weights; default tile_size/4."
        ),
    )
    resample: Literal["bicubic", "bilinear", "nearest", "lanczos"] = Field(
        "bicubic", description="How the picture is upsampled before it is encoded and re-noised."
    )

    @field_validator("image", mode="plain")
    @classmethod
    def _image(cls, value: Any, info: Any) -> Any:
        image = to_image(value, what="image")
        factor = info.data.get("factor", 2)
        height, width = image.shape[-2:]
        if max(height, width) * factor > MAX_TARGET_SIDE:
            raise ValueError(
                f"{width}x{height} x {factor} = {width * factor}x{height * factor} pixels exceeds "
                f"{MAX_TARGET_SIDE} on a side"
            )
        return image

    @field_validator("tile_overlap", mode="after")
    @classmethod
    def _overlap(cls, overlap: int | None, info: Any) -> int | None:
        tile = info.data.get("tile_size")
        if overlap is not None and tile is not None and overlap * 2 > tile:
            raise ValueError(f"tile_overlap {overlap} must be at most half of tile_size {tile}")
        return overlap
