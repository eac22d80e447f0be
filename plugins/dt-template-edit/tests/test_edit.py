"""The edit template: conformance kit, equality with diffusers' Flux2KleinKVPipeline, CFG rule, composition.

Tiny offline pipelines (random weights, CPU); imports only the host, dt_sdk, this package and
torch/diffusers/numpy/PIL.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from diffusers.models.transformers.transformer_flux2 import Flux2KVCache
from diffusion_templates import (
    GuidanceCache,
    LatentMaskCache,
    TemplateInputError,
    TemplatePipeline,
    UnsupportedError,
)
from diffusion_templates.testing.snapshot import pipeline_state, state_differences
from diffusion_templates.testing.tiny import build_flux, build_flux2_klein, build_sd3, tiny_call_kwargs
from dt_sdk.conformance import MISSING, TemplateConformance, single_thread
from PIL import Image

TEMPLATE = "edit"
PROMPT = "make the circle blue"


def picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


IMAGE = picture()


class TestEdit(TemplateConformance):
    template = TEMPLATE
    valid_inputs = [
        {"image": IMAGE},
        {"image": IMAGE, "strength": 0.5, "instruction": "make it snowy"},
        {"image": np.asarray(IMAGE)},
        {"image": np.asarray(IMAGE)[..., 0].astype(np.float32) / 255, "reference_index": 7},
        {"image": IMAGE.convert("L")},
    ]
    invalid_inputs = [
        ({"image": MISSING}, "image"),
        {"image": picture(48, 64)},  # a side under 64 px
        {"image": picture(640, 64)},  # aspect ratio 10:1
        {"image": IMAGE.convert("RGBA")},  # mode
        {"image": "/no/such/picture.png"},
        {"image": np.zeros((64, 64, 4), np.uint8)},
        {"image": np.full((64, 64, 3), 2.0)},  # float outside [0, 1]
        {"image": 3},
        {"strength": 0.0},
        {"strength": 1.5},
        {"instruction": ""},
        {"reference_index": 8},
        {"reference_index": -1},
    ]


# --------------------------------------------------------------------------- helpers


def _call(**extra):
    kwargs = tiny_call_kwargs("flux2_klein", steps=3, output_type="latent")
    kwargs.update(extra)
    return kwargs


def _kv_cache_of(kv_pipe: Flux2KleinKVPipeline, image: Image.Image) -> Flux2KVCache:
    """The Flux2KVCache the KV pipeline extracts for ``image`` (copied before the pipeline clears it)."""
    original = kv_pipe.transformer.forward
    copy: dict[str, Flux2KVCache] = {}

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if kwargs.get("kv_cache_mode") == "extract":
            cache = out[1]
            kept = Flux2KVCache(len(cache.double_block_caches), len(cache.single_block_caches))
            kept.num_ref_tokens = cache.num_ref_tokens
            for mine, theirs in zip(kept.double_block_caches + kept.single_block_caches,
                                    cache.double_block_caches + cache.single_block_caches, strict=True):
                mine.store(*(t.clone() for t in theirs.get()))
            copy["cache"] = kept
        return out

    kv_pipe.transformer.forward = forward
    try:
        kwargs = _call()
        kwargs.pop("guidance_scale")
        kv_pipe(image=image, prompt=PROMPT, **kwargs)
    finally:
        del kv_pipe.transformer.forward
    return copy["cache"]


def _kv_pipeline() -> Flux2KleinKVPipeline:
    pipe = Flux2KleinKVPipeline(**build_flux2_klein().components)  # its own copy: it swaps processors
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _max_diff(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape
    return float((a.double() - b.double()).abs().max())


# --------------------------------------------------------------------------- FLUX.2 equality


@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_equals_flux2_klein_kv_pipeline(output_type):
    """edit == Flux2KleinKVPipeline(image=...) for the same tiny model, picture, prompt and seed.

    Both attend to the same reference K/V on every layer and step; the KV pipeline puts them between
    the text and image keys, the kv carrier after the image keys: equal up to summation order.
    """
    image = picture(80, 64, seed=1)
    kv_pipe = _kv_pipeline()
    kwargs = _call(output_type=output_type)
    kwargs.pop("guidance_scale")
    with single_thread():
        expected = kv_pipe(image=image, prompt=PROMPT, **kwargs).images
        tp = TemplatePipeline(build_flux2_klein())
        got = tp(prompt=PROMPT, templates=[{"template": TEMPLATE, "image": image}],
                 **_call(output_type=output_type)).images
        bare = tp(prompt=PROMPT, **_call(output_type=output_type)).images
    assert _max_diff(got, expected) < 1e-4
    assert _max_diff(bare, expected) > 1e-3  # the reference matters


def test_cfg_rule_reference_in_the_branches_it_is_listed_for():
    """With real CFG (klein base, guidance 4), Flux2KleinPipeline(image=...) conditions both branches on
    the reference; the KV pipeline has no CFG. edit reaches the unconditional branch only when listed in
    ``negative_templates`` too. Reference: Flux2KleinPipeline with the KV processors, called with the KV
    pipeline's extracted cache in cached mode (both branches, or the conditional one only)."""
    image = picture(64, 64, seed=2)
    with single_thread():
        cache = _kv_cache_of(_kv_pipeline(), image)
        reference = build_flux2_klein()
        Flux2KleinKVPipeline._set_kv_attn_processors(reference)  # uses only .transformer
        original = reference.transformer.forward
        calls = {"n": 0}

        def cached(both: bool):
            def forward(*args, **kwargs):
                calls["n"] += 1
                if both or calls["n"] % 2 == 1:  # Flux2KleinPipeline: cond first, then uncond
                    kwargs.update(kv_cache=cache, kv_cache_mode="cached")
                return original(*args, **kwargs)
            return forward

        tp = TemplatePipeline(build_flux2_klein())
        spec = {"template": TEMPLATE, "image": image}
        results = {}
        for both in (True, False):
            reference.transformer.forward = cached(both)
            expected = reference(prompt=PROMPT, **_call(guidance_scale=4.0)).images
            got = tp(prompt=PROMPT, templates=[spec], negative_templates=[spec] if both else [],
                     **_call(guidance_scale=4.0)).images
            results[both] = _max_diff(got, expected)
    assert results[True] < 1e-4 and results[False] < 1e-4, results


def test_negative_template_gives_the_reference_only():
    tp = TemplatePipeline(build_flux2_klein())
    spec = {"template": TEMPLATE, "image": IMAGE, "strength": 0.5, "instruction": "make it red"}
    assert [c.carrier for c in tp.encode(spec)] == ["kv", "init_latents", "embedding"]
    assert [c.carrier for c in tp.encode(spec, negative=True)] == ["kv"]


# --------------------------------------------------------------------------- layout and instruction


@pytest.mark.parametrize("build, family", [(build_flux2_klein, "flux2_klein"), (build_flux, "flux")],
                         ids=["flux2", "flux"])
def test_strength_starts_from_the_picture(build, family):
    """Below 1 the generation starts from the picture's latents noised to that level (img2img): the
    denoiser's first input gets closer to them as strength falls, and the run is shorter. (Strength 1
    sets no start: the pipeline's own noise, drawn first, as in Flux2KleinKVPipeline.)"""
    from diffusion_templates.imaging import encode_image, preprocess_image, to_image_tensor

    image = picture(64, 64, seed=3)
    with single_thread():
        tp = TemplatePipeline(build())
        with torch.no_grad():
            # FLUX.1 samples the VAE posterior with the call's generator, first (FluxImg2ImgPipeline's order)
            source = tp.adapter.pack_latents(encode_image(
                tp.pipe, tp.adapter, preprocess_image(tp.pipe, tp.adapter, to_image_tensor(image), 64, 64),
                torch.Generator().manual_seed(0)))
        distances, steps = [], []
        for strength in (0.9, 0.75, 0.5, 0.25):
            seen: list[torch.Tensor] = []

            def record(module, args, kwargs, seen=seen):
                seen.append(kwargs["hidden_states"][:, : source.shape[1]])

            handle = tp.pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
            try:
                tp(prompt=PROMPT, templates=[{"template": TEMPLATE, "image": image, "strength": strength}],
                   **tiny_call_kwargs(family, steps=4, output_type="latent"))
            finally:
                handle.remove()
            seen = seen[1:]  # the first call is the reference capture (encode), then the denoising steps
            distances.append(float((seen[0] - source).square().mean().sqrt()))
            steps.append(len(seen))
    assert distances == sorted(distances, reverse=True), distances
    assert steps == [4, 3, 2, 1]


def test_instruction_tokens_are_the_prompt_encoding():
    """An instruction becomes the text encoder's tokens for it (no padding), appended to the prompt."""
    pipe = build_flux2_klein()
    tp = TemplatePipeline(pipe)
    caches = tp.encode({"template": TEMPLATE, "image": IMAGE, "instruction": "make it red"})
    tokens = next(c for c in caches if c.carrier == "embedding").tokens
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(prompt="make it red", max_sequence_length=tokens.shape[1],
                                         text_encoder_out_layers=(1, 2))
    assert torch.equal(tokens, expected)
    ids = pipe.tokenizer(pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "make it red"}], tokenize=False, add_generation_prompt=True,
        enable_thinking=False))["input_ids"]
    assert tokens.shape[1] == len(ids)  # unpadded
    with single_thread():
        plain = tp(prompt=PROMPT, templates=[{"template": TEMPLATE, "image": IMAGE}], **_call()).images
        spec = {"template": TEMPLATE, "image": IMAGE, "instruction": "make it red"}
        told = tp(prompt=PROMPT, templates=[spec], **_call()).images
    assert not torch.equal(plain, told)


def test_flux1_instruction_tokens_are_t5_tokens():
    pipe = build_flux()
    tp = TemplatePipeline(pipe)
    caches = tp.encode({"template": TEMPLATE, "image": IMAGE, "instruction": "make it red"})
    tokens = next(c for c in caches if c.carrier == "embedding").tokens
    with torch.no_grad():  # as inside the pipeline (T5 picks other kernels under autograd)
        expected = pipe._get_t5_prompt_embeds(prompt="make it red", max_sequence_length=tokens.shape[1])
    assert torch.equal(tokens, expected)
    assert tokens.shape[1] == len(pipe.tokenizer_2("make it red")["input_ids"])


# --------------------------------------------------------------------------- composition


def test_composes_with_inpainting_and_guidance_and_restores():
    """latent_mask (keep the right half) + edit (strength 0.75) + a luminance guidance cache in one
    call, with CFG; each changes the output, and the pipeline is bit-identical afterwards."""
    pipe = build_flux2_klein()
    tp = TemplatePipeline(pipe)
    source = torch.from_numpy(np.array(picture(64, 64, seed=4))).permute(2, 0, 1)[None].float() / 255
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1.0  # generate the left half, keep the right half
    inpaint = LatentMaskCache(mask=mask, image=source, template="inpaint-like")
    bright = GuidanceCache.single(kind="luminance", target=0.8, strength=0.5)
    edit = {"template": TEMPLATE, "image": picture(64, 64, seed=5), "strength": 0.75}
    kwargs = dict(steps=4, cfg=True, output_type="latent")
    with single_thread():
        bare = pipe(prompt=PROMPT, **tiny_call_kwargs("flux2_klein", **kwargs)).images
        before, backends = pipeline_state(pipe), dict(_AttentionBackendRegistry._backends)
        outputs = {}
        for name, templates in {
            "all": [inpaint, edit, bright], "no-edit": [inpaint, bright], "no-inpaint": [edit, bright],
            "no-guidance": [inpaint, edit],
        }.items():
            outputs[name] = tp(prompt=PROMPT, templates=templates, negative_templates=[edit],
                               **tiny_call_kwargs("flux2_klein", **kwargs)).images
        after = pipe(prompt=PROMPT, **tiny_call_kwargs("flux2_klein", **kwargs)).images
    assert state_differences(before, pipeline_state(pipe)) == []
    assert dict(_AttentionBackendRegistry._backends) == backends
    assert torch.equal(bare, after)
    for name in ("no-edit", "no-inpaint", "no-guidance"):
        assert _max_diff(outputs["all"], outputs[name]) > 1e-4, name


# --------------------------------------------------------------------------- refusals and errors


def test_refused_backbones_say_why():
    tp = TemplatePipeline(build_sd3())
    with pytest.raises(UnsupportedError, match="supports backbones"):
        tp.encode({"template": TEMPLATE, "image": IMAGE})
    from diffusion_templates.reference import unsupported_reason

    assert "absolute" in unsupported_reason("sd3")


def test_errors_name_template_and_field():
    tp = TemplatePipeline(build_flux2_klein())
    with pytest.raises(TemplateInputError) as info:
        tp.encode({"template": TEMPLATE, "image": picture(32, 64), "strength": 2})
    message = str(info.value)
    assert "'edit'" in message and "'image'" in message and "'strength'" in message
    assert "at least 64 px" in message
