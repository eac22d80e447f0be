"""``color-kv``: a trained colour template, a value encoder emitting a kv cache (paper's style).

The requested colour of the *shape* (the foreground object) becomes a handful of extra attention
tokens per attention layer (the host's ``diffusion_templates.value_kv.ValueKVModel`` with an
(r, g, b) value).

Unlike ``color`` (guidance toward the mean colour of the whole image), ``color-kv`` controls the
colour of the object the prompt describes and leaves the background to the prompt. The ``kv``
carrier appends the tokens to every attention call of the conditional branch. Weights ship in
``weights/<name>/`` (``shapes``: trained on the ``dt-base-shapes`` demo model, see
``dt_template_color.shapes``); a local folder saved with ``save_pretrained`` works too. The
attention layout the weights fit is in their config and checked before anything runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from diffusers.configuration_utils import register_to_config
from diffusion_templates import TemplateInputs
from diffusion_templates.trained import TrainedKVTemplate, resolve_weights
from diffusion_templates.trained import shipped_weights as _shipped_weights
from diffusion_templates.value_kv import ValueKVModel
from pydantic import Field, field_validator

#: Shipped weights: ``weights/<name>/`` next to this module.
WEIGHTS = Path(__file__).parent / "weights"


def shipped_weights() -> list[str]:
    """Names of the weights that ship with the package."""
    return _shipped_weights(WEIGHTS)


class ColorKVModel(ValueKVModel):
    """``color`` (r, g, b) -> kv tokens (``value_dim`` 3)."""

    @register_to_config
    def __init__(
        self,
        layers: dict[str, list[int]] | None = None,
        value_dim: int = 3,
        tokens: int = 4,
        frequencies: int = 6,
        hidden_dim: int = 128,
    ):
        super().__init__(layers, value_dim, tokens, frequencies, hidden_dim)

    def value_of(self, inputs: Any) -> list[float]:
        return [float(c) for c in inputs.color]


def parse_color(value: Any) -> tuple[float, float, float]:
    """An RGB triple in [0, 1], a colour name or '#rrggbb' (PIL's ImageColor) -> (r, g, b) in [0, 1]."""
    if isinstance(value, str):
        from PIL import ImageColor

        try:
            rgb = ImageColor.getrgb(value.strip())
        except ValueError:
            raise ValueError(
                f"unknown colour {value!r}: give a CSS colour name ('red', 'orange'...), '#rrggbb' or an "
                "(r, g, b) triple in [0, 1]"
            ) from None
        return tuple(c / 255.0 for c in rgb[:3])  # type: ignore[return-value]
    try:
        triple = [float(c) for c in value]
    except TypeError:
        raise ValueError(f"colour must be a name or an (r, g, b) triple, got {value!r}") from None
    if len(triple) != 3:
        raise ValueError(f"colour must have 3 components (r, g, b), got {len(triple)}")
    if not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in triple):
        raise ValueError(f"colour components must lie in [0, 1], got {triple}")
    return tuple(triple)  # type: ignore[return-value]


class ColorKVInputs(TemplateInputs):
    # str in the annotation: `dt info` and the JSON Schema show that a name is accepted; the validator
    # below always stores the (r, g, b) triple.
    color: str | tuple[float, float, float] = Field(
        description=(
            "Colour of the shape (the object the prompt describes, not the background): an (r, g, b) triple "
            "in [0, 1] (sRGB values / 255), a CSS colour name ('red', 'orange'...) or '#rrggbb'."
        ),
    )
    weights: str = Field(
        "shapes",
        description=(
            "Trained weights: a name shipped with the package ('shapes': the dt-base-shapes demo model) or a "
            "local folder saved with save_pretrained. They must match the pipeline's attention layout."
        ),
    )

    @field_validator("color", mode="before")
    @classmethod
    def _color(cls, value: Any) -> tuple[float, float, float]:
        return parse_color(value)

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        resolve_weights(value, WEIGHTS)
        return value


#: The shapes model's colour words (its captions name the shape's colour before the shape).
SHAPES_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")


def demo_prompt(prompt: str) -> str:
    """For ``dt demo``: the caption without the shape's colour, which the template now decides."""
    subject, sep, background = prompt.partition(" on ")
    subject = " ".join(w for w in subject.split() if w not in SHAPES_COLOURS)
    return f"{subject}{sep}{background}"


class ColorKVTemplate(TrainedKVTemplate):
    """Sets the colour of the shape to ``color`` through learned extra attention tokens (trained)."""

    Inputs = ColorKVInputs
    Model = ColorKVModel
    demo_inputs = {"color": "#f58c1e"}  # for ``dt demo``: the shapes palette's orange (trained on it)
    demo_prompt = staticmethod(demo_prompt)
    # Keep in sync with the dt-carrier:kv@color-kv / dt-backbone:flux2@color-kv keywords.
    carriers = ("kv",)
    backbones = ("flux2",)
    weights_dir = WEIGHTS
