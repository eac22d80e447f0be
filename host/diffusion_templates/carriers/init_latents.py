"""The ``init_latents`` carrier: start denoising from an encoded image at a given strength.

Cache: ``strength`` in (0, 1] and the starting picture, either ``image`` (B, 3, H, W) in [0, 1]
(encoded at call time with the pipeline's VAE and the call's generator, exactly as diffusers'
img2img pipelines encode it) or ``latents`` already in the backbone's image-latent form
(:func:`diffusion_templates.imaging.encode_image`). A picture smaller than the requested size is
upscaled to it (upscaling templates); a larger one is an error. Without ``height``/``width`` in the
call, the picture's size is used.
Merge: one per call; two caches are a :class:`CarrierConflictError`.
Injection: ``update_call_kwargs`` passes the noised image latents as ``latents`` and the img2img
pipeline's truncated schedule (``sigmas``, or ``timesteps`` on SDXL), so the text-to-image pipeline
runs what FluxImg2ImgPipeline / StableDiffusion3Img2ImgPipeline / StableDiffusionXLImg2ImgPipeline /
QwenImageImg2ImgPipeline run, with the same random draws in the same order (VAE sample, then noise).
Together with ``latent_mask`` it is inpainting with strength.

This module also holds :class:`LatentStart`, the per-call plan both latent carriers share.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from .. import imaging
from ..cache import TemplateCache
from ..context import InjectionTarget
from ..errors import CacheError, CarrierConflictError, UnsupportedError
from ..injection import Injection
from ..limits import check_magnitudes, check_unit_range, max_latent_magnitude
from .base import Carrier, joined_template_names

_PLAN = "diffusion_templates.latent_start"


class InitLatentsCache(TemplateCache):
    carrier: ClassVar[str] = "init_latents"

    strength: float = Field(gt=0.0, le=1.0)
    image: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    @model_validator(mode="after")
    def _check(self) -> InitLatentsCache:
        _check_picture(self, "init_latents")
        return self

    def check_values(self) -> None:
        """image in [0, 1]; latents finite, |value| at most ``DT_MAX_LATENT_MAGNITUDE``."""
        check_picture_values(self)


def _check_picture(cache: TemplateCache, carrier: str) -> None:
    image, latents = cache.image, cache.latents
    if (image is None) == (latents is None):
        raise ValueError(f"{carrier} cache: give exactly one of image and latents")
    if image is not None and (image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point()):
        raise ValueError(
            f"{carrier} cache: image must be a float (B, 3, H, W) tensor in [0, 1], got "
            f"{tuple(image.shape)} {image.dtype}"
        )
    if latents is not None and (latents.ndim < 4 or not latents.is_floating_point()):
        raise ValueError(
            f"{carrier} cache: latents must be a float tensor in the backbone's image-latent form, got "
            f"{tuple(latents.shape)} {latents.dtype}"
        )


def check_picture_values(cache: TemplateCache, masks: dict[str, torch.Tensor] | None = None) -> None:
    """The picture (and ``masks``) of a latent carrier's cache: images and masks in [0, 1], latents
    finite with |value| at most ``DT_MAX_LATENT_MAGNITUDE``."""
    who = cache.describe
    unit = dict(masks or {})
    if cache.image is not None:
        unit["image"] = cache.image
    check_unit_range(who, unit)
    if cache.latents is not None:
        check_magnitudes(who, {"latents": cache.latents}, max_latent_magnitude(), "DT_MAX_LATENT_MAGNITUDE")


# --------------------------------------------------------------------------- the shared plan


def _who(cache: TemplateCache) -> str:
    return f"{cache.carrier} cache from template {cache.template!r}"


class LatentStart:
    """The starting latents of one call and the blending data of its latent mask.

    Both latent carriers register here from ``injection()``; whichever ``update_call_kwargs`` runs
    first resolves everything in diffusers' order of random draws: the init picture's VAE sample,
    then the mask source's (reused when it is the same picture), then the noise.
    """

    def __init__(self, target: InjectionTarget):
        self.pipe = target.pipe
        self.adapter = target.adapter
        self.init: InitLatentsCache | None = None
        self.mask: Any = None  # LatentMaskCache
        self.resolved = False
        self.blend: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, target: InjectionTarget) -> LatentStart:
        return target.call.extras.setdefault(_PLAN, cls(target))

    # -- checks -----------------------------------------------------------------------------------
    def check_cache(self, cache: TemplateCache, target: InjectionTarget) -> None:
        """What can be checked without the call's arguments (the carrier's ``injection()``)."""
        adapter = target.adapter
        if target.branch != "cond":
            raise UnsupportedError(
                f"{_who(cache)} was given as a negative template; {cache.carrier} sets the latents of the "
                "whole call, pass it in templates"
            )
        reason = adapter.unsupported_reason(cache.carrier)
        if reason:
            raise UnsupportedError(f"{_who(cache)}: {reason}")
        if cache.latents is not None:
            multiple = adapter.size_multiple()
            expected = adapter.image_latent_shape(1, multiple, multiple)
            if cache.latents.ndim != len(expected) or cache.latents.shape[1:-2] != expected[1:-2]:
                raise CacheError(
                    f"{_who(cache)}: latents have shape {tuple(cache.latents.shape)}, {adapter.name!r} image "
                    f"latents are (B, {', '.join(map(str, expected[1:-2]))}, h, w)"
                )
        mask = getattr(cache, "mask", None)
        if mask is not None:
            ph, pw = self.picture_size(cache)
            if tuple(mask.shape[-2:]) != (ph, pw):
                what = "image" if cache.image is not None else "latents (in pixels)"
                raise CacheError(
                    f"{_who(cache)}: its mask is {mask.shape[-2]}x{mask.shape[-1]}, its source {what} is "
                    f"{ph}x{pw}; they must be the same size"
                )

    def picture_size(self, cache: TemplateCache) -> tuple[int, int]:
        """Pixel (height, width) of a cache's picture (its image, or its latents' grid)."""
        if cache.image is not None:
            return tuple(cache.image.shape[-2:])
        multiple = self.adapter.size_multiple()
        grid = self.adapter.image_latent_shape(1, multiple, multiple)[-2:]
        return (cache.latents.shape[-2] * multiple // grid[0], cache.latents.shape[-1] * multiple // grid[1])

    def call_size(self, kwargs: dict[str, Any]) -> tuple[int, int]:
        """(height, width): the call's, else the first picture's (rounded down to the size multiple)."""
        height, width = kwargs.get("height"), kwargs.get("width")
        if height and width:
            return int(height), int(width)
        pictures = [c for c in (self.init, self.mask) if c is not None]
        if not pictures:
            return imaging.call_size(self.pipe, self.adapter, kwargs)
        multiple = self.adapter.size_multiple()
        ph, pw = self.picture_size(pictures[0])
        return int(height or ph // multiple * multiple), int(width or pw // multiple * multiple)

    def check_call(self, kwargs: dict[str, Any]) -> tuple[int, int]:
        """Checks that need the call's arguments; returns the call's (height, width)."""
        height, width = self.call_size(kwargs)
        if self.init is not None and kwargs.get("latents") is not None:
            raise CacheError(f"{_who(self.init)} sets the starting latents; do not also pass latents=")
        images = imaging.call_batch_size(kwargs)  # per-image pictures are counted in images, never CFG rows
        for cache in (self.init, self.mask):
            if cache is None:
                continue
            picture = cache.image if cache.image is not None else cache.latents
            for what, tensor in (("picture", picture), ("mask", getattr(cache, "mask", None))):
                if tensor is not None and images % tensor.shape[0]:
                    raise CacheError(
                        f"{_who(cache)}: its {what} has batch {tensor.shape[0]}, the call makes {images} "
                        f"image(s); give 1 (it applies to every image), {images} (one per image) or a "
                        f"divisor of {images} (repeated in turn)"
                    )
        for cache in (self.init, self.mask):
            if cache is None:
                continue
            ph, pw = self.picture_size(cache)
            what = "image" if cache.image is not None else "latents"
            if cache.latents is not None and (ph, pw) != (height, width):
                raise CacheError(
                    f"{_who(cache)}: its latents are for {ph}x{pw} pixels, the call asks for "
                    f"{height}x{width}; latents cannot be resized, pass an image or the matching size"
                )
            if ph > height or pw > width:
                raise CacheError(
                    f"{_who(cache)}: its {what} is {ph}x{pw}, larger than the requested {height}x{width}; "
                    "pass a picture at most that size (smaller ones are upscaled) or a larger height/width"
                )
        if self.init is not None:
            steps = imaging.call_argument(self.pipe, kwargs, "num_inference_steps")
            sigmas = kwargs.get("sigmas")
            timesteps = kwargs.get("timesteps")
            count = len(sigmas) if sigmas is not None else len(timesteps) if timesteps is not None else steps
            integer = getattr(self.adapter, "strength_rounds_down", False)
            if count - imaging.strength_start(count, self.init.strength, integer=integer) < 1:
                raise CacheError(
                    f"{_who(self.init)}: strength {self.init.strength} with {count} steps leaves no "
                    "denoising step; raise strength or num_inference_steps"
                )
        return height, width

    # -- resolution ---------------------------------------------------------------------------------
    @torch.no_grad()  # as the pipelines' __call__: same kernels, no autograd graph
    def resolve(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.resolved:
            return kwargs
        self.resolved = True
        pipe, adapter = self.pipe, self.adapter
        height, width = self.check_call(kwargs)
        batch = imaging.call_batch_size(kwargs)
        generator = kwargs.get("generator")
        device = pipe._execution_device
        dtype = imaging.prompt_dtype(pipe, kwargs)

        init_latents = source = None
        if self.init is not None:
            init_latents = self._latents(self.init, height, width, batch, generator, device, dtype)
        if self.mask is not None:
            same = (
                self.init is not None
                and self.init.image is not None
                and self.mask.image is not None
                and self.init.image.shape == self.mask.image.shape
                and torch.equal(self.init.image, self.mask.image)
            )
            source = (
                init_latents
                if same
                else self._latents(self.mask, height, width, batch, generator, device, dtype)
            )

        if kwargs.get("latents") is not None:  # latent_mask alone: the user's latents are the noise
            noise = adapter.noise_from_call(kwargs["latents"].to(device=device, dtype=dtype), height, width)
        else:
            shape = adapter.image_latent_shape(batch, height, width)
            noise = imaging.randn_like_pipeline(shape, generator, device, dtype)

        updates: dict[str, Any] = {"height": height, "width": width}
        if self.init is not None:
            try:
                schedule = adapter.img2img_schedule(kwargs, self.init.strength, height, width, batch)
            except ValueError as exc:
                raise CacheError(f"{_who(self.init)}: {exc}") from None
            start = adapter.add_noise(schedule.scheduler, init_latents, noise, schedule.start_timestep)
            updates["latents"] = adapter.call_latents(start, schedule.scheduler)
            updates.update(schedule.kwargs)
        elif kwargs.get("latents") is None:
            updates["latents"] = adapter.call_latents(noise)
        if self.mask is not None:
            mask = imaging.preprocess_mask(pipe, adapter, self.mask.mask, height, width)
            mask = adapter.mask_latents(_repeat(mask, batch, self.mask, "mask"), height, width)
            self.blend = (
                mask.to(device=device, dtype=dtype),
                adapter.pack_latents(source),
                adapter.pack_latents(noise),
            )
        return {**kwargs, **updates}

    def _latents(self, cache, height, width, batch, generator, device, dtype) -> torch.Tensor:
        if cache.latents is not None:
            latents = cache.latents.to(device=device, dtype=dtype)
        else:
            image = imaging.preprocess_image(self.pipe, self.adapter, cache.image, height, width)
            latents = self.adapter.encode_image(image.to(device=device, dtype=dtype), generator)
        latents = _repeat(latents, batch, cache, "picture")
        # Memory layout as the reference pipelines leave it (convolutions pick kernels by layout): the
        # image was channels-last; inpainting pipelines expand the latents with ``repeat`` (contiguous),
        # img2img pipelines with ``cat`` (layout kept).
        return latents.contiguous() if self.mask is not None else latents

    def release(self) -> None:
        self.blend = None


def _repeat(tensor: torch.Tensor, batch: int, cache: TemplateCache, what: str) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise CacheError(
            f"{_who(cache)}: its {what} has batch {tensor.shape[0]}, which does not divide the call's "
            f"{batch} images"
        )
    return torch.cat([tensor] * (batch // tensor.shape[0]), dim=0)


def call_kwargs_of(target: InjectionTarget) -> dict[str, Any] | None:
    """The call's keyword arguments, where the host hands them to ``injection()`` as
    ``CallState.kwargs`` (a proposed core change); then the size checks run there, before anything
    is applied. Without them they run first thing in ``update_call_kwargs``, still before denoising.
    """
    kwargs = getattr(target.call, "kwargs", None)
    return kwargs if isinstance(kwargs, dict) and kwargs else None


# --------------------------------------------------------------------------- the carrier


class InitLatentsInjection(Injection):
    def __init__(self, plan: LatentStart):
        self.plan = plan

    def update_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.plan.resolve(kwargs)

    def remove(self) -> None:
        self.plan.release()


class InitLatentsCarrier(Carrier):
    name = "init_latents"
    cache_class = InitLatentsCache

    def merge_caches(self, caches: list[InitLatentsCache]) -> InitLatentsCache:
        raise CarrierConflictError(
            f"init_latents: templates {joined_template_names(caches)!r} each set the starting image; a call "
            "starts from one image, use only one of them"
        )

    def injection(self, cache: InitLatentsCache, target: InjectionTarget) -> InitLatentsInjection:
        plan = LatentStart.of(target)
        plan.check_cache(cache, target)
        if plan.init is not None:
            raise CarrierConflictError(
                f"init_latents: templates {plan.init.template!r} and {cache.template!r} each set the "
                "starting image"
            )
        plan.init = cache
        kwargs = call_kwargs_of(target)
        if kwargs is not None:
            plan.check_call(kwargs)
        return InitLatentsInjection(plan)
