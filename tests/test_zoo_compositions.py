"""The paper's fusion examples (figures 12-15) with the real zoo templates, each in one call.

superres + sharpness; depth + edit + color; depth + aesthetic + sharpness; inpaint + edit + brightness;
and inpaint + brightness + color. Each run must change the output, and leave the pipeline
bit-identical. Skipped where a zoo package is not installed (the suite installs them all).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from diffusion_templates import TemplatePipeline
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny_controlnets import TINY_CONTROLNETS
from helpers import run


def picture(size: int = 64, seed: int = 0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(rgb)


def centre_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1), fill=255)
    return mask


def needs(*names: str) -> None:
    for name in names:
        pytest.importorskip(f"dt_template_{name}")


def controlnet_folder(family: str, tmp_path) -> str:
    folder = tmp_path / f"controlnet-{family}"
    TINY_CONTROLNETS[family].build(seed=1).save_pretrained(folder)
    return str(folder)


def lora_file(tp: TemplatePipeline, tmp_path) -> str:
    """A diffusers-format LoRA file on the first attention layer's first Linear."""
    first = next(iter(tp.adapter.attention_layers().values()))
    name, linear = next((n, m) for n, m in first.module.named_modules() if isinstance(m, torch.nn.Linear))
    g = torch.Generator().manual_seed(5)
    key = f"{tp.adapter.lora_prefix}.{first.path}.{name}"
    path = tmp_path / "style.safetensors"
    save_file({f"{key}.lora_A.weight": torch.randn(4, linear.in_features, generator=g) * 0.3,
               f"{key}.lora_B.weight": torch.randn(linear.out_features, 4, generator=g) * 0.3}, str(path))
    return str(path)


def check(pipe, family: str, templates: list, **kwargs) -> torch.Tensor:
    tp = TemplatePipeline(pipe)
    bare = run(pipe, family, **kwargs)
    before = pipeline_state(pipe)
    out = torch.as_tensor(run(tp, family, templates=templates, **kwargs))
    bare = torch.as_tensor(bare)
    assert_pipeline_unchanged(before, pipe)
    assert torch.isfinite(out).all()
    assert out.shape != bare.shape or not torch.equal(out, bare)
    return out


def test_superres_and_sharpness(tiny_pipes):
    needs("superres", "sharpness")
    out = check(tiny_pipes("flux2_klein"), "flux2_klein", [
        {"template": "superres", "image": picture(32), "factor": 2, "strength": 0.6},
        {"template": "sharpness", "scale": 0.9}], output_type="np", height=None, width=None)
    assert out.shape[1:3] == (64, 64)


def test_inpaint_brightness_and_color(tiny_pipes):
    needs("inpaint", "brightness", "color")
    check(tiny_pipes("flux2_klein"), "flux2_klein", [
        {"template": "inpaint", "image": picture(), "mask": centre_mask(), "blur": 0},
        {"template": "brightness", "scale": 0.7},
        {"template": "color", "r": 0.9, "g": 0.2, "b": 0.1, "strength": 0.4}])


def test_inpaint_edit_and_brightness(tiny_pipes):
    needs("inpaint", "edit", "brightness")
    check(tiny_pipes("flux2_klein"), "flux2_klein", [
        {"template": "inpaint", "image": picture(), "mask": centre_mask(), "blur": 0},
        {"template": "edit", "image": picture(seed=2)},
        {"template": "brightness", "scale": 0.3}])


def test_depth_edit_and_color(tiny_pipes, tmp_path):
    needs("depth", "edit", "color")
    check(tiny_pipes("flux"), "flux", [
        {"template": "depth", "control_image": picture(seed=3).convert("L"),
         "controlnet": controlnet_folder("flux", tmp_path), "conditioning_scale": 0.8},
        {"template": "edit", "image": picture(seed=2)},
        {"template": "color", "r": 0.1, "g": 0.3, "b": 0.9, "strength": 0.4}])


def test_depth_aesthetic_and_sharpness(tiny_pipes, tmp_path):
    needs("depth", "aesthetic", "sharpness")
    pipe = tiny_pipes("sdxl")
    check(pipe, "sdxl", [
        {"template": "depth", "control_image": picture(seed=3).convert("L"),
         "controlnet": controlnet_folder("sdxl", tmp_path), "conditioning_scale": 0.8},
        {"template": "aesthetic",
         "loras": [{"path": lora_file(TemplatePipeline(pipe), tmp_path), "weight": 0.8}]},
        {"template": "sharpness", "scale": 0.8}])
