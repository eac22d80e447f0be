"""Input schema of the {{ cookiecutter.name }} template: what a user passes in a template spec.

    {"template": "{{ cookiecutter.name }}", "scale": 1.0}

``TemplateInputs`` forbids unknown fields and validates on assignment. Every constraint here is
checked before the model runs: a bad value fails with a ``TemplateInputError`` that names the
template and the field.
"""

from __future__ import annotations

from diffusion_templates import TemplateInputs
from pydantic import Field


class {{ cookiecutter.class_prefix }}Inputs(TemplateInputs):
    scale: float = Field(1.0, ge=0, le=2, description="Strength of the low-rank update, 0 to 2.")
    weights: str | None = Field(
        None,
        description="Local folder (or hub id) of trained weights, saved with save_pretrained. "
        "Without it, an untrained model sized for the pipeline is used.",
    )
