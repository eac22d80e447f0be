"""The ``sharpness`` template: a thin, documented wrapper over the host's ``guidance`` carrier.

``encode`` turns the validated inputs into one guidance term of kind ``high_frequency``: at every
guided denoising step the carrier measures the RMS of (RGB minus its 3x3 box blur) of the predicted
clean sample x0, one RGB value per latent cell through the pipeline's fitted latent -> RGB map, and
moves x0 by the minimum-norm latent change that closes ``strength`` of the gap to the target on the
linearised statistic (see ``diffusion_templates.carriers.guidance``).

The user-facing ``scale`` maps to that target on a logarithmic scale around a typical photograph
(:func:`hf_target`)::

    target = HF_TYPICAL * HF_RANGE ** (2 * scale - 1)        # 0.0125 at 0, 0.05 at 0.5, 0.2 at 1

``HF_TYPICAL`` = 0.05 is the median of the statistic over 13 photographs (scikit-image 0.26's sample
images: astronaut, coffee, chelsea, rocket, motorcycle, brick, grass, gravel, camera, moon, horse,
retina, Hubble deep field; 0.017-0.12, median 0.054) measured on the mean colours of 8 px cells.
The target is absolute, not relative to what the base model would produce: a relative target
("twice the base's own energy") is not computable causally — the carrier only sees each step's x0,
which already contains earlier corrections, so a per-step relative target compounds over the steps
(see docs/zoo/sharpness.md). There is no learned Template model.
"""

from __future__ import annotations

from typing import Any

from diffusion_templates import EncodeContext, GuidanceCache, Template, UnsupportedError

from .inputs import SharpnessInputs

#: Target RMS high-frequency energy at ``scale`` 0.5: a typical photograph at latent-cell resolution.
HF_TYPICAL = 0.05
#: Factor between the target at ``scale`` 0.5 and the ones at 0 (divided) and 1 (multiplied).
HF_RANGE = 4.0


def hf_target(scale: float) -> float:
    """The ``high_frequency`` target (RMS, RGB in [0, 1], at latent-cell resolution) for ``scale``."""
    return HF_TYPICAL * HF_RANGE ** (2.0 * scale - 1.0)


def hf_scale(target: float) -> float:
    """Inverse of :func:`hf_target`: the ``scale`` whose target is ``target`` (clipped to [0, 1])."""
    import math

    scale = (math.log(max(target, 1e-12) / HF_TYPICAL) / math.log(HF_RANGE) + 1.0) / 2.0
    return min(max(scale, 0.0), 1.0)


def demo_inputs(base_image: Any) -> dict[str, float]:
    """For ``dt demo``: crisper than the base image (its detail estimated on 8 px cells), or softer when
    it is already crisper than a scale of 0.75."""
    import numpy as np

    rgb = np.asarray(base_image.convert("RGB"), dtype=np.float64) / 255.0
    h, w = (rgb.shape[0] // 8) * 8, (rgb.shape[1] // 8) * 8
    cells = rgb[:h, :w].reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3))
    padded = np.pad(cells, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows, cols = cells.shape[:2]
    blurred = sum(padded[i : i + rows, j : j + cols] for i in range(3) for j in range(3)) / 9
    current = hf_scale(float(np.sqrt(np.square(cells - blurred).mean())))
    return {"scale": 1.0 if current < 0.75 else 0.0, "strength": 0.5}


def check_context(name: str, context: EncodeContext) -> None:
    """Refuse, before anything runs, what the guidance carrier cannot do, naming this template."""
    if context.negative:
        raise UnsupportedError(
            f"template {name!r} corrects the whole (guided) prediction, not one CFG branch: pass it in "
            "templates, not negative_templates"
        )
    from diffusion_templates.carriers.guidance import parametrization

    try:
        parametrization(context.pipe.scheduler)
    except UnsupportedError as exc:
        raise UnsupportedError(f"template {name!r} on backbone {context.adapter.name!r}: {exc}") from None


class SharpnessTemplate(Template):
    """Steers the fine detail (high-frequency energy) of the image, soft (0) to crisp (1)."""

    Inputs = SharpnessInputs
    # Keep both in sync with the dt-carrier:/dt-backbone: keywords in pyproject.toml.
    carriers = ("guidance",)
    # Every backbone whose adapter supports the guidance carrier, each tested on a tiny pipeline.
    # Refused at encode time: negative_templates (guidance moves the guided prediction as a whole) and
    # schedulers without one sigma per step (DPM-Solver, UniPC, DDIM, Heun...: UnsupportedError).
    backbones = ("flux2", "flux", "sd3", "qwen_image", "sdxl")
    # The cache is the inputs themselves (no pipeline weights read): the store keys by inputs only.
    reads = ()
    demo_inputs = staticmethod(demo_inputs)

    def encode(self, inputs: SharpnessInputs, context: EncodeContext) -> GuidanceCache:
        check_context(context.template, context)
        return GuidanceCache.single(
            kind="high_frequency",
            target=hf_target(inputs.scale),
            strength=inputs.strength,
            start=inputs.start,
            end=inputs.end,
            template=context.template,
        )
