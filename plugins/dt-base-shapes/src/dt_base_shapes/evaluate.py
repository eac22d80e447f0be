"""Measured quality: generate images for held-out captions and check them against the captions.

For each held-out caption (a combination never in the training split) and a fixed seed:

- shape colour: the mean colour of the silhouette the caption asks for (its position and size, the
  shape drawn without jitter, eroded by the jitter so it stays inside the drawn shape), classified
  by the nearest palette colour;
- background colour: the mean colour of each background region (the whole image or each half of a
  two-tone background, away from the shape), nearest palette colour; correct when every region is;
- position: the centroid of the foreground (pixels far from the measured background) is nearest
  to the caption's position;
- size: the foreground's bounding-box side is nearest to the caption's size;
- shape: a tiny CNN, trained here in seconds on foreground maps of synthetic images, classifies the
  generated image's foreground map.

The same measures on the held-out images themselves and on their VAE reconstructions give the
ceilings (what a perfect transformer would score with this VAE).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import (
    JITTER,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZE,
    SIZES,
    Attributes,
    ShapesDataset,
    heldout_captions,
    silhouette,
)

_PALETTE = np.array(list(PALETTE.values()), dtype=np.float64) / 255.0
_NAMES = list(PALETTE)
FEATURE = 24  # side of the shape classifier's input


def nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _erode(mask: np.ndarray, times: int) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    for _ in range(times):
        t = -F.max_pool2d(-t, 3, stride=1, padding=1)
    return t[0, 0].numpy() > 0.5


@functools.lru_cache(maxsize=4096)
def _away(attrs: Attributes) -> np.ndarray:
    """Pixels certainly outside the shape, wherever the jitter put it."""
    cx, cy = POSITIONS[attrs.position]
    margin = SIZES[attrs.size] / 2 + 2 * JITTER + 2
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return (np.abs(xx - cx) > margin) | (np.abs(yy - cy) > margin)


@functools.lru_cache(maxsize=4096)
def expected_masks(attrs: Attributes) -> tuple[np.ndarray, list[np.ndarray]]:
    """The shape's core (inside the drawn shape whatever the jitter) and the background regions."""
    cx, cy = POSITIONS[attrs.position]
    side = SIZES[attrs.size]
    ideal = silhouette(attrs.shape, cx, cy, side - JITTER) >= 0.5
    core = ideal
    for times in range(JITTER + 1, 0, -1):
        eroded = _erode(ideal, times)
        if eroded.sum() >= 4:
            core = eroded
            break
    away = _away(attrs)
    yy = np.mgrid[0:SIZE, 0:SIZE][0]
    if len(attrs.background) == 1:
        regions = [away]
    else:
        half = SIZE // 2
        regions = [away & (yy < half - 2), away & (yy >= half + 2)]
    return core, regions


def _background_map(image: np.ndarray, away: np.ndarray) -> np.ndarray:
    """Per-pixel measured background colour: each row's median away from the expected shape.

    Row by row, so a two-tone background's (possibly blurred) boundary is background too.
    """
    bg = np.empty_like(image)
    fallback = np.median(image[away], axis=0) if away.any() else image.mean(axis=(0, 1))
    for y in range(image.shape[0]):
        bg[y] = np.median(image[y, away[y]], axis=0) if away[y].any() else fallback
    return bg


def foreground(image: np.ndarray, attrs: Attributes) -> np.ndarray:
    """(64, 64) soft foreground map in [0, 1]: distance from the measured background, normalised."""
    dist = np.sqrt(((image - _background_map(image, _away(attrs))) ** 2).sum(axis=-1))
    scale = max(0.15, float(np.percentile(dist, 99)))
    return np.clip(dist / scale, 0.0, 1.0)


def shape_feature(fg: np.ndarray) -> np.ndarray:
    """The foreground map cropped to its bounding box (made square), resized to FEATURE x FEATURE."""
    ys, xs = np.nonzero(fg > 0.5)
    if len(xs) == 0:
        return np.zeros((FEATURE, FEATURE), dtype=np.float32)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0) + 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    pad = np.pad(fg, side)
    sx, sy = int(round(cx - side / 2)) + side, int(round(cy - side / 2)) + side
    crop = torch.from_numpy(pad[sy : sy + side, sx : sx + side].astype(np.float32))[None, None]
    return F.interpolate(crop, size=(FEATURE, FEATURE), mode="area")[0, 0].numpy()


class ShapeClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * (FEATURE // 4) ** 2, len(SHAPES)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def predict(self, features: np.ndarray) -> list[str]:
        with torch.no_grad():
            logits = self(torch.from_numpy(np.asarray(features, dtype=np.float32))[:, None])
        return [SHAPES[i] for i in logits.argmax(dim=1).tolist()]


def _blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soften edges and colours a little (half the time), like a small VAE does, and add noise."""
    if rng.random() < 0.5:
        pad = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        box = sum(pad[dy : dy + SIZE, dx : dx + SIZE] for dy in range(3) for dx in range(3)) / 9.0
        image = 0.5 * image + 0.5 * box
    return np.clip(image + rng.normal(0, 0.02, size=image.shape), 0, 1)


def train_shape_classifier(n: int = 2000, steps: int = 300, seed: int = 7) -> ShapeClassifier:
    """A tiny CNN on foreground maps of synthetic images (all splits, blur/noise augmented): seconds."""
    rng = np.random.default_rng(seed)
    data = ShapesDataset(n, seed=seed, split="all")
    feats, labels = [], []
    for sample in data:
        image = _blur(sample.image.astype(np.float64) / 255.0, rng)
        feats.append(shape_feature(foreground(image, sample.attributes)))
        labels.append(SHAPES.index(sample.shape))
    x = torch.from_numpy(np.stack(feats))[:, None]
    y = torch.tensor(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(x), (128,), generator=gen)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def score(images: np.ndarray, attrs: list[Attributes], classifier: ShapeClassifier) -> dict[str, Any]:
    """Accuracies of (N, 64, 64, 3) images (uint8 or float in [0, 1]) against their captions."""
    images = np.asarray(images, dtype=np.float64)
    if images.max() > 1.5:
        images = images / 255.0
    rows = []
    feats = []
    for image, a in zip(images, attrs, strict=True):
        core, regions = expected_masks(a)
        shape_color = nearest_color(image[core].mean(axis=0))
        bg_colors = tuple(nearest_color(image[r].mean(axis=0)) for r in regions)
        fg = foreground(image, a)
        ys, xs = np.nonzero(fg > 0.5)
        if len(xs):
            cx, cy = xs.mean(), ys.mean()
            position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
            side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            size = min(SIZES, key=lambda s: abs(SIZES[s] - side))
        else:
            position, size = "none", "none"
        feats.append(shape_feature(fg))
        rows.append(
            {
                "caption": a.caption,
                "shape_color": shape_color,
                "background": bg_colors,
                "position": position,
                "size": size,
            }
        )
    for row, shape in zip(rows, classifier.predict(np.stack(feats)), strict=True):
        row["shape"] = shape
    acc = {
        "shape_color": np.mean([r["shape_color"] == a.color for r, a in zip(rows, attrs, strict=True)]),
        "background_color": np.mean(
            [r["background"] == a.background for r, a in zip(rows, attrs, strict=True)]
        ),
        "shape": np.mean([r["shape"] == a.shape for r, a in zip(rows, attrs, strict=True)]),
        "position": np.mean([r["position"] == a.position for r, a in zip(rows, attrs, strict=True)]),
        "size": np.mean([r["size"] == a.size for r, a in zip(rows, attrs, strict=True)]),
    }
    acc = {k: float(v) for k, v in acc.items()}
    acc["color"] = (acc["shape_color"] + acc["background_color"]) / 2
    return {"accuracy": acc, "rows": rows}


def generate(
    pipe, attrs: list[Attributes], call_kwargs: dict[str, Any], seed: int = 0, batch: int = 16
) -> np.ndarray:
    """One image per caption, caption i with seed ``seed + i``; (N, 64, 64, 3) float in [0, 1]."""
    out = []
    for i in range(0, len(attrs), batch):
        chunk = attrs[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(
            prompt=[a.caption for a in chunk], generator=gens, output_type="np", **call_kwargs
        ).images
        out.append(np.asarray(images))
    return np.concatenate(out)


def reference_images(n: int, seed: int = 4321) -> tuple[np.ndarray, list[Attributes]]:
    """Held-out synthetic images (jittered), for the ceilings."""
    data = ShapesDataset(n, seed=seed, split="heldout")
    samples = list(data)
    return np.stack([s.image for s in samples]), [s.attributes for s in samples]


@torch.no_grad()
def vae_roundtrip(vae, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(vae.device)
    y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return y.clamp(-1, 1).add(1).div(2).permute(0, 2, 3, 1).cpu().numpy()


def evaluate(pipe, call_kwargs: dict[str, Any], n: int = 64, seed: int = 0, log=print) -> dict[str, Any]:
    """Everything ``dt-base-shapes evaluate`` reports (without the per-image rows)."""
    t0 = time.perf_counter()
    classifier = train_shape_classifier()
    log(f"shape classifier trained in {time.perf_counter() - t0:.1f} s")
    ref_images, ref_attrs = reference_images(n)
    result: dict[str, Any] = {
        "n": n,
        "call_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in call_kwargs.items()},
        "reference": score(ref_images, ref_attrs, classifier)["accuracy"],
        "vae_roundtrip": score(vae_roundtrip(pipe.vae, ref_images), ref_attrs, classifier)["accuracy"],
    }
    attrs = heldout_captions(n)
    t0 = time.perf_counter()
    images = generate(pipe, attrs, call_kwargs, seed=seed)
    result["generation_seconds"] = time.perf_counter() - t0
    scored = score(images, attrs, classifier)
    result["generated"] = scored["accuracy"]
    result["rows"] = scored["rows"]
    result["images"] = images
    return result
