"""The synthetic data set: deterministic, and every caption says what the image shows."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dt_base_shapes.data import (
    COLORS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    all_combinations,
    heldout_captions,
    is_held_out,
)

CAPTION = re.compile(
    r"^a (?P<size>small|large) (?P<color>\w+) (?P<shape>\w+) in the (?P<position>center|top left|top right|"
    r"bottom left|bottom right) on an? (?P<bg>\w+(?: and \w+)?) background$"
)


def test_same_seed_same_samples_and_other_seed_differs():
    a, b = ShapesDataset(24, seed=3), ShapesDataset(24, seed=3)
    for x, y in zip(a, b, strict=True):
        assert x.caption == y.caption
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
    assert a[5].caption == ShapesDataset(10, seed=3)[5].caption  # sample i depends on (seed, i) only
    other = ShapesDataset(24, seed=4)
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, other, strict=True))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_match_attributes_and_pixels(split):
    for s in ShapesDataset(40, seed=1, split=split):
        a = s.attributes
        m = CAPTION.match(s.caption)
        assert m, s.caption
        assert (m["size"], m["color"], m["shape"], m["position"]) == (a.size, a.color, a.shape, a.position)
        assert tuple(m["bg"].split(" and ")) == a.background
        assert a.shape in SHAPES and a.color in COLORS and a.color not in a.background
        assert is_held_out(a) == (split == "heldout")
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        # the silhouette is the shape's colour, its bounding box is where the caption says, of its size
        inside = s.image[_eroded(_eroded(s.mask))].astype(int)
        assert len(inside) and np.abs(inside - np.array(PALETTE[a.color])).max() <= 2
        x0, y0, x1, y1 = s.bbox
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        nearest = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
        assert nearest == a.position
        assert min(SIZES, key=lambda k: abs(SIZES[k] - max(x1 - x0, y1 - y0))) == a.size
        # the corners are background
        top = np.array(PALETTE[a.background[0]])
        bottom = np.array(PALETTE[a.background[-1]])
        assert np.abs(s.image[0, 0].astype(int) - top).max() <= 2 or s.mask[0, 0]
        assert np.abs(s.image[63, 63].astype(int) - bottom).max() <= 2 or s.mask[63, 63]
        luma = (s.image / 255.0) @ np.array([0.299, 0.587, 0.114])
        assert s.luminance == pytest.approx(luma.mean())


def _eroded(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def test_heldout_split_is_about_a_tenth_and_disjoint():
    combos = all_combinations()
    held = [a for a in combos if is_held_out(a)]
    assert 0.07 < len(held) / len(combos) < 0.13
    captions = {a.caption for a in heldout_captions(50)}
    assert len(captions) == 50
    train_captions = {s.caption for s in ShapesDataset(300, seed=0)}
    assert not captions & train_captions
