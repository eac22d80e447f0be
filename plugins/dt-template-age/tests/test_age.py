"""The age template: a shift of the prompt embeddings linear in age, zero at the anchors' midpoint, and an
output that moves monotonically with age, on tiny offline pipelines of every supported backbone."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch

from diffusion_templates import EmbeddingCache, TemplateError, TemplateInputError, TemplatePipeline
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs
from dt_sdk.conformance import MISSING, TemplateConformance, single_thread

TEMPLATE = "age"
PROMPT = "a portrait photo of a person"
FAMILY = {"flux": "flux", "flux2": "flux2_klein", "sd3": "sd3", "qwen_image": "qwen_image", "sdxl": "sdxl"}
BACKBONES = list(FAMILY)
AGES = [0.0, 0.25, 0.5, 0.75, 1.0]
# The tiny pipelines encode with these (FLUX.2: 2 of its few text layers; short sequences).
PROMPT_KWARGS = {"text_encoder_out_layers": [1, 2], "max_sequence_length": 32}


@functools.cache
def tiny(backbone: str):
    with single_thread():
        pipe = TINY_PIPELINES[FAMILY[backbone]].build()
        pipe(prompt="warm up", **tiny_call_kwargs(FAMILY[backbone], cfg=True))
    return pipe


def spec(age: float, **extra) -> dict:
    return {"template": TEMPLATE, "age": age, "prompt_kwargs": PROMPT_KWARGS, **extra}


def encode(backbone: str, age: float, **extra) -> EmbeddingCache:
    (cache,) = TemplatePipeline(tiny(backbone), store=None).encode(spec(age, **extra))
    return cache


def call_kwargs(backbone: str, cfg: bool = True) -> dict:
    return {"prompt": PROMPT, **tiny_call_kwargs(FAMILY[backbone], cfg=cfg, output_type="latent")}


def spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


# --------------------------------------------------------------------------- on the embeddings


@pytest.mark.parametrize("backbone", BACKBONES)
def test_cache_shift_is_linear_in_age_and_zero_at_the_midpoint(backbone):
    caches = {age: encode(backbone, age) for age in AGES}
    top = caches[1.0]
    assert top.delta.shape[:2] == (1, 1) and top.delta.abs().max() > 0
    assert (top.pooled_delta is not None) == (backbone in ("flux", "sd3", "sdxl"))
    for age, cache in caches.items():
        factor = (age - 0.5) / 0.5  # the shift at ``age`` is this multiple of the shift at age 1
        assert (cache.delta - factor * top.delta).abs().max() <= 1e-6 * top.delta.abs().max()
        if top.pooled_delta is not None:
            assert (
                cache.pooled_delta - factor * top.pooled_delta
            ).abs().max() <= 1e-6 * top.pooled_delta.abs().max()
    assert not caches[0.5].delta.any()  # exactly zero at the midpoint


@pytest.mark.parametrize("backbone", ["flux", "sdxl"])
def test_embeddings_reaching_the_denoiser_move_linearly(backbone):
    """What the denoiser receives (prompt tokens and pooled embedding) is base + a shift linear in age."""
    pipe = tiny(backbone)
    denoiser = pipe.unet if backbone == "sdxl" else pipe.transformer
    seen = []

    def grab(module, args, kwargs):
        pooled = kwargs.get("pooled_projections")
        if pooled is None:
            pooled = kwargs["added_cond_kwargs"]["text_embeds"]
        seen.append((kwargs["encoder_hidden_states"].clone(), pooled.clone()))

    def first_call(templates) -> tuple[torch.Tensor, torch.Tensor]:
        seen.clear()
        handle = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with single_thread():
                TemplatePipeline(pipe)(templates=templates, **call_kwargs(backbone, cfg=False))
        finally:
            handle.remove()
        return seen[0]

    base = first_call([])
    shifted = {age: first_call([spec(age)]) for age in AGES}
    assert torch.equal(shifted[0.5][0], base[0]) and torch.equal(shifted[0.5][1], base[1])
    for i in (0, 1):  # tokens, pooled
        top = shifted[1.0][i] - base[i]
        assert top.abs().max() > 1e-3
        for age in AGES:
            expected = base[i] + (age - 0.5) / 0.5 * top
            assert (shifted[age][i] - expected).abs().max() < 1e-5


def test_symmetric_custom_anchors_and_strength():
    """Anchor ages 0.2/0.8: their midpoint 0.5 is neutral; swapping the anchors flips the shift; strength
    multiplies it."""
    plain = encode("sd3", 0.8)
    custom = encode(
        "sd3", 0.5, young_age=0.2, old_age=0.8, young_prompt="a teenager", old_prompt="a grandmother"
    )
    assert not custom.delta.any() and not custom.pooled_delta.any()
    at_anchor = encode("sd3", 0.8, young_age=0.2, old_age=0.8)
    assert torch.allclose(at_anchor.delta, plain.delta / 0.6, rtol=1e-5, atol=1e-7)  # (0.8-0.5)/0.6 vs 0.3
    swapped = encode(
        "sd3", 0.8, young_prompt="a photo of an elderly person", old_prompt="a photo of a young child"
    )
    assert torch.allclose(swapped.delta, -plain.delta, atol=1e-7)
    doubled = encode("sd3", 0.8, strength=2.0)
    assert torch.allclose(doubled.delta, 2 * plain.delta, atol=1e-7)
    assert encode("sd3", 0.8, pooled=False).pooled_delta is None


# --------------------------------------------------------------------------- on the output


@pytest.mark.parametrize("backbone", BACKBONES)
def test_midpoint_output_equals_the_plain_pipeline(backbone):
    pipe = tiny(backbone)
    with single_thread():
        plain = pipe(**call_kwargs(backbone)).images
        before = pipeline_state(pipe)
        mid = TemplatePipeline(pipe)(templates=[spec(0.5)], **call_kwargs(backbone)).images
    assert_pipeline_unchanged(before, pipe)
    print(f"\n{backbone}: age 0.5, max |template - plain pipeline| = {(mid - plain).abs().max().item():.3g}")
    assert (mid - plain).abs().max() < 1e-6


@pytest.mark.parametrize("backbone", ["flux", "sdxl", "qwen_image"])
def test_output_moves_monotonically_with_age(backbone):
    """Statistic: the projection of (output - plain output) on the axis output(1) - output(0).
    Spearman over the five ages must be 1, and the distance from the plain output must grow with
    |age - 0.5| on both sides."""
    pipe = tiny(backbone)
    tp = TemplatePipeline(pipe)
    with single_thread():
        plain = pipe(**call_kwargs(backbone)).images.double()
        outs = [tp(templates=[spec(age)], **call_kwargs(backbone)).images.double() for age in AGES]
    axis = outs[-1] - outs[0]
    projection = [float(((out - plain) * axis).sum() / axis.norm()) for out in outs]
    distance = [float((out - plain).norm()) for out in outs]
    print(
        f"\n{backbone}: projection {np.round(projection, 4).tolist()}, "
        f"distance {np.round(distance, 4).tolist()}, Spearman {spearman(AGES, projection):.3f}"
    )
    assert spearman(AGES, projection) == pytest.approx(1.0)
    assert distance[2] < 1e-6
    assert distance[0] > distance[1] > distance[2] < distance[3] < distance[4]


def test_negative_template_shifts_the_unconditional_branch_only():
    pipe = tiny("sdxl")
    tp = TemplatePipeline(pipe)
    with single_thread():
        plain = pipe(**call_kwargs("sdxl")).images
        negative = tp(negative_templates=[spec(0.0)], **call_kwargs("sdxl")).images
        positive = tp(templates=[spec(0.0)], **call_kwargs("sdxl")).images
    assert (negative - plain).abs().max() > 1e-3
    assert (negative - positive).abs().max() > 1e-3


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_template_and_field():
    tp = TemplatePipeline(tiny("flux"), store=None)
    cases = [
        ({"age": 1.5}, "age", "less than or equal to 1"),
        ({"age": "old"}, "age", "valid number"),
        ({"young_age": 0.6, "old_age": 0.4}, "old_age", "larger than young_age"),
        ({"young_prompt": "   "}, "young_prompt", "blank"),
        ({"old_prompt": "a photo of a young child"}, "old_prompt", "no direction"),
        ({"strength": -1}, "strength", "greater than or equal to 0"),
        ({"prompt_kwargs": {"guidance_scale": 3}}, "prompt_kwargs", "Extra inputs"),
        ({"prompt_kwargs": {"max_sequence_length": 0}}, "prompt_kwargs", "greater than or equal to 1"),
        ({"direction": 1}, "direction", "Extra inputs"),
    ]
    for override, field, message in cases:
        with pytest.raises(TemplateInputError) as info:
            tp.encode({**spec(0.7), **override})
        assert info.value.template == TEMPLATE
        assert field in {loc.split(".")[0] for loc, _, _ in info.value.errors}, (override, str(info.value))
        assert re.search(message, str(info.value)), str(info.value)


def test_anchors_encoded_unlike_the_pipeline_is_a_clear_error():
    """FLUX.2 stacks text-encoder layers (9, 18, 27) by default; the tiny model has fewer."""
    tp = TemplatePipeline(tiny("flux2"), store=None)
    with pytest.raises(TemplateError, match=r"'age'.*anchor prompts.*text_encoder_out_layers"):
        tp.encode({"template": TEMPLATE, "age": 0.8})


def test_anchors_are_encoded_once_per_pipeline():
    """Moving the slider re-uses the anchors' direction: the text encoder runs for new anchors only."""
    pipe = tiny("sdxl")
    calls = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        first = encode("sdxl", 0.9, old_prompt="a photo of a very old person")
        assert len(calls) == 1
        second = encode("sdxl", 0.2, old_prompt="a photo of a very old person")
        assert len(calls) == 1  # memoised direction
        encode("sdxl", 0.2, old_prompt="a photo of a grandfather")
        assert len(calls) == 2
    finally:
        handle.remove()
    assert torch.allclose(second.delta, first.delta * (0.2 - 0.5) / (0.9 - 0.5), atol=1e-7)


# --------------------------------------------------------------------------- the conformance kit


class TestAge(TemplateConformance):
    template = TEMPLATE
    valid_inputs = [
        {"age": 0.9, "prompt_kwargs": PROMPT_KWARGS},
        {
            "age": 0.0,
            "young_prompt": "a toddler",
            "old_prompt": "an old man",
            "young_age": 0.1,
            "old_age": 0.7,
            "strength": 2.0,
            "pooled": False,
            "prompt_kwargs": PROMPT_KWARGS,
        },
    ]
    invalid_inputs = [
        {"age": -0.1},
        {"age": 1.1},
        ({"age": MISSING}, "age"),
        {"strength": 4.5},
        ({"young_age": 0.9, "old_age": 0.1}, "old_age"),
        {"young_prompt": ""},
        {"prompt_kwargs": {"text_encoder_out_layers": []}},
        {"prompt_kwargs": {"seed": 1}},
    ]
