"""The ``color`` template: a thin, documented wrapper over the host's ``guidance`` carrier.

``encode`` turns the validated inputs into one guidance term of kind ``mean_rgb``: at every guided
denoising step the carrier measures the mean R, G, B of the predicted clean sample x0 through the
pipeline's fitted linear latent -> RGB map ``rgb = M z + b`` and moves x0 by
``-strength * pinv(M) (mean_rgb(x0) - (r, g, b))`` in every latent cell, the minimum-norm latent
change that closes ``strength`` of the gap (see ``diffusion_templates.carriers.guidance``). The
reference zoo calls this control SoftRGB. There is no learned Template model: the target is the
input colour itself.
"""

from __future__ import annotations

from typing import Any

from diffusion_templates import EncodeContext, GuidanceCache, Template, UnsupportedError

from .inputs import ColorInputs

#: For ``dt demo``: the target is whichever of these is farthest from the base image's mean colour.
DEMO_PALETTE = ((0.85, 0.35, 0.2), (0.2, 0.4, 0.85), (0.3, 0.75, 0.3))


def demo_inputs(base_image: Any) -> dict[str, float]:
    """For ``dt demo``: a warm, cool or green tint, whichever is farthest from the base image's colour."""
    import numpy as np

    mean = (np.asarray(base_image.convert("RGB"), dtype=np.float64) / 255.0).reshape(-1, 3).mean(axis=0)
    r, g, b = max(DEMO_PALETTE, key=lambda c: float(np.square(np.array(c) - mean).sum()))
    return {"r": r, "g": g, "b": b, "strength": 0.5}


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


class ColorTemplate(Template):
    """Steers the mean colour of the image toward (r, g, b) (guidance on the predicted clean sample)."""

    Inputs = ColorInputs
    # Keep both in sync with the dt-carrier:/dt-backbone: keywords in pyproject.toml.
    carriers = ("guidance",)
    # Every backbone whose adapter supports the guidance carrier, each tested on a tiny pipeline.
    # Refused at encode time: negative_templates (guidance moves the guided prediction as a whole) and
    # schedulers without one sigma per step (DPM-Solver, UniPC, DDIM, Heun...: UnsupportedError).
    backbones = ("flux2", "flux", "sd3", "qwen_image", "sdxl")
    # The cache is the inputs themselves (no pipeline weights read): the store keys by inputs only.
    reads = ()
    demo_inputs = staticmethod(demo_inputs)

    def encode(self, inputs: ColorInputs, context: EncodeContext) -> GuidanceCache:
        check_context(context.template, context)
        return GuidanceCache.single(
            kind="mean_rgb",
            target=[inputs.r, inputs.g, inputs.b],
            strength=inputs.strength,
            start=inputs.start,
            end=inputs.end,
            template=context.template,
        )
