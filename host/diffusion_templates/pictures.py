"""Pictures given to a template's inputs (PIL images, numpy arrays, tensors or file paths) as tensors.

Validators raise ``ValueError`` with a message that says what was wrong and what is accepted, so
that the host reports a ``TemplateInputError`` naming the template and the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: PIL modes accepted for images (converted to RGB) and masks (converted to L).
IMAGE_MODES = ("RGB", "L")
MASK_MODES = ("L", "1", "RGB")
MAX_SIDE = 16384


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.")


def _open(path: str | os.PathLike) -> Any:
    from PIL import Image

    file = Path(os.fspath(path)).expanduser()
    if not file.is_file():
        raise ValueError(f"no image file at {str(file)!r}")
    try:
        with Image.open(file) as image:
            image.load()
            return image.copy()
    except Exception as exc:  # PIL raises several kinds for unreadable files
        raise ValueError(f"{str(file)!r} is not a readable image ({type(exc).__name__}: {exc})") from None


def _from_pil(image: Any, modes: tuple[str, ...], convert: str, what: str) -> torch.Tensor:
    if image.mode not in modes:
        raise ValueError(
            f"{what} mode {image.mode!r} is not supported: give a {' or '.join(modes)} image "
            f"(e.g. image.convert({convert!r}))"
        )
    # diffusers' VaeImageProcessor.pil_to_numpy: float32(pixels) / 255.
    array = np.array(image.convert(convert)).astype(np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor.permute(2, 0, 1)[None].contiguous() if tensor.ndim == 3 else tensor[None, None].contiguous()


def _unit(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if tensor.dtype == torch.bool:
        return tensor.float()
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if not tensor.is_floating_point():
        raise ValueError(f"{what} values must be uint8, bool or float in [0, 1], got {tensor.dtype}")
    tensor = tensor.float()
    if tensor.numel() == 0:
        raise ValueError(f"{what} is empty")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    low, high = float(tensor.min()), float(tensor.max())
    if low < 0 or high > 1:
        raise ValueError(f"float {what} values must lie in [0, 1], got [{low:.3g}, {high:.3g}]")
    return tensor


def _check_size(tensor: torch.Tensor, what: str, min_side: int) -> torch.Tensor:
    height, width = tensor.shape[-2:]
    if min(height, width) < min_side or max(height, width) > MAX_SIDE:
        raise ValueError(
            f"{what} is {width}x{height} pixels; each side must be between {min_side} and {MAX_SIDE}"
        )
    return tensor


def to_image(value: Any, *, what: str = "image", min_side: int = 8) -> torch.Tensor:
    """An RGB or grayscale picture as a float ``(1, 3, H, W)`` tensor in ``[0, 1]``.

    Accepts a PIL image (mode RGB or L), a file path, a numpy array ``(H, W)``, ``(H, W, 1)`` or
    ``(H, W, 3)`` (uint8, or float in [0, 1]), or a tensor ``(3, H, W)`` / ``(1, 3, H, W)`` /
    ``(H, W)``. Grayscale pictures are repeated to three channels.
    """
    if isinstance(value, (str, os.PathLike)):
        value = _open(value)
    if _is_pil(value):
        tensor = _from_pil(value, IMAGE_MODES, "RGB", what)
    elif isinstance(value, np.ndarray):
        array = value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value
        if array.ndim == 2:
            tensor = _unit(torch.from_numpy(np.array(array)), what)[None, None]
        elif array.ndim == 3 and array.shape[-1] == 3:
            tensor = _unit(torch.from_numpy(np.array(array)), what).permute(2, 0, 1)[None]
        else:
            raise ValueError(
                f"{what} array has shape {value.shape}: give (H, W) grayscale or (H, W, 3) RGB "
                "(RGBA and other channel counts are not supported)"
            )
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[0] != 1 or tensor.shape[1] not in (1, 3):
            raise ValueError(
                f"{what} tensor has shape {tuple(value.shape)}: give (3, H, W), (1, 3, H, W) or (H, W)"
            )
        tensor = _unit(tensor, what)
    else:
        raise ValueError(
            f"{what} must be a PIL image (RGB or L), a numpy array, a tensor or a file path, "
            f"got {type(value).__name__}"
        )
    if tensor.shape[1] == 1:
        tensor = tensor.repeat(1, 3, 1, 1)
    return _check_size(tensor.contiguous(), what, min_side)


def to_mask(value: Any, *, what: str = "mask", min_side: int = 8) -> torch.Tensor:
    """A mask as a float ``(1, 1, H, W)`` tensor in ``[0, 1]`` (1 = white = repaint).

    Accepts a PIL image (mode L, 1 or RGB, converted to grayscale), a file path, a numpy array
    ``(H, W)`` / ``(H, W, 1)`` (bool, uint8, or float in [0, 1]) or a tensor ``(H, W)`` /
    ``(1, H, W)`` / ``(1, 1, H, W)``.
    """
    if isinstance(value, (str, os.PathLike)):
        value = _open(value)
    if _is_pil(value):
        tensor = _from_pil(value, MASK_MODES, "L", what)
    elif isinstance(value, np.ndarray):
        array = value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value
        if array.ndim != 2:
            raise ValueError(f"{what} array has shape {value.shape}: give (H, W) or (H, W, 1)")
        tensor = _unit(torch.from_numpy(np.array(array)), what)[None, None]
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        while tensor.ndim < 4:
            tensor = tensor[None]
        if tensor.shape[:2] != (1, 1):
            raise ValueError(
                f"{what} tensor has shape {tuple(value.shape)}: give (H, W), (1, H, W) or (1, 1, H, W)"
            )
        tensor = _unit(tensor, what)
    else:
        raise ValueError(
            f"{what} must be a PIL image (L, 1 or RGB), a numpy array, a tensor or a file path, "
            f"got {type(value).__name__}"
        )
    return _check_size(tensor.contiguous(), what, min_side)
