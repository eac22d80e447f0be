"""Train ``brightness-kv`` on the ``dt-base-shapes`` demo model: the shipped ``shapes`` weights.

    python -m dt_template_brightness.shapes            # data set + training -> weights/shapes/
    nox -s train-templates                             # the three shapes templates at once

The data set (a folder with ``samples.jsonl``, the format ``dt train`` reads) comes from
``dt_base_shapes.data`` (seeded): each row is a synthetic image, its caption and, as the template's
input, the image's measured mean luminance (Rec. 709 luma, as the ``scale`` field defines it). The
images are the palette's own (background and shape colours and sizes spread the luminance from
about 0.05 to 0.95). Blending half of them toward white or black was tried first: it made the
luminance continuous, but the shapes VAE cannot draw washed-out colours, and the template learnt
textured artefacts for bright requests. Half of the captions leave the background out
(``"a large red circle in the center"``): the background sets most of an image's luminance, so on
those rows only the template says how bright it is.
Training is ``dt_sdk.train`` (the base model frozen, only the Template model learns).

``dt-base-shapes`` and ``dt-sdk`` are imported here only (``pip install dt-template-brightness[train]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .kv import WEIGHTS

TEMPLATE = "brightness-kv"
LUMA = np.array([0.2126, 0.7152, 0.0722])
#: The recipe of the shipped weights (about 5 minutes on one CPU core: 0.3 s a step, 35 s of stage 1).
RECIPE: dict[str, Any] = {
    "n": 3000,
    "steps": 1000,
    "batch": 24,
    "lr": 5e-3,
    "seed": 0,
    "partial": 0.5,
    "shifted": 0.0,  # 0.5 taught washed-out colours the VAE cannot draw: textured artefacts (see docs)
}


def luminance(image: np.ndarray) -> float:
    """Mean Rec. 709 luma of a (H, W, 3) uint8 or [0, 1] float image."""
    rgb = np.asarray(image, dtype=np.float64)
    if rgb.max() > 1.5:
        rgb = rgb / 255.0
    return float((rgb @ LUMA).mean())


def caption_without_background(attrs: Any) -> str:
    """``"a large red circle in the center"``: the caption without its background phrase."""
    return attrs.caption.split(" on ")[0]


def shift_brightness(image: np.ndarray, amount: float) -> np.ndarray:
    """Blend a uint8 image toward white (``amount`` > 0) or black (< 0) by ``|amount|``."""
    rgb = image.astype(np.float64) / 255.0
    target = 1.0 if amount > 0 else 0.0
    rgb = rgb * (1 - abs(amount)) + target * abs(amount)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def build_dataset(
    out: str | Path,
    n: int = RECIPE["n"],
    seed: int = 0,
    partial: float = RECIPE["partial"],
    shifted: float = RECIPE["shifted"],
) -> Path:
    """Write ``n`` rows (images as PNG, ``samples.jsonl``) to ``out``; returns the folder.

    ``partial``: fraction of captions without the background phrase. ``shifted``: fraction of images
    blended toward white or black by up to 60% (the first recipe's 0.5 made the luminance continuous
    but taught artefacts; the shipped weights use 0: the random draw stays, so data sets reproduce).
    """
    from dt_base_shapes.data import ShapesDataset
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    rows = []
    for sample in ShapesDataset(n, seed=seed):
        name = f"images/{sample.index:05d}.png"
        image = sample.image
        if rng.random() < shifted:
            image = shift_brightness(image, float(rng.uniform(-0.6, 0.6)))
        Image.fromarray(image).save(out / name)
        caption = caption_without_background(sample.attributes) if rng.random() < partial else sample.caption
        rows.append({"image": name, "caption": caption, "inputs": {"scale": round(luminance(image), 4)}})
    with open(out / "samples.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return out


def _recipe():
    from dt_base_shapes.recipes import kv_recipe  # dt-base-shapes: the package's `train` extra

    return kv_recipe(TEMPLATE, build_dataset, RECIPE, WEIGHTS / "shapes", __doc__.split("\n")[0])


def train_shapes(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Build the data set and train on dt-base-shapes (``dt_base_shapes.recipes.kv_recipe``)."""
    return _recipe()[0](*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    _recipe()[1](argv)


if __name__ == "__main__":
    main()
