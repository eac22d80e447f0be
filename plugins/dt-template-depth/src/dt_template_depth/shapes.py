"""Train ``structure-kv`` on the ``dt-base-shapes`` demo model: the shipped ``shapes`` weights.

    python -m dt_template_depth.shapes                 # data set + training -> weights/shapes/
    nox -s train-templates                             # the three shapes templates at once

The data set (a folder with ``samples.jsonl``, the format ``dt train`` reads) comes from
``dt_base_shapes.data`` (seeded): each row is a synthetic image, its caption and, as the template's
input, the shape's silhouette as a mask PNG (``masks/<i>.png``, named relative to the folder). Half of
the captions leave the shape, its size and its position out (``"a red shape on a green background"``):
on those rows only the template says where the shape is and what outline it has. Training is
``dt_sdk.train`` (the base model frozen, only the Template model learns).

``dt-base-shapes`` and ``dt-sdk`` are imported here only (``pip install dt-template-depth[train]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .structure import WEIGHTS

TEMPLATE = "structure-kv"
#: The recipe of the shipped weights (about 5.5 minutes on one CPU core: 0.4 s a step, 40 s of stage 1).
RECIPE: dict[str, Any] = {"n": 3000, "steps": 750, "batch": 24, "lr": 5e-3, "seed": 0, "partial": 0.5}


def caption_without_structure(attrs: Any) -> str:
    """``"a red shape on a green background"``: the caption without shape, size and position."""
    return f"a {attrs.color} shape on {attrs.caption.split(' on ', 1)[1]}"


def build_dataset(
    out: str | Path, n: int = RECIPE["n"], seed: int = 0, partial: float = RECIPE["partial"]
) -> Path:
    """Write ``n`` rows (images as PNG, ``samples.jsonl``) to ``out``; returns the folder."""
    from dt_base_shapes.data import ShapesDataset
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    rows = []
    for sample in ShapesDataset(n, seed=seed):
        name = f"images/{sample.index:05d}.png"
        Image.fromarray(sample.image).save(out / name)
        mask = f"masks/{sample.index:05d}.png"
        Image.fromarray(sample.mask.astype(np.uint8) * 255).save(out / mask)
        caption = caption_without_structure(sample.attributes) if rng.random() < partial else sample.caption
        rows.append({"image": name, "caption": caption, "inputs": {"mask": mask}})
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
