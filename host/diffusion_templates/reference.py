"""Reference-image keys and values: what a backbone's attention layers compute for a clean picture.

Editing and content-reference templates condition generation on a picture by letting every attention
layer attend to that picture's tokens. Computing those tokens' keys and values once, from the clean
picture, and injecting them as a ``kv`` cache is what diffusers' ``Flux2KleinKVPipeline`` does on
FLUX.2 [klein]: on its first step it runs the reference tokens through the transformer in
``kv_cache_mode="extract"`` and stores each layer's post-RoPE K/V (``Flux2KVCache``); later steps
attend to the stored K/V. This module computes the same K/V, outside any pipeline call, as a
:class:`~diffusion_templates.carriers.kv.KVCache` keyed by the adapter's layer names:

1. **picture** (:func:`prepare_reference_image`): RGB; larger than 1024x1024 pixels -> resized to that
   area (PIL Lanczos, ``Flux2ImageProcessor._resize_to_target_area``); centre-cropped to a multiple of
   the backbone's size multiple (16 px: VAE 8 x patch 2); preprocessed by the pipeline's own image
   processor to ``[-1, 1]``. This is ``Flux2KleinKVPipeline``'s path for a PIL image.
2. **tokens** (:func:`reference_tokens`): the family's VAE encode (posterior mode) and normalisation,
   packed as the denoiser takes image tokens, with position ids that set the reference apart from the
   generated image: FLUX.2 ``Flux2KleinKVPipeline._prepare_image_ids`` (time axis ``T = 10``;
   ``10 + 10 * index`` for the ``index``-th reference), FLUX.1 the FLUX.1 Kontext convention (first
   axis ``1``; ``1 + index``).
3. **capture** (:func:`capture_reference_kv`): the denoiser runs once on the reference tokens alone,
   at timestep 0 (the clean picture: ``Flux2KleinKVPipeline``'s ``ref_fixed_timestep=0``), with an
   empty text sequence. In the KV pipeline's extract pass the reference tokens attend only to
   themselves and are modulated with the fixed timestep, so their K/V do not depend on the prompt or
   on the noisy tokens: running them alone gives the same K/V (equal to float rounding; the test
   compares with the ``Flux2KVCache`` the pipeline extracts). Each attention layer's own K/V are
   read at that module's attention call, after RoPE, by a recorder attached to its attention point
   (``attention.py``, the mechanism the kv carrier injects through). Each processor is put back
   afterwards, exactly.

Backbones: ``flux2`` (proved against ``Flux2KleinKVPipeline``), ``flux`` (same construction;
diffusers has no FLUX.1 KV pipeline to compare with: FLUX.1 Kontext recomputes its reference tokens at
every step, attending jointly with text and noisy tokens). Other backbones are refused, see
:data:`UNSUPPORTED`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import imaging
from .attention import check_layer, point_for
from .errors import CacheError, UnsupportedError

__all__ = [
    "MAX_AREA",
    "MIN_SIDE",
    "SUPPORTED",
    "UNSUPPORTED",
    "ReferenceTokens",
    "capture_attention_kv",
    "capture_reference_kv",
    "prepare_reference_image",
    "reference_picture",
    "reference_tokens",
    "unsupported_reason",
]

#: Pictures above this many pixels are resized to it (``Flux2KleinKVPipeline``'s rule).
MAX_AREA = 1024 * 1024
#: Smallest side and largest aspect ratio ``Flux2ImageProcessor.check_image_input`` accepts.
MIN_SIDE = 64
MAX_ASPECT = 8

#: Backbone adapters whose reference K/V this module computes.
SUPPORTED = ("flux2", "flux")

#: Why the other backbones are refused.
UNSUPPORTED: dict[str, str] = {
    "sd3": (
        "SD3 positions image tokens by an absolute 2-D embedding added at the input (no RoPE, no extra "
        "position axis), so a reference picture's tokens cannot be placed apart from the generated "
        "image's; SD3 was not trained with reference tokens and diffusers has no reference pipeline to "
        "match"
    ),
    "qwen_image": (
        "Qwen-Image's reference conditioning (QwenImageEditPipeline) needs the Qwen-Image-Edit weights, "
        "feeds the picture to the Qwen2.5-VL text encoder as well, and recomputes the reference tokens "
        "jointly with text and noisy tokens at every step; there is no clean-reference K/V variant to match"
    ),
    "sdxl": (
        "SDXL's UNet has no image-token positions (its self-attention runs per resolution level on "
        "feature maps), so there are no reference tokens to place; 'reference-only' self-attention "
        "sharing is a different mechanism, not this one"
    ),
}


def unsupported_reason(adapter_name: str) -> str | None:
    """Why reference K/V cannot be computed for ``adapter_name`` (None when they can)."""
    if adapter_name in SUPPORTED:
        return None
    return UNSUPPORTED.get(
        adapter_name, f"no reference-token construction is defined for backbone {adapter_name!r}"
    )


def _refuse(adapter: Any) -> None:
    reason = unsupported_reason(adapter.name)
    if reason:
        raise UnsupportedError(f"reference K/V on backbone {adapter.name!r}: {reason}")


# --------------------------------------------------------------------------- the picture


def _is_pil(obj: Any) -> bool:
    return type(obj).__module__.startswith("PIL.")


def _check_size(width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise CacheError(
            f"reference image {width}x{height} is too small: both sides must be at least {MIN_SIDE} px"
        )
    if max(width / height, height / width) > MAX_ASPECT:
        raise CacheError(
            f"reference image {width}x{height}: aspect ratio above {MAX_ASPECT}:1 "
            "(Flux2ImageProcessor's limit)"
        )


def _crop_box(width: int, height: int, multiple: int) -> tuple[int, int, int, int]:
    """Centre crop to multiples of ``multiple`` (``Flux2ImageProcessor._resize_and_crop``'s arithmetic)."""
    new_w, new_h = width // multiple * multiple, height // multiple * multiple
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return left, top, left + new_w, top + new_h


def reference_picture(adapter: Any, image: Any) -> torch.Tensor:
    """A reference picture cropped as ``Flux2KleinKVPipeline`` crops it: float (1, 3, H, W) in [0, 1].

    ``image``: a PIL image (any mode; converted to RGB), or an RGB array/tensor in ``[0, 1]`` (uint8
    arrays are divided by 255), one picture. A PIL image follows ``Flux2KleinKVPipeline`` exactly:
    above :data:`MAX_AREA` pixels it is resized to that area with Lanczos; then it is centre-cropped
    to multiples of ``adapter.size_multiple()``. Arrays and tensors are resized (bicubic,
    antialiased) and cropped the same way. Sides under :data:`MIN_SIDE` px or an aspect ratio above
    8:1 are a :class:`CacheError` (``Flux2ImageProcessor.check_image_input``'s limits).
    """
    multiple = adapter.size_multiple()
    if _is_pil(image):
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        picture = image.convert("RGB")
        _check_size(*picture.size)
        if picture.size[0] * picture.size[1] > MAX_AREA:
            picture = Flux2ImageProcessor._resize_to_target_area(picture, MAX_AREA)
        box = _crop_box(*picture.size, multiple)
        if box != (0, 0, *picture.size):
            picture = picture.crop(box)
        return imaging.to_image_tensor(picture)
    tensor = imaging.to_image_tensor(image)
    if tensor.shape[0] != 1:
        raise CacheError(f"expected one reference image, got a batch of {tensor.shape[0]}")
    height, width = tensor.shape[-2:]
    _check_size(width, height)
    if width * height > MAX_AREA:
        scale = math.sqrt(MAX_AREA / (width * height))
        size = (int(height * scale), int(width * scale))
        tensor = torch.nn.functional.interpolate(
            tensor, size=size, mode="bicubic", antialias=True, align_corners=False
        ).clamp(0, 1)
        height, width = size
    left, top, right, bottom = _crop_box(width, height, multiple)
    return tensor[..., top:bottom, left:right].contiguous()


def prepare_reference_image(adapter: Any, image: Any) -> torch.Tensor:
    """:func:`reference_picture` as the pipeline's image processor prepares it: (1, 3, H, W) in [-1, 1].

    Laid out channels-last, as diffusers lays out PIL pictures (``numpy_to_pt`` transposes), so that
    the VAE encodes it bit-identically to ``Flux2KleinKVPipeline``.
    """
    picture = reference_picture(adapter, image)
    height, width = picture.shape[-2:]
    return imaging.preprocess_image(adapter.pipe, adapter, picture, height, width)


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class ReferenceTokens:
    """A reference picture as the denoiser takes image tokens.

    ``tokens`` (1, L, C) packed latents; ``ids`` the position ids the denoiser's RoPE reads, in the form
    its pipeline passes them (FLUX.2 (1, L, 4), FLUX.1 (L, 3)); ``height``/``width`` the picture's
    size in pixels after cropping.
    """

    tokens: torch.Tensor
    ids: torch.Tensor
    height: int
    width: int

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


def _vae_device_dtype(pipe: Any) -> tuple[torch.device, torch.dtype]:
    from diffusers.utils.torch_utils import get_module_execution_device

    return get_module_execution_device(pipe.vae), pipe.vae.dtype


@torch.no_grad()
def reference_tokens(adapter: Any, image: Any, *, index: int = 0) -> ReferenceTokens:
    """VAE-encode a reference picture and pack it with its position ids (see the module docstring)."""
    _refuse(adapter)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"reference index must be a non-negative integer, got {index!r}")
    pipe = adapter.pipe
    picture = prepare_reference_image(adapter, image)
    height, width = picture.shape[-2:]
    vae_device, vae_dtype = _vae_device_dtype(pipe)
    picture = picture.to(device=vae_device, dtype=vae_dtype)
    device = pipe._execution_device
    if adapter.name == "flux2":
        from diffusers import Flux2KleinKVPipeline as KV

        # Flux2KleinKVPipeline.prepare_image_latents, for one picture (its own static helpers).
        latents = KV._encode_vae_image(pipe, image=picture, generator=None)  # (1, 4C, h, w), mode
        ids = KV._prepare_image_ids([latents])  # (1, h*w, 4), T = 10 (the first reference's)
        ids[..., 0] = 10 + 10 * index  # _prepare_image_ids' T of the index-th reference
        tokens = KV._pack_latents(latents)
        return ReferenceTokens(tokens.to(device), ids.to(device), int(height), int(width))
    from diffusers import FluxKontextPipeline, FluxPipeline

    # FluxKontextPipeline.prepare_latents' image branch: mode, (z - shift) * scale, 2x2 packing, ids
    # with the first axis set to 1.
    latents = FluxKontextPipeline._encode_vae_image(pipe, image=picture, generator=None)
    batch, channels, rows, cols = latents.shape
    tokens = FluxPipeline._pack_latents(latents, batch, channels, rows, cols)
    ids = FluxPipeline._prepare_latent_image_ids(batch, rows // 2, cols // 2, device, tokens.dtype)
    ids[..., 0] = 1 + index
    return ReferenceTokens(tokens.to(device), ids, int(height), int(width))


# --------------------------------------------------------------------------- capture


class _CaptureOwner:
    """The capture running in this thread/task: a bare call of the same modules in another thread
    passes through the attention points without being recorded."""

    def __init__(self) -> None:
        self._running: ContextVar[bool] = ContextVar("dt_reference_capture", default=False)

    @property
    def active(self) -> bool:
        return self._running.get()


def capture_attention_kv(
    adapter: Any, run: Callable[[], Any], layers: list[str] | None = None
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``run()`` with every attention layer's own K/V recorded: ``{layer: [(key, value), ...]}``.

    Keys and values are (B, L, heads, head_dim), after RoPE, one pair per attention call of that layer,
    read at each layer's attention point (``attention.py``, the same per-module mechanism the kv
    carrier injects through). The processors are put back exactly afterwards, also when ``run``
    raises; the denoiser's lock is held meanwhile, so no templated call of the same denoiser runs
    meanwhile (bare calls from other threads pass through unrecorded).
    """
    from .pipeline import denoiser_lock

    available = adapter.attention_layers()
    names = list(available) if layers is None else list(layers)
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise CacheError(f"backbone {adapter.name!r} has no attention layers {unknown}")
    for name in names:  # before running anything: a layer the host cannot read would record nothing
        check_layer(name, available[name].module, what=f"reference capture on {adapter.name!r}")
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in names}
    owner = _CaptureOwner()
    with contextlib.ExitStack() as stack:
        stack.enter_context(denoiser_lock(adapter.denoiser))
        for name in names:
            point = point_for(available[name].module, name)

            def record(key: torch.Tensor, value: torch.Tensor, calls=records[name]) -> None:
                calls.append((key.detach().clone(), value.detach().clone()))

            stack.callback(point.detach_recorder, record)
            point.attach_recorder(record, owner)
        token = owner._running.set(True)
        stack.callback(owner._running.reset, token)
        with torch.no_grad():
            run()
    return records


def _run_flux2(adapter: Any, ref: ReferenceTokens) -> Callable[[], Any]:
    denoiser = adapter.denoiser
    dtype = denoiser.dtype
    hidden = ref.tokens.to(dtype)
    text = hidden.new_zeros(1, 0, denoiser.config.joint_attention_dim)
    text_ids = ref.ids.new_zeros(1, 0, ref.ids.shape[-1])
    # Flux2KleinKVPipeline's extract pass modulates the reference tokens with ref_fixed_timestep = 0
    # (its default; the pipeline never sets it) and passes guidance=None.
    timestep = hidden.new_zeros(1)
    return lambda: denoiser(
        hidden_states=hidden,
        encoder_hidden_states=text,
        timestep=timestep,
        img_ids=ref.ids,
        txt_ids=text_ids,
        guidance=None,
        return_dict=False,
    )


def _flux_pooled(pipe: Any, dtype: torch.dtype) -> torch.Tensor:
    """The pooled CLIP embedding of the empty prompt (FLUX.1's temb needs one)."""
    device = pipe._execution_device
    if getattr(pipe, "text_encoder", None) is not None and hasattr(pipe, "_get_clip_prompt_embeds"):
        return pipe._get_clip_prompt_embeds(prompt="", num_images_per_prompt=1, device=device).to(dtype)
    return torch.zeros(1, pipe.transformer.config.pooled_projection_dim, device=device, dtype=dtype)


def _run_flux(adapter: Any, ref: ReferenceTokens, guidance: float | None) -> Callable[[], Any]:
    pipe = adapter.pipe
    denoiser = adapter.denoiser
    dtype = denoiser.dtype
    hidden = ref.tokens.to(dtype)
    text = hidden.new_zeros(1, 0, denoiser.config.joint_attention_dim)
    text_ids = ref.ids.new_zeros(0, ref.ids.shape[-1])
    pooled = _flux_pooled(pipe, dtype)
    timestep = hidden.new_zeros(1)
    guidance_tensor = None
    if denoiser.config.guidance_embeds:
        if guidance is None:
            guidance = imaging.call_argument(pipe, {}, "guidance_scale")
            guidance = 3.5 if guidance is None else guidance
        guidance_tensor = torch.full((1,), float(guidance), device=hidden.device, dtype=torch.float32)
    return lambda: denoiser(
        hidden_states=hidden,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=timestep,
        img_ids=ref.ids,
        txt_ids=text_ids,
        guidance=guidance_tensor,
        return_dict=False,
    )


def capture_reference_kv(
    adapter: Any,
    image: Any,
    *,
    index: int = 0,
    guidance: float | None = None,
    template: str | None = None,
) -> Any:
    """The K/V every attention layer computes for a clean reference picture, as a ``KVCache``.

    Keys are the adapter's layer names (``double_<i>``, ``single_<i>``), tensors (1, L_ref, heads,
    head_dim) in the denoiser's dtype, on its device. ``index`` places the picture in the ``index``-th
    reference slot (see :func:`reference_tokens`); ``guidance`` is FLUX.1's guidance embedding for the
    reference pass (default: the pipeline's default ``guidance_scale``; FLUX.2 passes none, as
    ``Flux2KleinKVPipeline``). Raises :class:`UnsupportedError` on other backbones.
    """
    from .carriers.kv import KVCache

    _refuse(adapter)
    ref = reference_tokens(adapter, image, index=index)
    run = _run_flux2(adapter, ref) if adapter.name == "flux2" else _run_flux(adapter, ref, guidance)
    records = capture_attention_kv(adapter, run)
    keys, values = {}, {}
    for name, calls in records.items():
        if len(calls) != 1:
            raise CacheError(
                f"reference capture on {adapter.name!r}: attention layer {name!r} ran {len(calls)} attention "
                "calls, expected exactly 1 (an attention processor that splits its call is not supported)"
            )
        key, value = calls[0]
        if key.shape[1] != ref.length:
            raise CacheError(
                f"reference capture on {adapter.name!r}: layer {name!r} attended over {key.shape[1]} tokens, "
                f"expected the {ref.length} reference tokens"
            )
        keys[name], values[name] = key.contiguous(), value.contiguous()
    return KVCache(keys=keys, values=values, template=template)


# -- reference pictures given to templates (edit, contentref) -----------------------------------------
# Kept as RGB PIL images so the capture follows Flux2KleinKVPipeline's preprocessing exactly (it takes
# PIL images) and the cache store hashes them by content.
#: ``Flux2ImageProcessor.check_image_input``'s limits (the reference capture enforces them too).
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8
#: Refused above this many pixels before anything is decoded further (a decompression-bomb guard);
#: pictures above 1024 x 1024 are resized to that area by the capture.
REFERENCE_MAX_PIXELS = 8192 * 8192
REFERENCE_MODES = ("RGB", "L")


def to_reference_picture(value: Any) -> Image.Image:
    """Validate a picture input and return it as an RGB PIL image; ``ValueError`` says what is wrong."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"no image file at {str(path)!r}")
        try:
            with Image.open(path) as opened:
                if opened.size[0] * opened.size[1] > REFERENCE_MAX_PIXELS:
                    width, height = opened.size
                    raise ValueError(
                        f"{str(path)!r} is {width}x{height}, more than {REFERENCE_MAX_PIXELS} pixels"
                    )
                opened.load()
                value = opened.convert("RGB") if opened.mode not in REFERENCE_MODES else opened.copy()
        except ValueError:
            raise
        except Exception as exc:  # PIL raises several types for unreadable files
            raise ValueError(f"cannot read an image from {str(path)!r}: {exc}") from None
    if isinstance(value, Image.Image):
        if value.mode not in REFERENCE_MODES:
            raise ValueError(
                f"image mode must be one of {list(REFERENCE_MODES)}, got {value.mode!r} (convert it first)"
            )
        image = value.convert("RGB") if value.mode != "RGB" else value
    elif isinstance(value, np.ndarray):
        array = value
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
            raise ValueError(
                f"an image array must be (H, W), (H, W, 1) or (H, W, 3), got shape {value.shape}"
            )
        if array.dtype == np.uint8:
            pass
        elif np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise ValueError("a float image array must hold finite values in [0, 1]")
            array = np.round(array * 255).astype(np.uint8)  # 8 bits per channel, as a PIL image
        else:
            raise ValueError(f"an image array must be uint8 or float in [0, 1], got {array.dtype}")
        image = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    else:
        raise ValueError(f"expected a PIL image, a numpy array or a file path, got {type(value).__name__}")
    width, height = image.size
    if width * height > REFERENCE_MAX_PIXELS:
        raise ValueError(f"image is {width}x{height}, more than {REFERENCE_MAX_PIXELS} pixels")
    if min(width, height) < REFERENCE_MIN_SIDE:
        raise ValueError(f"image is {width}x{height}; both sides must be at least {REFERENCE_MIN_SIDE} px")
    if max(width / height, height / width) > REFERENCE_MAX_ASPECT:
        raise ValueError(
            f"image is {width}x{height}; the aspect ratio must be at most {REFERENCE_MAX_ASPECT}:1"
        )
    return image
