"""Opt-in LoRA fusion: the delta written into the weights for long calls, the weights restored from a
copy afterwards (bit for bit), and never where the LoRA must miss a CFG branch."""

from __future__ import annotations

import pytest
import torch
from dt_test_templates import random_lora

from diffusion_templates import TemplatePipeline
from diffusion_templates.carriers.lora import FUSE_MIN_STEPS
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from helpers import FAMILIES, run
from test_lora_carrier import targets_for


def _lora(tp):
    return random_lora(tp.adapter.denoiser, targets_for(tp), rank=4, seed=1)


def _weight(tp):
    return tp.adapter.denoiser.get_submodule(targets_for(tp)[0]).weight


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_equals_unfused_and_the_weights_come_back_bit_for_bit(family, tiny_pipes):
    pipe = tiny_pipes(family)
    run(pipe, family, cfg=False)  # warm-up: diffusers adds its own hooks on the first call
    before = pipeline_state(pipe)
    unfused_tp, fused_tp = TemplatePipeline(pipe), TemplatePipeline(pipe, lora_fusion="on")
    cache = _lora(unfused_tp)
    unfused = run(unfused_tp, family, cfg=False, templates=[cache])
    version = _weight(fused_tp)._version
    fused = run(fused_tp, family, cfg=False, templates=[cache])
    assert _weight(fused_tp)._version > version  # it really was written (and put back)
    assert_pipeline_unchanged(before, pipe)
    assert (fused - unfused).abs().max() < 1e-4
    assert (fused - run(pipe, family, cfg=False)).abs().max() > 1e-3  # the LoRA did something


def test_auto_fuses_long_calls_only(flux_pipe):
    tp = TemplatePipeline(flux_pipe, lora_fusion="auto")
    cache, weight = _lora(tp), _weight(tp)
    version = weight._version
    short = run(tp, "flux", cfg=False, templates=[cache], num_inference_steps=FUSE_MIN_STEPS - 1)
    assert weight._version == version  # hooks, no write
    long_fused = run(tp, "flux", cfg=False, templates=[cache], num_inference_steps=FUSE_MIN_STEPS + 1)
    assert weight._version > version
    steps = FUSE_MIN_STEPS + 1
    off = TemplatePipeline(flux_pipe)
    long_unfused = run(off, "flux", cfg=False, templates=[cache], num_inference_steps=steps)
    assert (long_fused - long_unfused).abs().max() < 1e-4
    assert short.shape == long_fused.shape


@pytest.mark.parametrize("family", ["flux2_klein", "sdxl"])  # sequential and batched CFG
def test_never_fused_when_a_cfg_branch_must_not_see_the_lora(family, tiny_pipes):
    pipe = tiny_pipes(family)
    fused_tp = TemplatePipeline(pipe, lora_fusion="on")
    cache, weight = _lora(fused_tp), _weight(fused_tp)
    version = weight._version
    on = run(fused_tp, family, cfg=True, templates=[cache], num_inference_steps=4)
    negative = run(fused_tp, family, cfg=True, negative_templates=[cache], num_inference_steps=4)
    assert weight._version == version
    off = TemplatePipeline(pipe)
    assert torch.equal(on, run(off, family, cfg=True, templates=[cache], num_inference_steps=4))
    reference = run(off, family, cfg=True, negative_templates=[cache], num_inference_steps=4)
    assert torch.equal(negative, reference)


def test_weights_restored_when_the_call_fails(flux_pipe):
    run(flux_pipe, "flux", cfg=False)
    before = pipeline_state(flux_pipe)
    tp = TemplatePipeline(flux_pipe, lora_fusion="on")

    def boom(*args, **kwargs):
        raise RuntimeError("step callback failed")

    with pytest.raises(RuntimeError, match="step callback failed"):
        run(tp, "flux", cfg=False, templates=[_lora(tp)], num_inference_steps=4, callback_on_step_end=boom)
    assert_pipeline_unchanged(before, flux_pipe)


def test_unknown_mode_is_refused(flux_pipe):
    with pytest.raises(ValueError, match="lora_fusion must be one of"):
        TemplatePipeline(flux_pipe, lora_fusion="always")
