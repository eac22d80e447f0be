"""The ``feathered_mask`` carrier: latent blending with a soft (feathered) mask.

The host's ``latent_mask`` carrier prepares its mask as the family's inpainting pipeline does,
which binarises it at 0.5: a blurred mask only rounds the region's shape there. This carrier is
``latent_mask`` with the mask kept soft, so that the edge of the repainted region is a gradual
blend:

    latents = (1 - m) * scale_noise(source, next timestep, noise) + m * latents     (every step)

with ``m`` in [0, 1] per latent cell: the pixel mask's mean over the cell's pixels (area
resampling; FLUX.2 then bilinear onto its packed grid, as the host does). Cells with ``m == 0``
end exactly as the source's latents, cells with ``m == 1`` are generated, cells in between are a
convex blend of the two at every step.

Everything else is the host's: the same per-call plan as ``latent_mask``/``init_latents``
(:class:`diffusion_templates.carriers.init_latents.LatentStart`: source encoded with the call's
generator before the noise is drawn, shared with an ``init_latents`` cache of the same picture), the
same checks, the same step callback. Merge: the union (maximum) of the soft masks; where two caches
both keep a region their sources must agree (the host's rule). Only the blending mask differs.

A host change that would make this carrier unnecessary: a ``binarize: bool = True`` field on
``LatentMaskCache``, honoured where ``LatentStart.resolve`` prepares the mask (see the package
README).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from diffusion_templates import LatentMaskCache, UnsupportedError
from diffusion_templates.carriers.latent_mask import LatentMaskCarrier, LatentMaskInjection
from diffusion_templates.context import InjectionTarget

CARRIER = "feathered_mask"


class FeatheredMaskCache(LatentMaskCache):
    """A ``latent_mask`` cache whose mask is used as it is (soft), not binarised."""

    carrier: ClassVar[str] = CARRIER


def feather(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """A 0/1 mask (B, 1, H, W) feathered over ``radius`` pixels on each side of its edge.

    A separable Gaussian (sigma = radius / 2) truncated at ``radius``: pixels farther than
    ``radius`` from the edge keep exactly 0 or 1, the edge itself becomes 0.5.
    """
    if radius <= 0:
        return mask.float()
    reach = max(int(math.ceil(radius)), 1)
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * (radius / 2) ** 2))
    kernel = (kernel / kernel.sum()).float()
    out = mask.float()
    out = F.conv2d(F.pad(out, (reach, reach, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, reach, reach), mode="replicate"), kernel.view(1, 1, -1, 1))
    out = out.clamp(0.0, 1.0)
    # Exact 0 and 1 away from the edge (the kernel's sum is 1 only up to rounding).
    out = torch.where(out < 1e-6, torch.zeros_like(out), out)
    return torch.where(out > 1 - 1e-6, torch.ones_like(out), out)


def soft_mask_latents(adapter: Any, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A soft pixel mask -> the loop-form blending mask, without binarising."""
    mask = mask.float()
    if tuple(mask.shape[-2:]) != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
    rows, cols = adapter.latent_grid(height, width)
    cells = F.interpolate(mask, size=(rows, cols), mode="area")  # mean over each cell's pixels
    return adapter.mask_latents(cells, height, width)


class FeatheredMaskInjection(LatentMaskInjection):
    def __init__(self, plan: Any, cache: FeatheredMaskCache):
        super().__init__(plan)
        self.cache = cache
        self._softened = False

    def apply(self) -> None:
        self._softened = False

    def update_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = self.plan.resolve(kwargs)  # the host's plan: source, noise, binarised mask
        if not self._softened and self.plan.blend is not None:
            binary, source, noise = self.plan.blend
            height, width = int(kwargs["height"]), int(kwargs["width"])
            soft = soft_mask_latents(self.plan.adapter, self.cache.mask, height, width)
            if binary.shape[0] % soft.shape[0]:
                raise RuntimeError(
                    f"feathered_mask: mask batch {soft.shape[0]} does not divide the call's {binary.shape[0]}"
                )
            soft = torch.cat([soft] * (binary.shape[0] // soft.shape[0]), dim=0)
            self.plan.blend = (soft.to(device=binary.device, dtype=binary.dtype), source, noise)
            self._softened = True
        return kwargs


class FeatheredMaskCarrier(LatentMaskCarrier):
    name = CARRIER
    cache_class = FeatheredMaskCache

    def supports(self, adapter: Any) -> bool:
        return "latent_mask" in getattr(adapter, "carriers", ())

    def merge_caches(self, caches: list[FeatheredMaskCache]) -> FeatheredMaskCache:
        merged = super().merge_caches(caches)
        return FeatheredMaskCache(mask=merged.mask, image=merged.image, latents=merged.latents,
                                  template=merged.template)

    def injection(self, cache: FeatheredMaskCache, target: InjectionTarget) -> FeatheredMaskInjection:
        # The adapter knows which pipelines latent_mask can drive; this carrier drives the same ones.
        reason = target.adapter.unsupported_reason("latent_mask")
        if reason:
            raise UnsupportedError(f"feathered_mask cache from template {cache.template!r}: {reason}")
        injection = super().injection(cache, target)  # registers with the shared plan, checks sizes
        return FeatheredMaskInjection(injection.plan, cache)
