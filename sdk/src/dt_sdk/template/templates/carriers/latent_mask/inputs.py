"""Input schema of the {{ cookiecutter.name }} template: what a user passes in a template spec.

    {"template": "{{ cookiecutter.name }}", "image": picture, "mask": mask}

``image`` and ``mask`` are converted by the host's imaging helpers as they are validated: the image
becomes a float (B, 3, H, W) tensor in [0, 1], the mask a float (B, 1, H, W) tensor in [0, 1]
(1 = generate, 0 = keep the image). ``TemplateInputs`` forbids unknown fields and validates on
assignment. Every constraint here is checked before the model runs: a bad value fails with a
``TemplateInputError`` that names the template and the field.
"""

from __future__ import annotations

from typing import Any

from diffusion_templates import CacheError, TemplateInputs
from diffusion_templates.imaging import to_image_tensor, to_mask_tensor
from pydantic import Field, ValidationInfo, field_validator


class {{ cookiecutter.class_prefix }}Inputs(TemplateInputs):
    image: Any = Field(
        description="The picture kept outside the mask: a PIL image, a numpy array (H, W, 3) (uint8, or "
        "float in [0, 1]) or a tensor (3, H, W) / (B, 3, H, W) in [0, 1].",
    )
    mask: Any = Field(
        description="Where to generate, the size of image: white (1) = generate, black (0) = keep the image; "
        "a PIL image, a numpy array (H, W) or a tensor (H, W) / (B, 1, H, W), bool or in [0, 1].",
    )
    weights: str | None = Field(
        None,
        description="Local folder (or hub id) of trained weights, saved with save_pretrained. "
        "Without it, an untrained model (which passes the mask through) is used.",
    )

    @field_validator("image", mode="plain")
    @classmethod
    def _image(cls, value: Any) -> Any:
        try:
            return to_image_tensor(value)
        except CacheError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("mask", mode="plain")
    @classmethod
    def _mask(cls, value: Any, info: ValidationInfo) -> Any:
        try:
            mask = to_mask_tensor(value)
        except CacheError as exc:
            raise ValueError(str(exc)) from None
        image = info.data.get("image")
        if image is not None and tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(
                f"mask is {mask.shape[-1]}x{mask.shape[-2]} pixels, image is "
                f"{image.shape[-1]}x{image.shape[-2]}; they must be the same size (width x height)"
            )
        return mask
