"""The ``latent_mask`` carrier: keep a source outside a mask by re-imposing it at every step.

Cache: ``mask`` (B, 1, H, W) in [0, 1], 1 (white) where the model generates, 0 where the source is
kept (diffusers' inpainting convention), and the source as ``image`` (B, 3, H, W) in [0, 1] or as
``latents`` in the backbone's image-latent form. Mask and source have the same size; a smaller
size than the call's is upscaled, a larger one is an error.
Merge: the union of the masks (the model generates wherever any template lets it); each template
keeps its own source outside its mask, so where two templates both keep a region their sources must
agree there, else :class:`CarrierConflictError`. The merged source is composed pixel by pixel (or
latent by latent) from the templates that keep each place.
Injection: the source is encoded with the call's generator (before the noise, as inpainting
pipelines draw) and, after every step, ``on_step_end`` blends
``latents = (1 - mask) * scale_noise(source, next timestep, noise) + mask * latents`` (clean source
after the last step): exactly FluxInpaintPipeline / StableDiffusion3InpaintPipeline /
QwenImageInpaintPipeline / StableDiffusionXLInpaintPipeline with a non-inpainting denoiser at
strength 1. With ``init_latents`` it is their inpainting at that strength.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import model_validator

from ..cache import TemplateCache
from ..context import InjectionTarget
from ..errors import CarrierConflictError
from ..injection import Injection
from .base import Carrier, joined_template_names
from .init_latents import LatentStart, _check_picture, call_kwargs_of, check_picture_values


class LatentMaskCache(TemplateCache):
    carrier: ClassVar[str] = "latent_mask"

    mask: torch.Tensor
    image: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    @model_validator(mode="after")
    def _check(self) -> LatentMaskCache:
        mask = self.mask
        if mask.ndim != 4 or mask.shape[1] != 1 or not mask.is_floating_point():
            raise ValueError(
                f"latent_mask cache: mask must be a float (B, 1, H, W) tensor in [0, 1], got "
                f"{tuple(mask.shape)} {mask.dtype}"
            )
        _check_picture(self, "latent_mask")
        return self

    def check_values(self) -> None:
        """mask and image in [0, 1]; latents finite, |value| at most ``DT_MAX_LATENT_MAGNITUDE``."""
        check_picture_values(self, {"mask": self.mask})

    @property
    def source(self) -> torch.Tensor:
        return self.image if self.image is not None else self.latents


class LatentMaskInjection(Injection):
    step_tensor_inputs = ("latents",)

    def __init__(self, plan: LatentStart):
        self.plan = plan

    def update_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.plan.resolve(kwargs)

    def on_step_end(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if self.plan.blend is None:
            raise RuntimeError("latent_mask: on_step_end before update_call_kwargs prepared the blend")
        mask, source, noise = self.plan.blend
        timesteps = pipe.scheduler.timesteps
        proper = source
        if step < len(timesteps) - 1:
            # As the inpainting pipelines: the source noised to the level of the *next* step.
            next_timestep = torch.tensor([timesteps[step + 1]])
            proper = self.plan.adapter.add_noise(pipe.scheduler, source, noise, next_timestep)
        return {"latents": (1 - mask) * proper + mask * tensors["latents"]}

    def remove(self) -> None:
        self.plan.release()


class LatentMaskCarrier(Carrier):
    name = "latent_mask"
    cache_class = LatentMaskCache

    def merge_caches(self, caches: list[LatentMaskCache]) -> LatentMaskCache:
        names = joined_template_names(caches)
        if len({c.image is not None for c in caches}) > 1:
            raise CarrierConflictError(
                f"latent_mask caches from {names!r} mix image and latents sources; give them the same kind"
            )
        sizes = {tuple(c.mask.shape[-2:]) for c in caches}
        sources = {tuple(c.source.shape[1:]) for c in caches}
        if len(sizes) > 1 or len(sources) > 1:
            raise CarrierConflictError(
                f"latent_mask caches from {names!r} have masks of sizes {sorted(sizes)} and sources of "
                f"shapes {sorted(sources)}; merged masks must share one size"
            )
        batches = {c.mask.shape[0] for c in caches} | {c.source.shape[0] for c in caches}
        batches -= {1}
        if len(batches) > 1:
            raise CarrierConflictError(
                f"latent_mask caches from {names!r} have batch sizes {sorted(batches)}"
            )
        batch = batches.pop() if batches else 1
        masks = [c.mask.expand(batch, -1, -1, -1).float() for c in caches]
        dtype = caches[0].source.dtype
        srcs = [c.source.to(dtype).expand(batch, *c.source.shape[1:]) for c in caches]
        kept = [_kept(m, s) for m, s in zip(masks, srcs, strict=True)]
        for i in range(len(caches)):
            for j in range(i + 1, len(caches)):
                both = kept[i] & kept[j]
                if torch.any(both & (srcs[i] != srcs[j])):
                    raise CarrierConflictError(
                        f"latent_mask caches from templates {caches[i].template!r} and "
                        f"{caches[j].template!r} both keep a region (outside both masks) where their "
                        "sources differ"
                    )
        union = torch.stack(masks).amax(dim=0)
        source = srcs[0].clone()
        assigned = kept[0].clone()
        for src, keep in zip(srcs[1:], kept[1:], strict=True):
            source = torch.where(keep & ~assigned, src, source)
            assigned |= keep
        field = "image" if caches[0].image is not None else "latents"
        return LatentMaskCache(mask=union, **{field: source}, template=names)

    def injection(self, cache: LatentMaskCache, target: InjectionTarget) -> LatentMaskInjection:
        plan = LatentStart.of(target)
        plan.check_cache(cache, target)
        if plan.mask is not None:
            raise CarrierConflictError(
                f"latent_mask: caches from {plan.mask.template!r} and {cache.template!r} were not merged"
            )
        plan.mask = cache
        kwargs = call_kwargs_of(target)
        if kwargs is not None:
            plan.check_call(kwargs)
        return LatentMaskInjection(plan)


def _kept(mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Where a cache keeps its source, broadcastable over ``source`` (the binarised mask is 0 there)."""
    if tuple(mask.shape[-2:]) != tuple(source.shape[-2:]):
        mask = F.interpolate(mask, size=tuple(source.shape[-2:]))
    keep = mask < 0.5  # (B, 1, h, w)
    return keep.view(keep.shape[0], *([1] * (source.ndim - 3)), *keep.shape[-2:])
