"""Input schema of the contentref template.

    {"template": "contentref", "image": "style.png", "scale": 0.6}
"""

from __future__ import annotations

from typing import Any

from diffusion_templates import TemplateInputs
from diffusion_templates.reference import REFERENCE_MAX_ASPECT as MAX_ASPECT
from diffusion_templates.reference import REFERENCE_MIN_SIDE as MIN_SIDE
from diffusion_templates.reference import to_reference_picture as to_rgb_image
from pydantic import Field, field_validator


class ContentRefInputs(TemplateInputs):
    image: Any = Field(
        ...,
        description=(
            f"The reference picture: a PIL image (mode RGB or L), a numpy array (H, W[, 3], uint8 or float "
            f"in [0, 1]) or a file path. Sides at least {MIN_SIDE} px, aspect ratio at most {MAX_ASPECT}:1; "
            "above 1024x1024 px it is resized to that area, then centre-cropped to a multiple of 16 px."
        ),
        json_schema_extra={"format": "image"},
    )
    scale: float = Field(
        1.0,
        ge=0.0,
        le=2.0,
        description=(
            "Strength of the reference, 0 to 2 (unitless): its attention values are multiplied by it. 0 is "
            "no reference at all (bit-identical to no template); 1 is the reference's keys/values as "
            "Flux2KleinKVPipeline computes them; above 1 extrapolates."
        ),
    )
    reference_index: int = Field(
        0,
        ge=0,
        le=7,
        description=(
            "Position slot of the reference tokens (FLUX.2: time offset 10 * (index + 1); FLUX.1: first id "
            "axis 1 + index). Give different slots to reference templates composed in one call."
        ),
    )
    weights: str | None = Field(
        None,
        description="Folder (or hub id) of trained per-layer key/value gains (save_pretrained output). "
        "Without it, every gain is 1.",
    )

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, value: Any) -> Any:
        return to_rgb_image(value)
