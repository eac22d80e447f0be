"""Picture inputs: a PIL image, a numpy array or a file path, validated and kept as an RGB PIL image.

Keeping the picture as a PIL image means the host's reference capture follows
``Flux2KleinKVPipeline``'s preprocessing exactly (it takes PIL images), and the cache store hashes
it by content.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: ``Flux2ImageProcessor.check_image_input``'s limits (the reference capture enforces them too).
MIN_SIDE = 64
MAX_ASPECT = 8
#: Refused above this many pixels before anything is decoded further (a decompression-bomb guard);
#: pictures above 1024 x 1024 are resized to that area by the capture.
MAX_PIXELS = 8192 * 8192
MODES = ("RGB", "L")


def to_rgb_image(value: Any) -> Image.Image:
    """Validate a picture input and return it as an RGB PIL image; ``ValueError`` says what is wrong."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"no image file at {str(path)!r}")
        try:
            with Image.open(path) as opened:
                if opened.size[0] * opened.size[1] > MAX_PIXELS:
                    width, height = opened.size
                    raise ValueError(f"{str(path)!r} is {width}x{height}, more than {MAX_PIXELS} pixels")
                opened.load()
                value = opened.convert("RGB") if opened.mode not in MODES else opened.copy()
        except ValueError:
            raise
        except Exception as exc:  # PIL raises several types for unreadable files
            raise ValueError(f"cannot read an image from {str(path)!r}: {exc}") from None
    if isinstance(value, Image.Image):
        if value.mode not in MODES:
            raise ValueError(
                f"image mode must be one of {list(MODES)}, got {value.mode!r} (convert it first)"
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
    if width * height > MAX_PIXELS:
        raise ValueError(f"image is {width}x{height}, more than {MAX_PIXELS} pixels")
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"image is {width}x{height}; both sides must be at least {MIN_SIDE} px")
    if max(width / height, height / width) > MAX_ASPECT:
        raise ValueError(f"image is {width}x{height}; the aspect ratio must be at most {MAX_ASPECT}:1")
    return image
