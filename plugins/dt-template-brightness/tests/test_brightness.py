"""The ``brightness`` template: conformance kit, monotone and exact luminance, composition, bad inputs.

Every measurement is the guidance carrier's own statistic (mean Rec. 709 luma) of the output latents
(``output_type="latent"``) through the host's fitted latent -> RGB map, on tiny offline pipelines of
every backbone the guidance carrier supports (random weights: the numbers show the mechanism, not
pictures). Printed numbers (``pytest -s``) are the ones quoted in docs/zoo/brightness.md.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from diffusion_templates import (
    GuidanceCache,
    KVCache,
    TemplateInputError,
    TemplatePipeline,
    UnsupportedError,
)
from diffusion_templates.carriers.guidance import OBJECTIVES
from diffusion_templates.latent_rgb import latent_rgb_map
from diffusion_templates.plugins import PluginHost
from diffusion_templates.testing.snapshot import pipeline_state, state_differences
from diffusion_templates.testing.tiny import tiny_call_kwargs
from dt_sdk.conformance import (
    MISSING,
    TINY_BACKBONES,
    TemplateConformance,
    build_tiny_pipeline,
    single_thread,
    tiny_call_kwargs_for,
)

TEMPLATE = "brightness"
BACKBONES = ["flux2", "flux", "sd3", "qwen_image", "sdxl"]
SIZE = 64
SCALES = [0.1, 0.3, 0.5, 0.7, 0.9]


class TestBrightness(TemplateConformance):
    template = TEMPLATE
    valid_inputs = [
        {"scale": 0.8},
        {"scale": 0.0, "strength": 1.0, "start": 0.25, "end": 0.75},
        {"scale": 1, "strength": 0},
    ]
    invalid_inputs = [
        {"scale": 1.5},  # above 1
        {"scale": -0.1},  # below 0
        {"scale": float("nan")},
        ({"scale": MISSING}, "scale"),  # required
        {"strength": -0.5},
        {"strength": 1.5},
        {"start": -0.1},
        {"end": 1.2},
        ({"start": 0.6, "end": 0.4}, "end"),  # an empty window
        {"target": 0.5},  # not a field
    ]

    def _call(self, target, backbone, **extra):
        # Workaround (host issue reported with a patch to latent_rgb.py): the kit's warm-up call returns
        # latents, so the VAE never runs before its pristine snapshot; the first guidance call then fits
        # the latent -> RGB map, the VAE's first use, and Qwen-Image's VAE adds its conv-cache attributes
        # (_feat_map, ...) to itself. Fitting the map during the kit's bare calls puts them in the
        # snapshot. Harmless once fitting leaves the VAE as it was.
        if not isinstance(target, TemplatePipeline):
            latent_rgb_map(TemplatePipeline(target).adapter)
        return super()._call(target, backbone, **extra)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@functools.cache
def tiny(backbone: str):
    """One tiny pipeline per backbone for this module, warmed up (diffusers' lazy state exists) and with
    its latent -> RGB map fitted (the fit is the first VAE encode: Qwen-Image's VAE adds caches then)."""
    pipe = build_tiny_pipeline(backbone)
    pipe(prompt="warm up", **tiny_call_kwargs_for(backbone))
    latent_rgb_map(TemplatePipeline(pipe).adapter)
    return pipe


def call_kwargs(backbone: str, *, cfg: bool | None = None, steps: int = 2) -> dict:
    """A 2-step 64 px call, latents out; CFG as the conformance kit runs it unless ``cfg`` says."""
    if cfg is None:
        return tiny_call_kwargs_for(backbone, num_inference_steps=steps, height=SIZE, width=SIZE)
    family = TINY_BACKBONES[backbone].family
    return tiny_call_kwargs(family, steps=steps, size=SIZE, cfg=cfg, output_type="latent")


def output_grid(tp: TemplatePipeline, latents: torch.Tensor) -> torch.Tensor:
    """Output latents (``output_type="latent"``) -> the latent grid the fitted map reads."""
    pipe, adapter = tp.pipe, tp.adapter
    if adapter.name == "flux2":  # Flux2KleinPipeline returns the VAE's latents: undo its last two steps
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        return (pipe._patchify_latents(latents) - mean) / std
    return adapter.unpack_latents(latents, SIZE, SIZE)


def statistic(tp: TemplatePipeline, latents: torch.Tensor, kind: str) -> torch.Tensor:
    rgb = latent_rgb_map(tp.adapter).to_rgb(output_grid(tp, latents))
    return OBJECTIVES[kind].statistic(rgb)[0]


def run(tp_or_pipe, backbone: str, templates=None, **kwargs) -> torch.Tensor:
    call = {**call_kwargs(backbone), **kwargs}
    if templates is not None:
        call["templates"] = templates
    return tp_or_pipe(prompt="a red circle", **call).images


def spearman(x, y) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def kv_test_cache(tp: TemplatePipeline) -> KVCache:
    """Two seeded extra K/V tokens on the first attention layer: a third carrier, passed as a cache."""
    layer = next(iter(tp.adapter.attention_layers().values()))
    g = torch.Generator().manual_seed(7)
    shape = (1, 2, layer.heads, layer.head_dim)
    return KVCache(
        keys={layer.name: torch.randn(shape, generator=g)},
        values={layer.name: torch.randn(shape, generator=g)},
        template="kv-test",
    )


# --------------------------------------------------------------------------- the cache


def test_inputs_map_to_one_luminance_term():
    tp = TemplatePipeline(tiny("flux2"))
    (cache,) = tp.encode({"template": TEMPLATE, "scale": 0.3, "strength": 0.8, "start": 0.2, "end": 0.9})
    assert isinstance(cache, GuidanceCache) and cache.template == TEMPLATE
    (term,) = cache.terms
    assert (term.kind, term.target, term.strength) == ("luminance", [0.3], 0.8)
    assert (term.start, term.end) == (0.2, 0.9)
    (default,) = tp.encode({"template": TEMPLATE, "scale": 0.3})
    assert (default.terms[0].strength, default.terms[0].start, default.terms[0].end) == (0.5, 0.0, 1.0)


# --------------------------------------------------------------------------- measured effect


@pytest.mark.parametrize("backbone", BACKBONES)
def test_luminance_moves_monotonically_with_scale(backbone):
    """Five scales, default strength 0.5, 2 steps, fixed seed: Spearman(scale, luminance) >= 0.9."""
    pipe = tiny(backbone)
    tp = TemplatePipeline(pipe)
    base = statistic(tp, run(pipe, backbone), "luminance").item()
    measured = [
        statistic(tp, run(tp, backbone, [{"template": TEMPLATE, "scale": s}]), "luminance").item()
        for s in SCALES
    ]
    rho = spearman(SCALES, measured)
    print(
        f"\n{backbone}: base luminance {base:.4f}; scales {SCALES} -> "
        f"{[round(m, 4) for m in measured]}, Spearman {rho:.3f}"
    )
    assert rho >= 0.9
    # strength 0.5 at both steps: the last step alone halves the remaining gap
    far = [(m, s) for m, s in zip(measured, SCALES, strict=True) if abs(base - s) > 0.05]
    assert all(abs(m - s) < abs(base - s) for m, s in far)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_strength_one_hits_the_target(backbone):
    """Without CFG, strength 1 at the last step moves the output by exactly the Gauss-Newton step: the
    (linear) luminance of the output equals the target up to float rounding."""
    pipe = tiny(backbone)
    tp = TemplatePipeline(pipe)
    errors = []
    for target in (0.2, 0.8):
        out = tp(
            prompt="a red circle",
            templates=[{"template": TEMPLATE, "scale": target, "strength": 1.0}],
            **call_kwargs(backbone, cfg=False),
        ).images
        errors.append(abs(statistic(tp, out, "luminance").item() - target))
    print(f"\n{backbone}: strength 1, no CFG: max |luminance - target| {max(errors):.2e}")
    assert max(errors) < 1e-4


def test_strength_zero_is_bit_identical():
    pipe = tiny("sd3")
    bare = run(pipe, "sd3")
    off = run(TemplatePipeline(pipe), "sd3", [{"template": TEMPLATE, "scale": 0.9, "strength": 0.0}])
    assert torch.equal(bare, off)


# --------------------------------------------------------------------------- composition


def _color_spec(target: list[float]):
    """The real ``color`` template when installed next to this package, else the guidance cache it makes."""
    if "color" in PluginHost().names("template"):
        return {"template": "color", "r": target[0], "g": target[1], "b": target[2], "strength": 0.5}
    return GuidanceCache.single("mean_rgb", target, 0.5, template="color (stand-in)")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_composes_with_color_and_a_kv_cache(backbone):
    """brightness + color + a kv cache in one call: each acts, and the pipeline is bit-identical after."""
    pipe = tiny(backbone)
    tp = TemplatePipeline(pipe)
    colour = [0.8, 0.6, 0.3]
    luma = 0.2126 * colour[0] + 0.7152 * colour[1] + 0.0722 * colour[2]  # consistent targets
    bright = {"template": TEMPLATE, "scale": round(luma, 4), "strength": 0.5}
    kv = kv_test_cache(tp)
    bare = run(pipe, backbone)
    before = pipeline_state(pipe)

    everything = run(tp, backbone, [bright, _color_spec(colour), kv])
    assert state_differences(before, pipeline_state(pipe)) == []
    assert torch.equal(run(pipe, backbone), bare)

    without_kv = run(tp, backbone, [bright, _color_spec(colour)])
    assert not torch.equal(everything, without_kv)  # the kv cache acted
    base_rgb, rgb = statistic(tp, bare, "mean_rgb"), statistic(tp, everything, "mean_rgb")
    base_lum, lum = statistic(tp, bare, "luminance").item(), statistic(tp, everything, "luminance").item()
    target = torch.tensor(colour)
    print(
        f"\n{backbone}: brightness {luma:.3f} + color {colour} + kv: luminance {base_lum:.4f} -> {lum:.4f}, "
        f"mean RGB distance {float((base_rgb - target).norm()):.4f} -> {float((rgb - target).norm()):.4f}"
    )
    assert abs(lum - luma) < abs(base_lum - luma)
    assert (rgb - target).norm() < (base_rgb - target).norm()
    assert state_differences(before, pipeline_state(pipe)) == []


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "fields,field,message",
    [
        ({"scale": 1.2}, "scale", "less than or equal to 1"),
        ({"scale": -0.2}, "scale", "greater than or equal to 0"),
        ({"scale": 0.5, "strength": -1}, "strength", "greater than or equal to 0"),
        ({"scale": 0.5, "start": 0.7, "end": 0.3}, "end", "must be above start"),
        ({"scale": 0.5, "brightness": 0.5}, "brightness", "Extra inputs are not permitted"),
        ({}, "scale", "Field required"),
    ],
)
def test_bad_inputs_name_template_and_field_before_anything_runs(fields, field, message):
    pipe = tiny("flux2")
    tp = TemplatePipeline(pipe)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(TemplateInputError) as info:
            run(tp, "flux2", [{"template": TEMPLATE, **fields}])
    finally:
        handle.remove()
    assert info.value.template == TEMPLATE and calls == []
    assert f"field {field!r}" in str(info.value) and message in str(info.value)


def test_refuses_negative_templates_and_unsupported_schedulers():
    from diffusers import DPMSolverMultistepScheduler

    tp = TemplatePipeline(tiny("flux2"))
    with pytest.raises(UnsupportedError, match="template 'brightness' corrects the whole"):
        tp.prepare(negative_templates=[{"template": TEMPLATE, "scale": 0.5}])
    pipe = build_tiny_pipeline("sdxl")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(UnsupportedError, match="template 'brightness' on backbone 'sdxl'.*DPMSolver"):
        TemplatePipeline(pipe).prepare([{"template": TEMPLATE, "scale": 0.5}])
