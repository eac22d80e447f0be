"""The inpaint input schema."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from diffusion_templates import TemplateInputs
from diffusion_templates.pictures import to_image, to_mask


class InpaintInputs(TemplateInputs):
    image: Any = Field(
        description=(
            "The picture to repaint: a PIL image (mode RGB or L), a file path, a numpy array (H, W) or "
            "(H, W, 3) (uint8, or float in [0, 1]) or a tensor (3, H, W)."
        ),
    )
    mask: Any = Field(
        description=(
            "Where to repaint, the size of image: white (1) = repaint, black (0) = keep; a PIL image "
            "(mode L, 1 or RGB), a file path, a numpy array (H, W) (bool, uint8, or float in [0, 1]) or a "
            "tensor. Binarised at 0.5 (as diffusers' inpainting pipelines), then feathered by blur."
        ),
    )
    blur: float = Field(
        0.0,
        ge=0.0,
        le=256.0,
        description=(
            "Feathering of the mask edge in pixels, 0 to 256: the kept and repainted regions blend over a "
            "band of +-blur pixels around the edge (Gaussian, sigma blur/2, truncated at blur); 0 = a hard "
            "edge."
        ),
    )
    strength: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description=(
            "How much of the masked region is regenerated, (0, 1]: 1 paints it from noise, lower values "
            "start from the picture noised to that level (img2img inside the mask)."
        ),
    )

    @field_validator("image", mode="plain")
    @classmethod
    def _image(cls, value: Any) -> Any:
        return to_image(value, what="image")

    @field_validator("mask", mode="plain")
    @classmethod
    def _mask(cls, value: Any, info: Any) -> Any:
        mask = to_mask(value, what="mask")
        image = info.data.get("image")
        if image is not None and tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(
                f"mask is {mask.shape[-1]}x{mask.shape[-2]} pixels, image is "
                f"{image.shape[-1]}x{image.shape[-2]}; they must be the same size (width x height)"
            )
        return mask
