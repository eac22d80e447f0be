"""Input schema of the edit template.

    {"template": "edit", "image": "photo.png"}                                # the prompt is the instruction
    {"template": "edit", "image": img, "instruction": "make it snowy", "strength": 0.8}
"""

from __future__ import annotations

from typing import Any

from diffusion_templates import TemplateInputs
from diffusion_templates.reference import REFERENCE_MAX_ASPECT as MAX_ASPECT
from diffusion_templates.reference import REFERENCE_MIN_SIDE as MIN_SIDE
from diffusion_templates.reference import to_reference_picture as to_rgb_image
from pydantic import Field, field_validator


class EditInputs(TemplateInputs):
    image: Any = Field(
        ...,
        description=(
            f"The picture to edit: a PIL image (mode RGB or L), a numpy array (H, W[, 3], uint8 or float in "
            f"[0, 1]) or a file path. Sides at least {MIN_SIDE} px, aspect ratio at most {MAX_ASPECT}:1; "
            "above 1024x1024 px it is resized to that area, then centre-cropped to a multiple of 16 px."
        ),
        json_schema_extra={"format": "image"},
    )
    instruction: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description=(
            "The edit instruction. Leave it out to use the call's prompt as the instruction (as "
            "Flux2KleinKVPipeline does; recommended). When given, it is encoded with the pipeline's text "
            "encoder and appended to the prompt's tokens (embedding carrier)."
        ),
    )
    strength: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description=(
            "How far from the picture the generation starts, in (0, 1]. 1.0 starts from pure noise (the "
            "picture acts only through its reference tokens, as in Flux2KleinKVPipeline); below 1 the "
            "generation starts from the picture's latents noised to that level (img2img), keeping its layout."
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
        "Without it, every gain is 1: the captured keys and values unchanged.",
    )

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, value: Any) -> Any:
        return to_rgb_image(value)
