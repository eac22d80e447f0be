"""Input schema of the {{ cookiecutter.name }} template: what a user passes in a template spec.

    {"template": "{{ cookiecutter.name }}", "scale": 1.0, "height": 1024, "width": 1024}

``height`` and ``width`` must be the call's: static residuals have one row per image token.
``TemplateInputs`` forbids unknown fields and validates on assignment. Every constraint here is
checked before the model runs: a bad value fails with a ``TemplateInputError`` that names the
template and the field.
"""

from __future__ import annotations

from diffusion_templates import TemplateInputs
from pydantic import Field


class {{ cookiecutter.class_prefix }}Inputs(TemplateInputs):
    scale: float = Field(1.0, ge=0, le=2, description="Strength of the residuals, 0 to 2.")
    height: int = Field(1024, ge=16, le=4096, multiple_of=16, description="The call's height in pixels.")
    width: int = Field(1024, ge=16, le=4096, multiple_of=16, description="The call's width in pixels.")
    weights: str | None = Field(
        None,
        description="Local folder (or hub id) of trained weights, saved with save_pretrained. "
        "Without it, an untrained model sized for the pipeline is used.",
    )
