"""Input schema of the ``color`` template (the reference zoo's "SoftRGB"): a target mean colour.

    {"template": "color", "r": 0.8, "g": 0.5, "b": 0.2, "strength": 0.5, "start": 0.0, "end": 1.0}

``TemplateInputs`` forbids unknown fields and validates on assignment; every constraint here is
checked before anything runs, and a bad value fails with a ``TemplateInputError`` that names the
template and the field.
"""

from __future__ import annotations

from diffusion_templates import TemplateInputs
from diffusion_templates.errors import check_window
from pydantic import Field, model_validator

_CHANNEL = (
    "Target mean {name} of the image, 0 to 1: the average over the image of the {name} channel of the "
    "RGB values in [0, 1], as estimated from the predicted clean latents through the pipeline's fitted "
    "latent -> RGB map (no gamma linearisation: the decoder's own sRGB-like values)."
)


class ColorInputs(TemplateInputs):
    r: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, description=_CHANNEL.format(name="red"))
    g: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, description=_CHANNEL.format(name="green"))
    b: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, description=_CHANNEL.format(name="blue"))
    strength: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "Fraction of the remaining gap to the target colour that each guided step closes on the "
            "predicted clean sample (a Gauss-Newton step). 1 makes the output's mean colour hit the target "
            "(exactly without CFG), 0.5 pulls softly, 0 turns the template off."
        ),
    )
    start: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "First guided step, as a fraction of the denoising (diffusers' control_guidance_start rule: "
            "step i of n is guided unless i/n < start)."
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
    def _end_after_start(self) -> ColorInputs:
        # Both fields, whichever the user gave (a validator on ``end`` skips its default).
        check_window(self, "end ({end}) must be above start ({start}): no step would be guided")
        return self
