"""Images, masks and latents, prepared the way each diffusers pipeline prepares them.

Templates store pictures in their caches in one neutral form, whatever they were given:

* an **image** is a float tensor ``(B, 3, H, W)`` with values in ``[0, 1]`` (:func:`to_image_tensor`);
* a **mask** is a float tensor ``(B, 1, H, W)`` in ``[0, 1]``, 1 (white) where the model generates and
  0 (black) where a source is kept, diffusers' inpainting convention (:func:`to_mask_tensor`).

At call time the latent carriers turn them into what the running pipeline needs, using the
pipeline's own ``image_processor`` (and the ``mask_processor`` its inpainting sibling would have),
its own VAE encode with its scaling/shift factors or latent statistics, and its own packing. What
differs per family lives in small backbone-adapter methods; this module holds the shared steps:

==========================  =====================================================================
adapter method              what it returns
==========================  =====================================================================
``latent_grid(h, w)``       the VAE latent grid (rows, cols) for a ``h`` x ``w`` picture
``size_multiple``           height and width must be multiples of it (VAE factor x patch size)
``mask_processor()``        the ``VaeImageProcessor`` the family's inpainting pipeline uses
``encode_image(x, gen)``    normalised image latents, "image-latent form" (the family's
                            ``_encode_vae_image``), from a preprocessed ``[-1, 1]`` image
``image_latent_shape``      the shape of that form for (batch, height, width)
``pack_latents(x)``         image-latent form -> the form the denoising loop carries
``call_latents(x, scale)``  image-latent form -> the pipeline's ``latents=`` argument
``noise_from_call(l, h, w)`` the inverse for a user's own ``latents=`` (unit noise)
``mask_latents(m, h, w)``   a processed pixel mask -> the loop-form blending mask
``add_noise(s, x, n, t)``   the scheduler's forward process (``scale_noise`` / ``add_noise``)
``img2img_schedule(...)``   the truncated schedule an img2img pipeline would run, as call kwargs
==========================  =====================================================================
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CacheError, UnsupportedError

__all__ = [
    "ImageInput",
    "Schedule",
    "call_argument",
    "call_batch_size",
    "call_size",
    "encode_image",
    "flow_img2img_schedule",
    "preprocess_image",
    "preprocess_mask",
    "prompt_dtype",
    "randn_like_pipeline",
    "strength_start",
    "to_image_tensor",
    "to_mask_tensor",
]

ImageInput = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | a list of them


# --------------------------------------------------------------------------- neutral forms


def _pil_to_array(image: Any, mode: str) -> np.ndarray:
    # Exactly diffusers' VaeImageProcessor.pil_to_numpy: uint8 -> float32 / 255.
    return np.array(image.convert(mode)).astype(np.float32) / 255.0


def _is_pil(obj: Any) -> bool:
    return type(obj).__module__.startswith("PIL.")


def to_image_tensor(image: ImageInput) -> torch.Tensor:
    """A PIL image, an array or a tensor (or a list of them) as float ``(B, 3, H, W)`` in ``[0, 1]``.

    Arrays are ``(H, W, 3)`` / ``(B, H, W, 3)``, tensors ``(3, H, W)`` / ``(B, 3, H, W)``; uint8 values
    are divided by 255, float values must already lie in ``[0, 1]``. PIL images convert as diffusers
    converts them (``float32(pixels) / 255``), so a cached image preprocesses bit-identically.
    """
    if isinstance(image, (list, tuple)):
        if not image:
            raise CacheError("expected an image, got an empty list")
        return torch.cat([to_image_tensor(i) for i in image], dim=0)
    if _is_pil(image):
        return torch.from_numpy(_pil_to_array(image, "RGB")).permute(2, 0, 1)[None].contiguous()
    if isinstance(image, np.ndarray):
        array = image[None] if image.ndim == 3 else image
        if array.ndim != 4 or array.shape[-1] != 3:
            raise CacheError(f"expected an image array (H, W, 3) or (B, H, W, 3), got shape {image.shape}")
        tensor = torch.from_numpy(np.array(array)).permute(0, 3, 1, 2)  # a copy: arrays may be read-only
    elif isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise CacheError(
                f"expected an image tensor (3, H, W) or (B, 3, H, W), got shape {tuple(image.shape)}"
            )
    else:
        raise CacheError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    return _unit_range(tensor, "image").contiguous()


def to_mask_tensor(mask: ImageInput) -> torch.Tensor:
    """A mask (PIL, array or tensor, or a list) as float ``(B, 1, H, W)`` in ``[0, 1]``; 1 = generate.

    PIL images are converted to grayscale ("L"); arrays are ``(H, W)``, ``(H, W, 1)`` or
    ``(B, H, W)``; tensors ``(H, W)``, ``(1, H, W)`` or ``(B, 1, H, W)``; booleans become 0/1.
    """
    if isinstance(mask, (list, tuple)):
        if not mask:
            raise CacheError("expected a mask, got an empty list")
        return torch.cat([to_mask_tensor(m) for m in mask], dim=0)
    if _is_pil(mask):
        return torch.from_numpy(_pil_to_array(mask, "L"))[None, None].contiguous()
    if isinstance(mask, np.ndarray):
        array = mask[..., 0] if mask.ndim == 3 and mask.shape[-1] == 1 else mask
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise CacheError(f"expected a mask array (H, W), (H, W, 1) or (B, H, W), got shape {mask.shape}")
        tensor = torch.from_numpy(np.array(array))[:, None]
    elif isinstance(mask, torch.Tensor):
        tensor = mask
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3:
            tensor = tensor[:, None]
        if tensor.ndim != 4 or tensor.shape[1] != 1:
            raise CacheError(
                f"expected a mask tensor (H, W), (1, H, W) or (B, 1, H, W), got shape {tuple(mask.shape)}"
            )
    else:
        raise CacheError(f"expected a PIL image, numpy array or tensor mask, got {type(mask).__name__}")
    return _unit_range(tensor, "mask").contiguous()


def _unit_range(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if tensor.dtype == torch.bool:
        return tensor.float()
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if not tensor.is_floating_point():
        raise CacheError(f"expected a float or uint8 {what}, got {tensor.dtype}")
    tensor = tensor.float()
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise CacheError(
            f"{what} values must lie in [0, 1], got [{tensor.min().item():.3g}, {tensor.max().item():.3g}]"
        )
    return tensor


# --------------------------------------------------------------------------- call arguments


def call_argument(pipe: Any, kwargs: dict[str, Any], name: str) -> Any:
    """``kwargs[name]``, or the default of the pipeline's ``__call__`` for it (None if it has none)."""
    if name in kwargs:
        return kwargs[name]
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def call_size(pipe: Any, adapter: Any, kwargs: dict[str, Any]) -> tuple[int, int]:
    """(height, width) the call will generate: the arguments, else the pipeline's default size."""
    default = adapter.default_size()
    return int(kwargs.get("height") or default[0]), int(kwargs.get("width") or default[1])


def call_batch_size(kwargs: dict[str, Any]) -> int:
    """Images the call generates: prompts (or prompt_embeds rows) x ``num_images_per_prompt``."""
    prompt = kwargs.get("prompt")
    if isinstance(prompt, (list, tuple)):
        prompts = len(prompt)
    elif prompt is None and kwargs.get("prompt_embeds") is not None:
        prompts = kwargs["prompt_embeds"].shape[0]
    else:
        prompts = 1
    return prompts * int(kwargs.get("num_images_per_prompt") or 1)


def prompt_dtype(pipe: Any, kwargs: dict[str, Any]) -> torch.dtype:
    """The dtype diffusers prepares latents in: that of the prompt embeddings (text encoder output)."""
    if isinstance(kwargs.get("prompt_embeds"), torch.Tensor):
        return kwargs["prompt_embeds"].dtype
    for name in ("text_encoder_3", "text_encoder_2", "text_encoder"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            return encoder.dtype
    return next(pipe.vae.parameters()).dtype


def randn_like_pipeline(
    shape: Sequence[int], generator: Any, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Noise drawn exactly as the pipelines draw it (diffusers' ``randn_tensor``)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)


# --------------------------------------------------------------------------- pictures -> tensors


def preprocess_image(pipe: Any, adapter: Any, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A ``[0, 1]`` image as the pipeline's ``image_processor`` prepares it: ``(B, 3, height, width)``
    in ``[-1, 1]``, float32 (as the img2img/inpaint pipelines cast it before encoding).

    A smaller image is first upscaled bicubically (the processors resize tensors with "nearest");
    an image of the requested size goes through the processor exactly as diffusers would take it.
    The result is laid out channels-last, as diffusers lays out PIL and numpy images
    (``numpy_to_pt`` transposes): convolutions pick their kernels by memory layout, so only then does
    the VAE encode bit-identically to the img2img/inpaint pipelines given a PIL image.
    """
    image = image.float()
    if tuple(image.shape[-2:]) != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
    image = adapter.image_processor().preprocess(image, height=height, width=width).to(dtype=torch.float32)
    return image.contiguous(memory_format=torch.channels_last)


def preprocess_mask(pipe: Any, adapter: Any, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A ``[0, 1]`` mask as the family's inpainting ``mask_processor`` prepares it (resized, binarised)."""
    return adapter.mask_processor().preprocess(mask.float(), height=height, width=width)


def encode_image(
    pipe: Any, adapter: Any, image: torch.Tensor, generator: Any = None, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Encode a preprocessed ``[-1, 1]`` image with the pipeline's VAE into image-latent form.

    Uses the family's own ``_encode_vae_image`` (sampled with ``generator`` where diffusers samples,
    the mode where it takes the mode) and its scaling/shift factors or latent statistics.
    """
    device = pipe._execution_device
    dtype = dtype or prompt_dtype(pipe, {})
    return adapter.encode_image(image.to(device=device, dtype=dtype), generator)


# --------------------------------------------------------------------------- schedules


@dataclass
class Schedule:
    """A truncated (img2img) schedule: the call kwargs that make the pipeline run it, and a private
    scheduler set to it (``begin_index`` 0) that noises the start latents as the img2img pipeline would.
    """

    kwargs: dict[str, Any]
    scheduler: Any
    start_timestep: torch.Tensor
    steps: int


def _check_flow_scheduler(scheduler: Any, family: str) -> None:
    if not hasattr(scheduler, "scale_noise"):
        raise UnsupportedError(
            f"{family}: init_latents needs a flow-matching scheduler with scale_noise, the pipeline has "
            f"{type(scheduler).__name__}"
        )
    config = scheduler.config
    for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if config.get(option):
            raise UnsupportedError(
                f"{family}: init_latents truncates the schedule by passing the img2img pipeline's sigmas, "
                f"which is exact only when the scheduler maps sigmas one by one; {option}=True does not"
            )


def strength_start(num_steps: int, strength: float, *, integer: bool = False) -> int:
    """The first step an img2img pipeline runs (``get_timesteps``); SDXL rounds ``n * strength`` down."""
    if integer:
        init_timestep = min(int(num_steps * strength), num_steps)
        return max(num_steps - init_timestep, 0)
    init_timestep = min(num_steps * strength, num_steps)
    return int(max(num_steps - init_timestep, 0))


def flow_img2img_schedule(
    pipe: Any,
    kwargs: dict[str, Any],
    strength: float,
    *,
    family: str,
    default_sigmas: np.ndarray | None,
    mu: float | None,
    batch: int,
) -> Schedule:
    """The img2img schedule of a flow-matching pipeline, as ``sigmas`` for its text-to-image sibling.

    img2img pipelines set the full schedule (their input sigmas, shifted with ``mu``) and start at
    step ``t_start``. Shifting acts on each sigma alone (and terminal stretching only reads the last
    one), so the same input sigmas from ``t_start`` on give exactly the tail of that schedule.
    ``num_inference_steps`` is left as it is: pipelines that derive ``mu`` from it (FLUX.2) see the
    full count, like an img2img pipeline would.
    """
    scheduler = pipe.scheduler
    _check_flow_scheduler(scheduler, family)
    sigmas = kwargs.get("sigmas")
    if sigmas is None:
        sigmas = default_sigmas
    sigmas = np.asarray(sigmas, dtype=np.float64)
    steps = len(sigmas)
    t_start = strength_start(steps, strength) * scheduler.order
    tail = sigmas[t_start:]
    if len(tail) < 1:
        raise ValueError("no denoising step left")
    private = copy.deepcopy(scheduler)
    extra = {"mu": mu} if mu is not None else {}
    private.set_timesteps(sigmas=tail.tolist(), device=pipe._execution_device, **extra)
    private.set_begin_index(0)
    start = private.timesteps[:1].repeat(batch)
    return Schedule({"sigmas": tail.tolist()}, private, start, len(tail))
