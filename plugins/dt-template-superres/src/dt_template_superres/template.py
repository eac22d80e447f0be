"""The superres template: upsample, encode, re-noise to ``strength`` and denoise at the target size.

"Hires fix" / SDEdit: the low-resolution picture is upsampled to ``factor`` x its size, VAE-encoded
with the pipeline's own VAE, noised to ``strength`` and denoised by the base model at the target
size, so the model redraws detail the upsampling could not invent. Outputs larger than
``tile_size`` are denoised in overlapping tiles (MultiDiffusion, see :mod:`.tiling`), within the
one pipeline call.

Caches (no Template model: the mechanism is training-free):

* ``init_latents`` (host): the upsampled picture and ``strength``; the host encodes it with the
  call's generator and hands the pipeline the noised latents and the truncated img2img schedule;
* ``tiled_denoise`` (this package): the target size (set as the call's ``height``/``width``), the
  optional prompt, and the tiling;
* at ``strength`` 0, ``latent_mask`` (host) with an all-zero mask instead of ``init_latents``: the
  clean encoded picture is re-imposed after every step, so the output is exactly the VAE round trip
  of the upsampled picture whatever the steps did (run ``num_inference_steps=1``: they are wasted).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_templates import EncodeContext, InitLatentsCache, LatentMaskCache, Template, TemplateInputError

from .inputs import SuperResInputs
from .tiling import GEOMETRIES, TiledDenoiseCache

NAME = "superres"


def upsample(image: torch.Tensor, factor: int, resample: str) -> torch.Tensor:
    """(1, 3, h, w) in [0, 1] -> (1, 3, factor*h, factor*w) in [0, 1]."""
    height, width = image.shape[-2] * factor, image.shape[-1] * factor
    if resample == "lanczos":
        from PIL import Image

        array = (image[0].permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        big = Image.fromarray(array).resize((width, height), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(big).astype(np.float32) / 255.0)
        return pixels.permute(2, 0, 1)[None].contiguous()
    options = {"align_corners": False} if resample in ("bicubic", "bilinear") else {}
    big = F.interpolate(image.float(), size=(height, width), mode=resample, **options)
    return big.clamp(0.0, 1.0).contiguous()


def _demo_inputs(base_image: Any) -> dict[str, Any]:
    """``dt demo``: the base picture at half size, brought back to full size."""
    width, height = base_image.size
    return {"image": base_image.resize((width // 2, height // 2)), "factor": 2, "strength": 0.5}


class SuperResTemplate(Template):
    Inputs = SuperResInputs
    carriers = ("init_latents", "latent_mask", "tiled_denoise")
    backbones = ("flux2", "flux", "sd3", "qwen_image", "sdxl")
    #: Refused: any other backbone (no tile geometry). FLUX.2 runs only on Flux2KleinPipeline (the
    #: host's init_latents carrier drives that one; Flux2Pipeline is refused with UnsupportedError).
    demo_inputs = staticmethod(_demo_inputs)

    def encode(self, inputs: SuperResInputs, context: EncodeContext) -> list[Any]:
        adapter = context.adapter
        image = inputs.image
        low_h, low_w = image.shape[-2:]
        height, width = low_h * inputs.factor, low_w * inputs.factor
        multiple = adapter.size_multiple()
        if height % multiple or width % multiple:
            raise TemplateInputError(
                context.template,
                [(
                    "image",
                    f"{low_w}x{low_h} x {inputs.factor} = {width}x{height} pixels is not a multiple of "
                    f"{multiple} on backbone {adapter.name!r}; crop or pad the picture to a multiple of "
                    f"{max(multiple // inputs.factor, 1)} px first",
                    f"{low_w}x{low_h}",
                )],
            )
        tile = inputs.tile_size if inputs.tile_size is not None else max(adapter.default_size())
        overlap = inputs.tile_overlap if inputs.tile_overlap is not None else tile // 4
        if overlap * 2 > tile:
            raise TemplateInputError(
                context.template,
                [("tile_overlap", f"must be at most half of the tile size {tile} px", overlap)],
            )
        tiled = inputs.strength > 0 and max(height, width) > tile and adapter.name in GEOMETRIES
        big = upsample(image, inputs.factor, inputs.resample)
        tiling = TiledDenoiseCache(
            tile_size=tile if tiled else 0,
            tile_overlap=overlap if tiled else 0,
            height=height,
            width=width,
            prompt=inputs.prompt,
        )
        if inputs.strength == 0:
            keep = LatentMaskCache(mask=torch.zeros(1, 1, height, width), image=big)
            return [tiling, keep]
        return [tiling, InitLatentsCache(image=big, strength=inputs.strength)]
