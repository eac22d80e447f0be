"""Input schema of the ``sharpness`` template: how much fine detail the image should carry.

    {"template": "sharpness", "scale": 0.8, "strength": 0.5, "start": 0.0, "end": 1.0}

``TemplateInputs`` forbids unknown fields and validates on assignment; every constraint here is
checked before anything runs, and a bad value fails with a ``TemplateInputError`` that names the
template and the field.
"""

from __future__ import annotations

from diffusion_templates import TemplateInputs
from diffusion_templates.errors import check_window
from pydantic import Field, model_validator


class SharpnessInputs(TemplateInputs):
    scale: float = Field(
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "Sharpness, 0 (soft) to 1 (crisp), on a logarithmic scale of fine detail: the target RMS "
            "high-frequency energy of the image at latent-cell resolution (the guidance carrier's "
            "high_frequency statistic: RGB minus its 3x3 box blur, one value per 8 px cell, 16 px on "
            "FLUX.2) is 0.05 * 4 ** (2 * scale - 1), i.e. 0.0125 at 0, 0.05 (a typical photograph) at "
            "0.5, 0.2 at 1; each 0.25 step doubles it."
        ),
    )
    strength: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "Fraction of the remaining gap to the target energy that each guided step closes on the "
            "predicted clean sample (a Gauss-Newton step on the linearised statistic). 1 moves the output "
            "to the target to first order, 0.5 pulls softly, 0 turns the template off."
        ),
    )
    start: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "First guided step, as a fraction of the denoising (diffusers' control_guidance_start rule: "
            "step i of n is guided unless i/n < start). A later start leaves the composition alone."
        ),
    )
    end: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "End of the guided steps, as a fraction of the denoising (control_guidance_end rule: step i of "
            "n is guided unless (i+1)/n > end). Must be above start."
        ),
    )

    @model_validator(mode="after")
    def _end_after_start(self) -> SharpnessInputs:
        # Both fields, whichever the user gave (a validator on ``end`` skips its default).
        check_window(self, "end ({end}) must be above start ({start}): no step would be guided")
        return self
