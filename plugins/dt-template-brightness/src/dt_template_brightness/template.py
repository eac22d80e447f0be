"""The ``brightness`` template: a thin, documented wrapper over the host's ``guidance`` carrier.

``encode`` turns the validated inputs into one guidance term of kind ``luminance``: at every guided
denoising step the carrier measures the mean Rec. 709 luma of the predicted clean sample x0 through
the pipeline's fitted linear latent -> RGB map and moves x0 by the minimum-norm latent change that
closes ``strength`` of the gap to ``scale`` (see ``diffusion_templates.carriers.guidance``). There is
no learned Template model: the mapping from inputs to the cache is the identity ``target = scale``.
"""

from __future__ import annotations

from typing import Any

from diffusion_templates import EncodeContext, GuidanceCache, Template, UnsupportedError

from .inputs import BrightnessInputs

#: Rec. 709 luma weights, the ones the guidance carrier's ``luminance`` objective uses.
LUMA = (0.2126, 0.7152, 0.0722)


def demo_inputs(base_image: Any) -> dict[str, float]:
    """For ``dt demo``: 0.3 brighter than the base image, or 0.3 darker when it is already bright."""
    import numpy as np

    rgb = np.asarray(base_image.convert("RGB"), dtype=np.float64) / 255.0
    luminance = float((rgb @ np.array(LUMA)).mean())
    target = luminance + 0.3 if luminance < 0.5 else luminance - 0.3
    return {"scale": round(min(max(target, 0.0), 1.0), 3), "strength": 0.5}


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


class BrightnessTemplate(Template):
    """Steers the mean luminance of the image toward ``scale`` (guidance on the predicted clean sample)."""

    Inputs = BrightnessInputs
    # Keep both in sync with the dt-carrier:/dt-backbone: keywords in pyproject.toml.
    carriers = ("guidance",)
    # Every backbone whose adapter supports the guidance carrier, each tested on a tiny pipeline.
    # Refused at encode time: negative_templates (guidance moves the guided prediction as a whole) and
    # schedulers without one sigma per step (DPM-Solver, UniPC, DDIM, Heun...: UnsupportedError).
    backbones = ("flux2", "flux", "sd3", "qwen_image", "sdxl")
    # The cache is the inputs themselves (no pipeline weights read): the store keys by inputs only.
    reads = ()
    demo_inputs = staticmethod(demo_inputs)

    def encode(self, inputs: BrightnessInputs, context: EncodeContext) -> GuidanceCache:
        check_context(context.template, context)
        return GuidanceCache.single(
            kind="luminance",
            target=inputs.scale,
            strength=inputs.strength,
            start=inputs.start,
            end=inputs.end,
            template=context.template,
        )
