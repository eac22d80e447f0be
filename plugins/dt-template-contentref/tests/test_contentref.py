"""The contentref template: conformance kit, scale 0 = no template, monotone pull toward the reference.

Tiny offline pipelines (CPU); imports only the host, dt_sdk, this package and torch/diffusers/numpy/PIL.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusion_templates import KVCache, TemplateInputError, TemplatePipeline, UnsupportedError
from diffusion_templates.latent_rgb import latent_rgb_map
from diffusion_templates.reference import capture_reference_kv, reference_tokens
from diffusion_templates.testing.snapshot import pipeline_state, state_differences
from diffusion_templates.testing.tiny import build_flux, build_flux2_klein, build_sdxl, tiny_call_kwargs
from dt_sdk.conformance import MISSING, TemplateConformance, single_thread
from PIL import Image

TEMPLATE = "contentref"
PROMPT = "a small cat"


def picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def flat(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (64, 64), colour)


IMAGE = picture()


class TestContentRef(TemplateConformance):
    template = TEMPLATE
    valid_inputs = [
        {"image": IMAGE, "scale": 1.0},
        {"image": IMAGE, "scale": 0.0},
        {"image": IMAGE, "scale": 2.0, "reference_index": 3},
        {"image": np.asarray(IMAGE)},
    ]
    invalid_inputs = [
        ({"image": MISSING}, "image"),
        {"image": picture(63, 64)},
        {"image": IMAGE.convert("CMYK")},
        {"image": "/no/such/picture.png"},
        {"scale": -0.1},
        {"scale": 2.5},
        {"reference_index": 8},
    ]


def _max_diff(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape
    return float((a.double() - b.double()).abs().max())


# --------------------------------------------------------------------------- scale


@pytest.mark.parametrize("build, family", [(build_flux2_klein, "flux2_klein"), (build_flux, "flux")],
                         ids=["flux2", "flux"])
def test_scale_zero_is_bit_identical_to_no_template(build, family):
    pipe = build()
    tp = TemplatePipeline(pipe)
    spec = {"template": TEMPLATE, "image": IMAGE, "scale": 0.0}
    (cache,) = tp.encode(spec)
    assert cache.keys == {} and cache.values == {}
    with single_thread():
        bare = pipe(prompt=PROMPT, **tiny_call_kwargs(family, cfg=True, output_type="latent")).images
        before = pipeline_state(pipe)
        got = tp(prompt=PROMPT, templates=[spec], negative_templates=[spec],
                 **tiny_call_kwargs(family, cfg=True, output_type="latent")).images
    assert torch.equal(got, bare)
    assert state_differences(before, pipeline_state(pipe)) == []


def test_scale_multiplies_the_values_only():
    tp = TemplatePipeline(build_flux2_klein())
    (one,) = tp.encode({"template": TEMPLATE, "image": IMAGE, "scale": 1.0})
    captured = capture_reference_kv(tp.adapter, IMAGE)
    for name in captured.keys:  # scale 1, gains 1: the host's capture, bit for bit
        assert torch.equal(one.keys[name], captured.keys[name])
        assert torch.equal(one.values[name], captured.values[name])
    (half,) = tp.encode({"template": TEMPLATE, "image": IMAGE, "scale": 0.5})
    for name in one.keys:
        assert torch.equal(half.keys[name], one.keys[name])
        assert torch.equal(half.values[name], one.values[name] * 0.5)


def test_scale_one_equals_flux2_klein_kv_pipeline():
    """At scale 1 the reference conditioning is Flux2KleinKVPipeline's (up to key order)."""
    image = picture(64, 64, seed=7)
    kv_pipe = Flux2KleinKVPipeline(**build_flux2_klein().components)
    kv_pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs("flux2_klein", steps=3, output_type="latent")
    with single_thread():
        expected = kv_pipe(image=image, prompt=PROMPT, **{k: v for k, v in kwargs.items()
                                                          if k != "guidance_scale"}).images
        tp = TemplatePipeline(build_flux2_klein())
        got = tp(prompt=PROMPT, templates=[{"template": TEMPLATE, "image": image}],
                 **tiny_call_kwargs("flux2_klein", steps=3, output_type="latent")).images
    assert _max_diff(got, expected) < 1e-4


@pytest.mark.parametrize("build, family", [(build_flux2_klein, "flux2_klein"), (build_flux, "flux")],
                         ids=["flux2", "flux"])
def test_effect_grows_with_scale(build, family):
    """On the random tiny models (no learned semantics) the change from the bare output grows with scale."""
    tp = TemplatePipeline(build())
    with single_thread():
        outputs = [tp(prompt=PROMPT, templates=[{"template": TEMPLATE, "image": IMAGE, "scale": s}],
                      **tiny_call_kwargs(family, steps=3, cfg=True, output_type="latent")).images
                   for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    changes = [float((out - outputs[0]).square().mean().sqrt()) for out in outputs]
    assert changes[0] == 0.0
    assert changes == sorted(changes) and changes[1] > 0, changes


# --------------------------------------------------------------------------- toward the reference


def pooling_transformer(k: float = 40.0) -> Flux2Transformer2DModel:
    """A tiny FLUX.2 whose attention pools the latents it attends to, so attending to a reference
    pulls the output toward it, by construction (random weights have no such semantics).

    Two dual-stream blocks, no single-stream block. Timestep embedding ~ e_0 for every timestep (its
    lowest-frequency cosine), so every modulation is a constant: no shift/scale before attention, a
    -1 gate on the attention output (channels 0-15), and a feed-forward that writes +-k into
    channels 16 and 17 of every token (so that the LayerNorms act linearly on channels 0-15).
    q = k = 0: uniform attention. Block 1's values are the tokens' latents (channels 0-15; text tokens
    carry zeros). The output is ``x - attention(x)``: each step moves the latents toward the
    attention-pooled latents of text (0), image and reference tokens. Block 0 only writes the +-k
    channels (its attention output is discarded).
    """
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=0, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    dim, latent = 32, 16
    silu_one = torch.nn.functional.silu(torch.tensor(1.0)).item()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        embed = model.time_guidance_embed.timestep_embedder
        embed.linear_1.weight[0, 127] = 20.0  # cos(t * 1.08e-4) in [0.994, 1] for t in [0, 1000]
        embed.linear_2.weight[0, 0] = 1 / 20.0  # temb ~ e_0

        def constant(linear, values):  # a modulation output equal to ``values``
            linear.weight[:, 0] = values / silu_one

        zeros, ones = torch.zeros(dim), torch.ones(dim)
        gate = torch.zeros(dim)
        gate[:latent] = -1.0
        feed = torch.zeros(dim)
        feed[0] = 1.0
        # (shift, scale, gate) before attention, then (shift, scale, gate) of the feed-forward
        modulation = torch.cat([zeros, zeros, gate, feed, -ones, ones])
        constant(model.double_stream_modulation_img.linear, modulation)
        model.x_embedder.weight[:latent, :latent] = torch.eye(latent)
        sigma = (2 * k * k / dim) ** 0.5  # LayerNorm's std, set by the +-k channels
        for i, block in enumerate(model.transformer_blocks):
            hidden = block.ff.linear_out.weight.shape[1]
            block.ff.linear_in.weight[0, 0] = 10.0  # SwiGLU gate: silu(10) ~ 10
            block.ff.linear_in.weight[hidden, 0] = 1.0
            block.ff.linear_out.weight[latent, 0] = k / 10
            block.ff.linear_out.weight[latent + 1, 0] = -k / 10
            attn = block.attn
            for norm in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k):
                norm.weight.fill_(1.0)
            if i == 1:
                block.attn.to_v.weight[:latent, :latent] = sigma * torch.eye(latent)
                block.attn.to_out[0].weight[:latent, :latent] = torch.eye(latent)
        scale = torch.zeros(dim)
        scale[:latent] = 2 * sigma - 1  # the final LayerNorm's std is ~2 sigma (both blocks wrote +-k)
        constant(model.norm_out.linear, torch.cat([scale, zeros]))
        model.proj_out.weight[:latent, :latent] = torch.eye(latent)
    return model.eval()


@pytest.fixture(scope="module")
def pooling_pipeline() -> TemplatePipeline:
    """The tiny FLUX.2 klein pipeline (its VAE, text encoder, scheduler) with the pooling transformer;
    built once so that its latent -> RGB map is fitted once."""
    base = build_flux2_klein()
    pipe = Flux2KleinPipeline(**{**base.components, "transformer": pooling_transformer()})
    pipe.set_progress_bar_config(disable=True)
    tp = TemplatePipeline(pipe)
    with single_thread():
        latent_rgb_map(tp.adapter)
    return tp


@pytest.mark.parametrize("colour", [(230, 20, 20), (30, 30, 220)], ids=["red", "blue"])
def test_output_moves_toward_the_reference_as_scale_grows(pooling_pipeline, colour):
    """Distance of the final sample's mean colour (through the pipeline's latent -> RGB map) and mean
    latent to the reference's falls monotonically over five scales (pooling FLUX.2, CFG on)."""
    tp = pooling_pipeline
    image = flat(colour)
    colours = latent_rgb_map(tp.adapter)
    ref = reference_tokens(tp.adapter, image).tokens
    ref_rgb = colours.to_rgb(tp.adapter.unpack_latents(ref, 64, 64)).mean(dim=(0, 2, 3))
    rgb_distances, latent_distances = [], []
    with single_thread():
        for scale in (0.0, 0.25, 0.5, 0.75, 1.0):
            final = {}

            def keep(pipe, step, t, tensors, final=final):
                final["latents"] = tensors["latents"]
                return {}

            kwargs = tiny_call_kwargs("flux2_klein", steps=4, cfg=True, output_type="latent")
            tp(prompt=PROMPT, templates=[{"template": TEMPLATE, "image": image, "scale": scale}],
               callback_on_step_end=keep, **kwargs)
            rgb = colours.to_rgb(tp.adapter.unpack_latents(final["latents"], 64, 64)).mean(dim=(0, 2, 3))
            rgb_distances.append(float((rgb - ref_rgb).norm()))
            latent_distances.append(float((final["latents"][0].mean(0) - ref[0].mean(0)).norm()))
    for distances in (rgb_distances, latent_distances):
        assert all(a > b for a, b in zip(distances, distances[1:], strict=False)), distances
    assert latent_distances[-1] < 0.7 * latent_distances[0], latent_distances


# --------------------------------------------------------------------------- composition, refusals, errors


def test_two_references_in_two_slots_compose():
    pipe = build_flux2_klein()
    tp = TemplatePipeline(pipe)
    first = {"template": TEMPLATE, "image": picture(seed=1), "scale": 0.8}
    second = {"template": TEMPLATE, "image": picture(seed=2), "scale": 0.8, "reference_index": 1}
    (merged,) = tp.merge([c for spec in (first, second) for c in tp.encode(spec)])
    assert isinstance(merged, KVCache) and merged.length("double_0") == 2 * 16
    with single_thread():
        kwargs = dict(steps=2, cfg=True, output_type="latent")
        both = tp(prompt=PROMPT, templates=[first, second], **tiny_call_kwargs("flux2_klein", **kwargs))
        one = tp(prompt=PROMPT, templates=[first], **tiny_call_kwargs("flux2_klein", **kwargs))
    both, one = both.images, one.images
    assert not torch.equal(both, one)


def test_refused_backbones_say_why():
    tp = TemplatePipeline(build_sdxl())
    with pytest.raises(UnsupportedError, match="supports backbones"):
        tp.encode({"template": TEMPLATE, "image": IMAGE})


def test_errors_name_template_and_field():
    tp = TemplatePipeline(build_flux2_klein())
    with pytest.raises(TemplateInputError) as info:
        tp.encode({"template": TEMPLATE, "image": IMAGE, "scale": 3, "strength": 0.5})
    message = str(info.value)
    assert "'contentref'" in message and "'scale'" in message and "'strength'" in message
