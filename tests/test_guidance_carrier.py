"""The guidance carrier: a hand-computed step, strength 0, monotone targets, additive merge, errors."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    Flux2KleinPipeline,
    FluxPipeline,
    QwenImagePipeline,
)
from pydantic import ValidationError

from diffusion_templates import CacheError, TemplatePipeline, UnsupportedError
from diffusion_templates.carriers.guidance import (
    OBJECTIVES,
    GuidanceCache,
    GuidanceCarrier,
    GuidanceTerm,
    gauss_newton_step,
)
from diffusion_templates.latent_rgb import latent_rgb_map
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs
from helpers import count_denoiser_calls
from test_latent_rgb import FAMILIES, tiny_pipe

SIZE = 64
# Real classifier-free guidance on every family (sequential: FLUX.2, FLUX.1, Qwen-Image; batched: SD3, SDXL).
CFG = dict.fromkeys(["flux2_klein", "flux", "sd3", "qwen_image", "sdxl"], True)


def call(pipe_or_tp, family, *, steps=2, cfg=None, **kwargs):
    """One tiny call; returns the loop-form latents after every step (callback_on_step_end)."""
    seen = []

    def grab(_pipe, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return {}

    cfg = CFG[family] if cfg is None else cfg
    call_kwargs = tiny_call_kwargs(family, steps=steps, size=SIZE, cfg=cfg, output_type="latent")
    pipe_or_tp(prompt="a red circle", callback_on_step_end=grab, **call_kwargs, **kwargs)
    return seen


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


# --------------------------------------------------------------------------- cache and math


def test_single_and_term_validation():
    cache = GuidanceCache.single(kind="luminance", target=0.8, strength=1.0)
    assert cache.terms == [GuidanceTerm(kind="luminance", target=[0.8])]
    with pytest.raises(ValidationError, match="unknown guidance kind 'contrast'"):
        GuidanceCache.single(kind="contrast", target=0.5)
    with pytest.raises(ValidationError, match=r"target 1.5 is outside \[0.0, 1.0\]"):
        GuidanceCache.single(kind="luminance", target=1.5)
    with pytest.raises(ValidationError, match="takes 3 target value"):
        GuidanceCache.single(kind="mean_rgb", target=[0.5, 0.5])
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        GuidanceCache.single(kind="luminance", target=0.5, strength=-1)
    with pytest.raises(ValidationError, match="start"):
        GuidanceCache.single(kind="luminance", target=0.5, start=0.6, end=0.4)
    with pytest.raises(ValidationError, match="either per-step weights or start/end"):
        GuidanceCache.single(kind="luminance", target=0.5, start=0.5, weights=[1.0, 1.0])
    with pytest.raises(ValidationError):
        GuidanceCache(terms=[])
    term = GuidanceTerm(kind="luminance", target=0.5, start=0.5)
    assert [term.weight_at(i, 4) for i in range(4)] == [0, 0, 1, 1]
    assert GuidanceTerm(kind="luminance", target=0.5, weights=[0.0, 2.0]).weight_at(1, 2) == 2.0


def test_cache_round_trips_and_merge_concatenates(tmp_path):
    a = GuidanceCache.single("mean_rgb", [0.9, 0.1, 0.1], 0.5, template="color")
    b = GuidanceCache(
        terms=[GuidanceTerm(kind="high_frequency", target=0.1, weights=[0, 1])], template="sharp"
    )
    a.save(tmp_path / "a.safetensors")
    assert GuidanceCache.load(tmp_path / "a.safetensors") == a
    merged = GuidanceCarrier().merge_caches([a, b])
    assert merged.terms == a.terms + b.terms and merged.template == "color+sharp"


@pytest.mark.parametrize("kind,target", [("mean_rgb", [0.7, 0.2, 0.4]), ("luminance", [0.3])])
def test_gauss_newton_step_reaches_a_linear_target(kind, target):
    g = torch.Generator().manual_seed(0)
    rgb_map = latent_rgb_map_like(channels=6, g=g)
    x0 = torch.randn(2, 6, 5, 4, generator=g)
    objective = OBJECTIVES[kind]
    step = gauss_newton_step(objective, torch.tensor(target), rgb_map, x0)
    reached = objective.statistic(rgb_map.to_rgb(x0 + step))
    assert torch.allclose(reached, torch.tensor(target).expand_as(reached), atol=1e-5)


def test_gauss_newton_step_high_frequency_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    rgb_map = latent_rgb_map_like(channels=4, g=g)
    x0 = torch.randn(1, 4, 6, 6, generator=g)
    objective = OBJECTIVES["high_frequency"]
    current = objective.statistic(rgb_map.to_rgb(x0)).item()
    step = gauss_newton_step(objective, torch.tensor([current * 1.01]), rgb_map, x0)
    # A small Gauss-Newton step changes the statistic by the requested amount, to first order.
    moved = objective.statistic(rgb_map.to_rgb(x0 + step)).item()
    assert moved == pytest.approx(current * 1.01, rel=1e-4)
    # and it points along the gradient: finite differences on the statistic agree with J . step
    eps = 1e-3
    plus = objective.statistic(rgb_map.to_rgb(x0 + eps * step)).item()
    minus = objective.statistic(rgb_map.to_rgb(x0 - eps * step)).item()
    assert (plus - minus) / (2 * eps) == pytest.approx(current * 0.01, rel=1e-2)


def latent_rgb_map_like(channels: int, g: torch.Generator):
    from diffusion_templates.latent_rgb import LatentRGBMap

    return LatentRGBMap(
        torch.randn(3, channels, generator=g) * 0.3, torch.full((3,), 0.5), 8, 1.0, 1.0, "test"
    )


# --------------------------------------------------------------------------- a hand-computed step


def _unpack(family, x, pipe):
    """Loop latents -> grid with the pipelines' own static helpers (not the adapters)."""
    if family == "flux2_klein":
        return x.permute(0, 2, 1).reshape(x.shape[0], x.shape[2], SIZE // 16, SIZE // 16)
    if family == "flux":
        return FluxPipeline._unpack_latents(x, SIZE, SIZE, pipe.vae_scale_factor)
    if family == "qwen_image":
        return QwenImagePipeline._unpack_latents(x, SIZE, SIZE, pipe.vae_scale_factor)[:, :, 0]
    return x


def _pack(family, grid):
    b, c, h, w = grid.shape
    if family == "flux2_klein":
        return Flux2KleinPipeline._pack_latents(grid)
    if family == "flux":
        return FluxPipeline._pack_latents(grid.contiguous(), b, c, h, w)
    if family == "qwen_image":
        return QwenImagePipeline._pack_latents(grid.contiguous(), b, c, h, w)
    return grid


def _record_denoiser_calls(denoiser):
    calls = []
    handle = denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args, dict(kwargs))), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_computed_step(family, request):
    """Each step: call the denoiser ourselves, x0 by hand, the closed-form mean-colour correction
    (a constant per latent cell: the gradient of a mean of a linear map is constant), the CFG
    combination and the Euler step; compare with the latents the carrier produced."""
    pipe = tiny_pipe(request, family)
    tp = TemplatePipeline(pipe)
    denoiser = tp.adapter.denoiser
    rgb_map = latent_rgb_map(tp.adapter)
    strength, target = 0.7, torch.tensor([0.8, 0.3, 0.45])
    cache = GuidanceCache.single("mean_rgb", target.tolist(), strength)

    calls, handle = _record_denoiser_calls(denoiser)
    try:
        produced = call(tp, family, templates=[cache])
    finally:
        handle.remove()
    sigmas = pipe.scheduler.sigmas.double()
    cfg, batched = CFG[family], tp.adapter.cfg_style == "batched"
    cfg_kwargs = TINY_PIPELINES[family].cfg_kwargs
    scale = cfg_kwargs.get("true_cfg_scale", cfg_kwargs.get("guidance_scale"))
    per_step = 2 if cfg and not batched else 1
    assert len(calls) == 2 * per_step
    worst = absolute = 0.0
    for step in range(2):
        step_calls = calls[step * per_step : (step + 1) * per_step]
        sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        with torch.no_grad():
            outs = [denoiser(*a, **{**k, "return_dict": False})[0].double() for a, k in step_calls]
        args, kwargs = step_calls[0]
        model_input = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).double()
        if family == "sdxl":  # Euler (epsilon): the UNet sees x_t / sqrt(sigma^2 + 1)
            x_t = model_input * math.sqrt(sigma**2 + 1)
        else:  # flow matching: the transformer gets the timestep sigma (x 1000 for SD3)
            t = kwargs["timestep"].double().flatten()[0] * (1 if family == "sd3" else 1000)
            assert float(t) == pytest.approx(sigma * 1000, rel=1e-6)
            x_t = model_input
        if batched and cfg:
            uncond, cond = outs[0].chunk(2)
            x_t = x_t.chunk(2)[1]
        elif cfg:
            cond, uncond = outs
        else:
            cond, uncond = outs[0], None
        x0 = x_t - sigma * cond
        grid = _unpack(family, x0, pipe)
        matrix = rgb_map.matrix.double()
        mean_rgb = grid.mean(dim=(2, 3)) @ matrix.T + rgb_map.bias.double()  # (B, 3)
        cell_change = -strength * (mean_rgb - target.double()) @ torch.linalg.pinv(matrix).T  # (B, C)
        shift = -_pack(family, cell_change[:, :, None, None].expand_as(grid).contiguous()) / sigma

        def guide(cond, uncond):  # the pipeline's own CFG arithmetic
            if uncond is None:
                return cond
            combined = uncond + scale * (cond - uncond)
            if family == "qwen_image":  # rescaled to the conditional prediction's norm
                combined = combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
            return combined

        # every branch gets the same shift, computed from the conditional branch's x0
        guided = guide(cond + shift, None if uncond is None else uncond + shift)
        expected = x_t + (sigma_next - sigma) * guided
        got = produced[step].double()
        diff = (got - expected).abs().max().item()
        worst = max(worst, diff / max(1.0, expected.abs().max().item()))
        absolute = max(absolute, diff)
        # the correction is not vanishing: without it the step lands elsewhere
        assert (got - (x_t + (sigma_next - sigma) * guide(cond, uncond))).abs().max() > 1e-3
    print(
        f"\n{family}: hand-computed step, max |diff| {absolute:.2e}, "
        f"relative to max(1, |latents|) {worst:.2e}"
    )
    assert worst < 1e-5


# --------------------------------------------------------------------------- identity, schedule, restore


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_zero_is_bit_identical_and_schedule_starts_late(family, request):
    pipe = tiny_pipe(request, family)
    bare = call(pipe, family)
    before = pipeline_state(pipe)
    tp = TemplatePipeline(pipe)
    zero = call(tp, family, templates=[GuidanceCache.single("luminance", 0.9, 0.0)])
    assert all(torch.equal(a, b) for a, b in zip(bare, zero, strict=True))
    late = call(tp, family, templates=[GuidanceCache.single("luminance", 0.9, 1.0, start=0.5)])
    assert torch.equal(late[0], bare[0]) and not torch.equal(late[1], bare[1])
    weighted = call(tp, family, templates=[GuidanceCache.single("luminance", 0.9, 1.0, weights=[0.0, 1.0])])
    assert torch.equal(weighted[1], late[1])
    assert_pipeline_unchanged(before, pipe)
    assert all(torch.equal(a, b) for a, b in zip(call(pipe, family), bare, strict=True))


# --------------------------------------------------------------------------- monotone in the target

MONOTONE = (
    [(f, "luminance", [[v] for v in (0.2, 0.35, 0.5, 0.65, 0.8)]) for f in FAMILIES]
    + [(f, "mean_rgb", [[v, 0.4, 0.4] for v in (0.2, 0.35, 0.5, 0.65, 0.8)]) for f in ("flux2_klein", "flux")]
    + [(f, "high_frequency", [[v] for v in (0.02, 0.05, 0.08, 0.11, 0.14)]) for f in ("flux2_klein", "flux")]
)


@pytest.mark.parametrize("family,kind,targets", MONOTONE)
def test_statistic_of_x0_moves_monotonically_with_the_target(family, kind, targets, request):
    pipe = tiny_pipe(request, family)
    tp = TemplatePipeline(pipe)
    rgb_map = latent_rgb_map(tp.adapter)
    objective = OBJECTIVES[kind]
    measured = []
    for target in targets:
        final = call(tp, family, steps=3, templates=[GuidanceCache.single(kind, target, 0.5)])[-1]
        rgb = rgb_map.to_rgb(tp.adapter.unpack_latents(final, SIZE, SIZE))  # x0 after the last step
        measured.append(objective.statistic(rgb)[0, 0].item())
    rho = spearman([t[0] for t in targets], measured)
    print(
        f"\n{family} {kind}: targets {[t[0] for t in targets]} -> {[round(m, 4) for m in measured]}, "
        f"Spearman {rho:.3f}"
    )
    assert rho >= 0.9


# --------------------------------------------------------------------------- merge adds corrections


@pytest.mark.parametrize("family", ["flux2_klein", "sd3"])
def test_two_merged_caches_add_their_corrections(family, request):
    pipe = tiny_pipe(request, family)
    tp = TemplatePipeline(pipe)
    a = GuidanceCache.single("mean_rgb", [0.8, 0.2, 0.3], 0.6, template="a")
    b = GuidanceCache(
        terms=[
            GuidanceTerm(kind="luminance", target=0.3, strength=0.4),
            GuidanceTerm(kind="high_frequency", target=0.2, strength=0.5),
        ],
        template="b",
    )
    bare = call(pipe, family)[0]
    only_a = call(tp, family, templates=[a])[0] - bare
    only_b = call(tp, family, templates=[b])[0] - bare
    both = call(tp, family, templates=[a, b])[0] - bare  # merged by the pipeline through the carrier
    scale = max(1.0, bare.abs().max().item())
    diff = (both - (only_a + only_b)).abs().max().item() / scale
    print(f"\n{family}: merged correction vs sum of corrections, max rel diff {diff:.2e}")
    assert diff < 1e-5 and only_a.abs().max() > 1e-3 and only_b.abs().max() > 1e-3


# --------------------------------------------------------------------------- errors before denoising


def test_bad_inputs_fail_before_denoising(flux2_pipe):
    tp = TemplatePipeline(flux2_pipe)
    before = pipeline_state(flux2_pipe)
    calls, handle = count_denoiser_calls(flux2_pipe.transformer)
    try:
        with pytest.raises(CacheError, match="lists 3 step weights, the call runs 2 steps"):
            call(tp, "flux2_klein", templates=[GuidanceCache.single("luminance", 0.5, weights=[1, 1, 1])])
        with pytest.raises(UnsupportedError, match="not one CFG branch"):
            call(tp, "flux2_klein", negative_templates=[GuidanceCache.single("luminance", 0.5)])
    finally:
        handle.remove()
    assert calls == []
    assert_pipeline_unchanged(before, flux2_pipe)


def test_unsupported_scheduler_is_refused_before_denoising():
    pipe = TINY_PIPELINES["sdxl"].build()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    tp = TemplatePipeline(pipe)
    with pytest.raises(UnsupportedError, match="DPMSolverMultistepScheduler"):
        tp.prepare([GuidanceCache.single("luminance", 0.5)])


def test_bfloat16_pipeline_reaches_the_target_and_is_restored():
    pipe = TINY_PIPELINES["flux2_klein"].build(dtype=torch.bfloat16)
    bare = call(pipe, "flux2_klein", steps=3)
    before = pipeline_state(pipe)
    tp = TemplatePipeline(pipe)
    rgb_map = latent_rgb_map(tp.adapter)
    for target in (0.25, 0.75):
        final = call(tp, "flux2_klein", steps=3, templates=[GuidanceCache.single("luminance", target)])[-1]
        assert final.dtype == torch.bfloat16
        rgb = rgb_map.to_rgb(tp.adapter.unpack_latents(final, SIZE, SIZE))
        assert OBJECTIVES["luminance"].statistic(rgb).item() == pytest.approx(target, abs=0.01)
    assert_pipeline_unchanged(before, pipe)
    assert all(torch.equal(a, b) for a, b in zip(call(pipe, "flux2_klein", steps=3), bare, strict=True))
