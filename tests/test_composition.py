"""Four carriers in one call on every backbone: kv + lora + residual (or guidance) + latent_mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_templates import TemplatePipeline
from diffusion_templates.carriers.guidance import GuidanceCache
from diffusion_templates.carriers.latent_mask import LatentMaskCache
from diffusion_templates.carriers.residual import ResidualCache
from diffusion_templates.imaging import to_image_tensor, to_mask_tensor
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny_controlnets import TINY_CONTROLNETS
from helpers import FAMILIES, run


def picture(seed: int = 0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(rgb)


def box_mask() -> Image.Image:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


def fourth_cache(tp: TemplatePipeline, family: str):
    """A ControlNet residual cache where the backbone has ControlNets (FLUX.2 has none: guidance)."""
    if "residual" not in tp.adapter.carriers:
        return GuidanceCache.single(kind="luminance", target=0.7, strength=0.5)
    controlnet = TINY_CONTROLNETS[family].build(seed=1)
    control = tp.adapter.prepare_control_image(
        picture(1), controlnet=controlnet, height=64, width=64,
        generator=torch.Generator().manual_seed(3), do_classifier_free_guidance=family == "sd3",
    )  # fmt: skip
    return ResidualCache.from_controlnet(controlnet, control, conditioning_scale=0.7)


@pytest.mark.parametrize("family", FAMILIES)
def test_four_carriers_in_one_call_leave_the_pipeline_bit_identical(family, tiny_pipes):
    pipe = tiny_pipes(family)
    tp = TemplatePipeline(pipe)
    first = next(iter(tp.adapter.attention_layers().values()))
    linear = next(f"{first.path}.{n}" for n, m in first.module.named_modules()
                  if isinstance(m, torch.nn.Linear))
    templates = [
        {"template": "test-kv", "scale": 0.7, "length": 3},
        {"template": "test-lora", "targets": [linear]},
        fourth_cache(tp, family),
        LatentMaskCache(mask=to_mask_tensor(box_mask()), image=to_image_tensor(picture()), template="mask"),
    ]
    bare = run(pipe, family)
    before = pipeline_state(pipe)
    out = run(tp, family, templates=templates)
    assert_pipeline_unchanged(before, pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, bare)
    carriers = {c.carrier for spec in templates for c in tp.encode(spec)}
    assert len(carriers) == 4, carriers
    # Each carrier matters: leaving any one out changes the result.
    for i in range(len(templates)):
        assert not torch.equal(run(tp, family, templates=templates[:i] + templates[i + 1:]), out)
    assert torch.equal(run(pipe, family), bare)
