"""The ``sharpness`` template: conformance kit, monotone detail, composition with latent carriers, inputs.

Every measurement is the guidance carrier's own statistic (RMS of RGB minus its 3x3 box blur, at
latent-cell resolution) of the output latents (``output_type="latent"``) through the host's fitted
latent -> RGB map, on tiny offline pipelines of every backbone the guidance carrier supports (random
weights: the numbers show the mechanism, not pictures). Printed numbers (``pytest -s``) are the ones
quoted in docs/zoo/sharpness.md.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from diffusion_templates import GuidanceCache, TemplateInputError, TemplatePipeline, UnsupportedError
from diffusion_templates.carriers.guidance import OBJECTIVES
from diffusion_templates.carriers.init_latents import InitLatentsCache
from diffusion_templates.carriers.latent_mask import LatentMaskCache
from diffusion_templates.latent_rgb import latent_rgb_map
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

from dt_template_sharpness import hf_scale, hf_target

TEMPLATE = "sharpness"
BACKBONES = ["flux2", "flux", "sd3", "qwen_image", "sdxl"]
SIZE = 64
SCALES = [0.0, 0.25, 0.5, 0.75, 1.0]


class TestSharpness(TemplateConformance):
    template = TEMPLATE
    valid_inputs = [
        {"scale": 1.0},
        {"scale": 0.0, "strength": 1.0, "start": 0.25, "end": 0.75},
        {"scale": 0.5, "strength": 0},
    ]
    invalid_inputs = [
        {"scale": 1.01},  # above 1
        {"scale": -0.5},  # below 0
        {"scale": float("nan")},
        ({"scale": MISSING}, "scale"),  # required
        {"strength": -0.1},
        {"strength": 3.0},
        {"start": 2.0},
        {"end": -1.0},
        ({"start": 0.5, "end": 0.5}, "end"),  # an empty window
        {"radius": 2},  # not a field
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



# --------------------------------------------------------------------------- the mapping and the cache


def test_scale_maps_to_a_logarithmic_energy_target():
    assert [round(hf_target(s), 6) for s in SCALES] == [0.0125, 0.025, 0.05, 0.1, 0.2]
    assert all(abs(hf_scale(hf_target(s)) - s) < 1e-12 for s in SCALES)
    assert hf_scale(1e-6) == 0.0 and hf_scale(0.9) == 1.0


def test_inputs_map_to_one_high_frequency_term():
    tp = TemplatePipeline(tiny("flux2"))
    (cache,) = tp.encode({"template": TEMPLATE, "scale": 0.75, "strength": 0.8, "start": 0.2, "end": 0.9})
    assert isinstance(cache, GuidanceCache) and cache.template == TEMPLATE
    (term,) = cache.terms
    assert (term.kind, term.strength, term.start, term.end) == ("high_frequency", 0.8, 0.2, 0.9)
    assert term.target == pytest.approx([0.1])
    (default,) = tp.encode({"template": TEMPLATE, "scale": 0.5})
    assert (default.terms[0].strength, default.terms[0].start, default.terms[0].end) == (0.5, 0.0, 1.0)


# --------------------------------------------------------------------------- measured effect


@pytest.mark.parametrize("backbone", BACKBONES)
def test_detail_moves_monotonically_with_scale(backbone):
    """Five scales, default strength 0.5, 2 steps, fixed seed: Spearman(scale, HF energy) >= 0.9."""
    pipe = tiny(backbone)
    tp = TemplatePipeline(pipe)
    base = statistic(tp, run(pipe, backbone), "high_frequency").item()
    measured = [
        statistic(tp, run(tp, backbone, [{"template": TEMPLATE, "scale": s}]), "high_frequency").item()
        for s in SCALES
    ]
    rho = spearman(SCALES, measured)
    targets = [round(hf_target(s), 4) for s in SCALES]
    print(
        f"\n{backbone}: base HF {base:.4f}; scales {SCALES} (targets {targets}) -> "
        f"{[round(m, 4) for m in measured]}, Spearman {rho:.3f}"
    )
    assert rho >= 0.9


def test_strength_zero_is_bit_identical():
    pipe = tiny("flux")
    bare = run(pipe, "flux")
    off = run(TemplatePipeline(pipe), "flux", [{"template": TEMPLATE, "scale": 1, "strength": 0}])
    assert torch.equal(bare, off)


# --------------------------------------------------------------------------- composition


def picture() -> torch.Tensor:
    """A seeded 64 x 64 RGB picture in [0, 1], smooth plus some texture."""
    g = torch.Generator().manual_seed(3)
    coarse = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear")
    return (0.8 * coarse + 0.2 * torch.rand(1, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def box_mask() -> torch.Tensor:
    """1 (generate) inside a 16 px aligned box, 0 (keep the source) outside."""
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[:, :, 16:48, 16:48] = 1.0
    return mask


@pytest.mark.parametrize("backbone", BACKBONES)
def test_composes_with_init_latents_and_latent_mask(backbone):
    """sharpness + init_latents (img2img, strength 0.5) + latent_mask (keep outside a box) in one call:
    the sharpness scale orders the detail, the kept region is the source for both scales, and the
    pipeline is bit-identical afterwards."""
    pipe = tiny(backbone)
    tp = TemplatePipeline(pipe)
    image = picture()
    init = InitLatentsCache(strength=0.5, image=image, template="init-test")
    keep = LatentMaskCache(mask=box_mask(), image=image, template="mask-test")
    kwargs = {"num_inference_steps": 4}
    run(tp, backbone, [init], **kwargs)  # warm-up: diffusers' lazy state of a first VAE encode
    bare = run(pipe, backbone)
    before = pipeline_state(pipe)

    soft = run(tp, backbone, [{"template": TEMPLATE, "scale": 0.0}, init, keep], **kwargs)
    assert state_differences(before, pipeline_state(pipe)) == []
    crisp = run(tp, backbone, [init, keep, {"template": TEMPLATE, "scale": 1.0}], **kwargs)
    plain = run(tp, backbone, [init, keep], **kwargs)
    assert state_differences(before, pipeline_state(pipe)) == []
    assert torch.equal(run(pipe, backbone), bare)

    grids = {name: output_grid(tp, x) for name, x in (("soft", soft), ("crisp", crisp), ("plain", plain))}
    cell = latent_rgb_map(tp.adapter).cell
    outside = F.max_pool2d(box_mask(), cell)[0, 0] == 0  # latent cells entirely outside the box
    for name in ("soft", "crisp"):
        assert torch.allclose(grids[name][..., outside], grids["plain"][..., outside], atol=1e-5), name
    hf = {name: statistic(tp, x, "high_frequency").item() for name, x in (("soft", soft), ("crisp", crisp),
                                                                         ("plain", plain))}
    print(
        f"\n{backbone}: img2img 0.5 + mask + sharpness: HF soft (0) {hf['soft']:.4f}, without "
        f"{hf['plain']:.4f}, crisp (1) {hf['crisp']:.4f}; kept cells equal the template-free call"
    )
    assert hf["soft"] < hf["crisp"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "fields,field,message",
    [
        ({"scale": 1.2}, "scale", "less than or equal to 1"),
        ({"scale": -0.2}, "scale", "greater than or equal to 0"),
        ({"scale": 0.5, "strength": -1}, "strength", "greater than or equal to 0"),
        ({"scale": 0.5, "start": 0.7, "end": 0.3}, "end", "must be above start"),
        ({"scale": 0.5, "sigma": 1.0}, "sigma", "Extra inputs are not permitted"),
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
    with pytest.raises(UnsupportedError, match="template 'sharpness' corrects the whole"):
        tp.prepare(negative_templates=[{"template": TEMPLATE, "scale": 0.5}])
    pipe = build_tiny_pipeline("sdxl")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(UnsupportedError, match="template 'sharpness' on backbone 'sdxl'.*DPMSolver"):
        TemplatePipeline(pipe).prepare([{"template": TEMPLATE, "scale": 0.5}])
