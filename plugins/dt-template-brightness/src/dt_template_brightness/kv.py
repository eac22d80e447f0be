"""``brightness-kv``: the paper's brightness template, a trained value encoder emitting a kv cache.

The target mean luminance becomes a handful of extra attention tokens per attention layer (the
host's ``diffusion_templates.value_kv.ValueKVModel`` with a 1-dimensional value). The ``kv``
carrier appends them to every attention call of the conditional branch. Weights ship in
``weights/<name>/`` (``shapes``: trained on the ``dt-base-shapes`` demo model, see
``dt_template_brightness.shapes``); a local folder saved with ``save_pretrained`` works too. A
model only fits pipelines with its attention layout (layer names, heads, head_dim), which is kept
in its config and checked before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


class BrightnessKVModel(ValueKVModel):
    """``scale`` -> kv tokens (``value_dim`` 1)."""

    def value_of(self, inputs: Any) -> list[float]:
        return [float(inputs.scale)]


class BrightnessKVInputs(TemplateInputs):
    scale: float = Field(
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "Target mean luminance of the image, 0 (black) to 1 (white): Rec. 709 luma 0.2126 R + 0.7152 G + "
            "0.0722 B of the RGB values in [0, 1], averaged over the image (what the training data measured)."
        ),
    )
    weights: str = Field(
        "shapes",
        description=(
            "Trained weights: a name shipped with the package ('shapes': the dt-base-shapes demo model) or a "
            "local folder saved with save_pretrained. They must match the pipeline's attention layout."
        ),
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        resolve_weights(value, WEIGHTS)
        return value


def demo_inputs(base_image: Any) -> dict[str, float]:
    """For ``dt demo``: 0.3 brighter than the base image, or 0.3 darker when it is already bright."""
    import numpy as np

    rgb = np.asarray(base_image.convert("RGB"), dtype=np.float64) / 255.0
    luminance = float((rgb @ np.array([0.2126, 0.7152, 0.0722])).mean())
    target = luminance + 0.3 if luminance < 0.5 else luminance - 0.3
    return {"scale": round(min(max(target, 0.0), 1.0), 3)}


class BrightnessKVTemplate(TrainedKVTemplate):
    """Steers the mean luminance toward ``scale`` through learned extra attention tokens (trained)."""

    Inputs = BrightnessKVInputs
    Model = BrightnessKVModel
    demo_inputs = staticmethod(demo_inputs)
    #: For ``dt demo``: the caption without its background phrase, whose brightness the template decides.
    demo_prompt = staticmethod(lambda prompt: prompt.partition(" on ")[0])
    # Keep in sync with the dt-carrier:kv@brightness-kv / dt-backbone:flux2@brightness-kv keywords.
    carriers = ("kv",)
    backbones = ("flux2",)
    weights_dir = WEIGHTS
