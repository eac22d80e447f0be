"""The inpaint template: repaint the white part of a mask, keep the rest exactly.

Latent blending (as diffusers' inpainting pipelines with a non-inpainting denoiser): after every
denoising step the latents outside the mask are replaced by the source picture's latents noised to
the next step's level, so the kept region ends as the source's latents exactly while the model paints
the masked region in context.

Caches (no Template model: the mechanism is training-free):

* ``latent_mask`` (host) with the mask and the picture, when ``blur`` is 0: the mask is binarised at
  0.5 exactly as the family's inpainting pipeline does;
* ``feathered_mask`` (this package) instead, when ``blur`` > 0: the mask binarised at 0.5, then
  feathered over ``blur`` pixels and kept soft on the latent grid, so the edge blends gradually;
* ``init_latents`` (host) with the picture and ``strength``, when ``strength`` < 1: denoising starts
  from the picture noised to that level (the host encodes the picture once for both caches).
"""

from __future__ import annotations

from typing import Any

from diffusion_templates import EncodeContext, InitLatentsCache, LatentMaskCache, Template, TemplateInputError

from .feathered import FeatheredMaskCache, feather
from .inputs import InpaintInputs


def _demo_inputs(base_image: Any) -> dict[str, Any]:
    """``dt demo``: repaint the centre quarter of the base picture, feathered."""
    from PIL import Image, ImageDraw

    width, height = base_image.size
    mask = Image.new("L", (width, height), 0)
    box = (width // 4, height // 4, 3 * width // 4 - 1, 3 * height // 4 - 1)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return {"image": base_image, "mask": mask, "blur": max(width // 16, 1), "strength": 1.0}


class InpaintTemplate(Template):
    Inputs = InpaintInputs
    carriers = ("latent_mask", "feathered_mask", "init_latents")
    backbones = ("flux2", "flux", "sd3", "qwen_image", "sdxl")
    #: Refused: other backbones (no latent_mask support), the families' img2img/inpaint pipelines and
    #: FLUX.2's Flux2Pipeline (the host's latent carriers drive the text-to-image pipelines only).
    demo_inputs = staticmethod(_demo_inputs)

    def encode(self, inputs: InpaintInputs, context: EncodeContext) -> list[Any]:
        adapter = context.adapter
        image, mask = inputs.image, inputs.mask
        height, width = image.shape[-2:]
        multiple = adapter.size_multiple()
        if height % multiple or width % multiple:
            raise TemplateInputError(
                context.template,
                [(
                    "image",
                    f"{width}x{height} pixels is not a multiple of {multiple} on backbone {adapter.name!r}; "
                    "crop or pad image and mask first",
                    f"{width}x{height}",
                )],
            )
        binary = (mask >= 0.5).float()
        if inputs.blur > 0:
            caches: list[Any] = [FeatheredMaskCache(mask=feather(binary, inputs.blur), image=image)]
        else:
            caches = [LatentMaskCache(mask=binary, image=image)]
        if inputs.strength < 1:
            caches.append(InitLatentsCache(image=image, strength=inputs.strength))
        return caches
