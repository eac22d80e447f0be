"""Input schema of the ``depth`` template: what a user passes in a template spec.

    {"template": "depth", "control_image": "depth.png", "controlnet": "path/to/controlnet",
     "conditioning_scale": 0.8, "start": 0.0, "end": 1.0}

Every constraint is checked before anything runs; a bad value fails with a ``TemplateInputError``
naming the template and the field. Images given as file paths are read here, so the computed cache
is keyed by the picture's content, never by its file name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator

from diffusion_templates import TemplateInputs
from diffusion_templates.errors import check_window

#: Sides of a control image, in pixels.
MIN_SIDE, MAX_SIDE = 8, 8192
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _path(value: str | os.PathLike, what: str) -> Path:
    """``value`` as a usable path (ValueError, which pydantic reports, for anything the OS refuses)."""
    try:
        path = Path(value).expanduser()
        path.exists()
    except (OSError, RuntimeError, ValueError, TypeError) as exc:  # unknown ~user, NUL bytes, too long
        raise ValueError(f"{what}: {value!r} is not a usable path ({exc})") from None
    return path


def load_picture(value: Any, what: str) -> Image.Image | np.ndarray:
    """A PIL image (mode RGB or L) or a checked numpy array, from a PIL image, an array or a file path."""
    if isinstance(value, (str, os.PathLike)):
        path = _path(value, what)
        if not path.is_file():
            raise ValueError(f"{what}: no image file at {str(path)!r}")
        try:
            with Image.open(path) as opened:
                value = opened.copy()  # read now: the file may change or vanish later
        except Exception as exc:  # PIL raises several types for unreadable files
            raise ValueError(f"{what}: cannot read {str(path)!r} as an image ({exc})") from None
        if value.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit depth PNGs: scale to 8 bits
            array = np.asarray(value, dtype=np.float64)
            full = max(65535.0, float(array.max()) if array.size else 0.0)  # 16-bit range, or the peak
            value = Image.fromarray(np.round(np.clip(array, 0, None) / full * 255).astype(np.uint8))
    if isinstance(value, Image.Image):
        if value.mode not in ("RGB", "L"):
            raise ValueError(
                f"{what}: image mode {value.mode!r} is not supported; give an 'L' (grayscale depth map) or "
                "'RGB' image (e.g. image.convert('L'))"
            )
        width, height = value.size
    elif isinstance(value, np.ndarray):
        array = value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
            raise ValueError(
                f"{what}: expected an array (H, W), (H, W, 1) or (H, W, 3), got shape {value.shape}"
            )
        if array.dtype == np.uint8:
            value = Image.fromarray(np.ascontiguousarray(array))
        elif np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise ValueError(f"{what}: float arrays must hold values in [0, 1]")
            value = np.ascontiguousarray(array, dtype=np.float32)
        else:
            raise ValueError(f"{what}: expected a uint8 or float array, got {array.dtype}")
        height, width = array.shape[:2]
    elif isinstance(value, torch.Tensor):
        raise ValueError(f"{what}: give a PIL image, a numpy array or a file path, not a tensor")
    else:
        raise ValueError(
            f"{what}: expected a PIL image, a numpy array or an image file path, got {type(value).__name__}"
        )
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ValueError(f"{what}: {width}x{height} pixels; each side must lie in [{MIN_SIDE}, {MAX_SIDE}]")
    return value


def check_model_folder(value: str, what: str, *, hub: bool) -> str:
    """A local folder of JSON + safetensors (no code), or, if ``hub``, a hub id ``owner/name``."""
    path = _path(value, what)
    if path.is_dir():
        code = sorted(p.name for p in path.rglob("*.py"))
        if code:
            raise ValueError(
                f"{what}: refusing a folder that contains code ({', '.join(code[:5])}); "
                "Diffusion Templates never runs files from a weights folder"
            )
        if not (path / "config.json").is_file():
            raise ValueError(f"{what}: {value!r} has no config.json")
        if not any(path.rglob("*.safetensors")):
            raise ValueError(
                f"{what}: {value!r} holds no .safetensors weights (pickled weights are never read)"
            )
        return str(path)
    if hub and _HUB_ID.match(value) and not value.startswith((".", "~")):
        return value
    where = "an existing local folder or a hub id 'owner/name'" if hub else "an existing local folder"
    raise ValueError(f"{what}: {value!r} is not {where}")


class DepthInputs(TemplateInputs):
    control_image: Any = Field(
        ...,
        description="The depth map: a PIL image (mode 'L' or 'RGB'), a numpy array (H, W) / (H, W, 3), uint8 "
        "or float in [0, 1], or an image file path (16-bit PNGs are scaled from 0..65535 to 8 bits). "
        "Near is bright, as ControlNet depth models expect (see `invert`). With `depth_model`, an RGB "
        "photo whose depth is estimated first.",
    )
    controlnet: str = Field(
        ...,
        description="The diffusers ControlNet for the pipeline's backbone: a local folder (config.json + "
        "safetensors) or a hub id. FLUX.1: FluxControlNetModel, SD3: SD3ControlNetModel, Qwen-Image: "
        "QwenImageControlNetModel, SDXL: ControlNetModel.",
    )
    conditioning_scale: float = Field(
        1.0,
        ge=0.0,
        le=2.0,
        description="Weight of the ControlNet residuals (diffusers' controlnet_conditioning_scale), 0 to 2.",
    )
    start: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of the denoising steps after which the ControlNet starts acting "
        "(control_guidance_start), 0 to 1.",
    )
    end: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of the denoising steps after which it stops (control_guidance_end), 0 to 1; "
        "must exceed start.",
    )
    depth_model: str | None = Field(
        None,
        description="A local folder holding a transformers depth-estimation model (config.json, "
        "preprocessor_config.json, safetensors), e.g. a saved Depth Anything or DPT. With it, control_image "
        "is an RGB photo and its estimated depth drives the ControlNet.",
    )
    invert: bool = Field(False, description="Invert the depth map (for maps where far is bright).")
    height: int | None = Field(
        None,
        ge=MIN_SIDE,
        le=MAX_SIDE,
        description="Height in pixels to prepare the control at: the call's height. Default: the control "
        "image's height, rounded down to the backbone's size multiple.",
    )
    width: int | None = Field(
        None,
        ge=MIN_SIDE,
        le=MAX_SIDE,
        description="Width in pixels to prepare the control at: the call's width. Default: the control "
        "image's width, rounded down to the backbone's size multiple.",
    )
    generator: int | torch.Generator | None = Field(
        0,
        description="Randomness of the VAE sample of the control image (FLUX.1, SD3, Qwen-Image), drawn at "
        "every call, one sample per image: a seed (default 0, reproducible), a torch.Generator (pass the "
        "call's own to reproduce diffusers' FLUX.1 / Qwen-Image ControlNet pipelines exactly: they sample "
        "with it before drawing the noise), or None for the global RNG (what diffusers' SD3 ControlNet "
        "pipeline uses).",
    )
    cfg_samples: bool = Field(
        False,
        description="SD3 only, kept for old specs: the control is now prepared for each call, with one VAE "
        "sample per image and per classifier-free-guidance half whenever the call runs CFG, as "
        "StableDiffusion3ControlNetPipeline does; this flag changes nothing.",
    )
    guess_mode: bool = Field(
        False, description="SDXL only: diffusers' guess_mode (the ControlNet sees the conditional half only)."
    )
    control_mode: int | None = Field(
        None,
        ge=0,
        le=63,
        description="FLUX.1 union ControlNets only: the control type index (diffusers' control_mode; "
        "depth is 2 for InstantX/FLUX.1-dev-Controlnet-Union).",
    )

    @field_validator("control_image", mode="before")
    @classmethod
    def _picture(cls, value: Any) -> Any:
        return load_picture(value, "control image")

    @field_validator("controlnet")
    @classmethod
    def _controlnet(cls, value: str) -> str:
        return check_model_folder(value, "controlnet", hub=True)

    @field_validator("depth_model")
    @classmethod
    def _depth_model(cls, value: str | None) -> str | None:
        if value is None:
            return None
        folder = check_model_folder(value, "depth_model", hub=False)
        if not (Path(folder) / "preprocessor_config.json").is_file():
            raise ValueError(
                f"depth_model: {value!r} has no preprocessor_config.json (save the model's image "
                "processor next to it: processor.save_pretrained(folder))"
            )
        return folder

    @model_validator(mode="after")
    def _window(self) -> DepthInputs:
        # Both fields, whichever the user gave (a validator on ``end`` skips its default).
        check_window(self, "end ({end}) must be larger than start ({start})")
        return self
