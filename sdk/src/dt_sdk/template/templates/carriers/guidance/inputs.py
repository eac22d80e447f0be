"""Input schema of the {{ cookiecutter.name }} template: what a user passes in a template spec.

    {"template": "{{ cookiecutter.name }}", "target": 0.7, "strength": 1.0}

``TemplateInputs`` forbids unknown fields and validates on assignment. Every constraint here is
checked before the model runs: a bad value fails with a ``TemplateInputError`` that names the
template and the field.
"""

from __future__ import annotations

from diffusion_templates import TemplateInputs
from pydantic import Field


class {{ cookiecutter.class_prefix }}Inputs(TemplateInputs):
    target: float = Field(0.7, ge=0, le=1, description="Target luminance, 0 (black) to 1 (white).")
    strength: float = Field(1.0, ge=0, le=2, description="Fraction of the gap closed per step, 0 to 2.")
    scale: float = Field(1.0, ge=0, le=2, description="Multiplies strength, 0 to 2.")
    weights: str | None = Field(
        None,
        description="Local folder (or hub id) of trained weights, saved with save_pretrained. "
        "Without it, an untrained model (which passes target and strength through) is used.",
    )
