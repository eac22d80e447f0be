"""Input schema of the {{ cookiecutter.name }} template: what a user passes in a template spec.

    {"template": "{{ cookiecutter.name }}", "text": "a golden glow", "mode": "append", "scale": 1.0}

``max_sequence_length`` and ``text_encoder_out_layers`` are the call's own text-encoding arguments:
give them when the call changes them, so that the text is encoded exactly as the prompt is.

``TemplateInputs`` forbids unknown fields and validates on assignment. Every constraint here is
checked before the model runs: a bad value fails with a ``TemplateInputError`` that names the
template and the field.
"""

from __future__ import annotations

from typing import Literal

from diffusion_templates import TemplateInputs
from pydantic import Field, StrictStr


class {{ cookiecutter.class_prefix }}Inputs(TemplateInputs):
    text: StrictStr = Field("a golden glow", min_length=1, description="Text to encode with the pipeline's "
                            "text encoder.")
    mode: Literal["append", "add"] = Field(
        "append", description="append: the text's tokens follow the prompt's; add: their mean is added to "
        "every prompt token.")
    scale: float = Field(1.0, ge=0, le=2, description="Multiplies the tokens or the delta, 0 to 2.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=4096, description="The call's max_sequence_length, when not the pipeline's default "
        "(the text is encoded as the prompt is).")
    text_encoder_out_layers: list[int] | None = Field(
        None, min_length=1, max_length=16, description="FLUX.2 only: the call's text_encoder_out_layers, "
        "when not the pipeline's default.")
    weights: str | None = Field(
        None,
        description="Local folder (or hub id) of trained weights, saved with save_pretrained. "
        "Without it, an untrained model (the identity) is used.",
    )
