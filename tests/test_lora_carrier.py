"""The lora carrier equals diffusers' own load_lora_weights, without touching a weight."""

from __future__ import annotations

import pytest
import torch
from dt_test_templates import random_lora

from diffusion_templates import LoraCache, TemplatePipeline
from diffusion_templates.carriers.lora import LoraCarrier
from diffusion_templates.context import CURRENT_CALL, CallState, InjectionTarget
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES
from helpers import FAMILIES, run

TARGETS_A = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_v",
    "single_transformer_blocks.1.attn.to_out",
]
TARGETS_B = ["transformer_blocks.1.attn.to_k", "transformer_blocks.1.ff.linear_out"]
TARGETS = {
    "flux2_klein": (TARGETS_A, TARGETS_B),
    "flux": (
        ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_out"],
        ["transformer_blocks.1.attn.to_k"],
    ),
}


def targets_for(tp) -> list[str]:
    """The first and last Linear of the first attention layer, and the first of the last layer."""

    def linears(layer):
        return [
            f"{layer.path}.{n}" for n, m in layer.module.named_modules() if isinstance(m, torch.nn.Linear)
        ]

    layers = list(tp.adapter.attention_layers().values())
    return [linears(layers[0])[0], linears(layers[0])[-1], linears(layers[-1])[0]]


def _with_peft(pipe, family, loras: dict[str, LoraCache], weights: dict[str, float]):
    """The reference: diffusers' PEFT path, on a fresh build of the same (seeded) tiny pipeline."""
    pipe = TINY_PIPELINES[family].build()
    prefix = TemplatePipeline(pipe).adapter.lora_prefix
    for name, cache in loras.items():
        pipe.load_lora_weights(cache.to_state_dict(prefix=prefix), adapter_name=name)
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    try:
        return run(pipe, family)
    finally:
        pipe.unload_lora_weights()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_equals_load_lora_weights(family, tiny_pipes):
    pipe = tiny_pipes(family)
    before = pipeline_state(pipe)
    tp = TemplatePipeline(pipe)
    cache = random_lora(tp.adapter.denoiser, targets_for(tp), rank=4, seed=1)
    ours = run(tp, family, templates=[cache], negative_templates=[cache])
    assert_pipeline_unchanged(before, pipe)
    reference = _with_peft(pipe, family, {"a": cache}, {"a": 1.0})
    assert (ours - reference).abs().max() < 1e-4
    assert (ours - run(pipe, family)).abs().max() > 1e-3


def test_scaled_lora_equals_set_adapters_weight(flux2_pipe):
    targets = TARGETS["flux2_klein"][0]
    tp = TemplatePipeline(flux2_pipe)
    cache = random_lora(flux2_pipe.transformer, targets, rank=3, seed=2, scale=0.5)
    ours = run(tp, "flux2_klein", templates=[cache], negative_templates=[cache])
    unit = random_lora(flux2_pipe.transformer, targets, rank=3, seed=2)
    reference = _with_peft(flux2_pipe, "flux2_klein", {"a": unit}, {"a": 0.5})
    assert (ours - reference).abs().max() < 1e-4


def test_merged_disjoint_loras_equal_applying_one_after_the_other(flux2_pipe):
    targets_a, targets_b = TARGETS["flux2_klein"]
    a = random_lora(flux2_pipe.transformer, targets_a, rank=4, seed=3, template="a")
    b = random_lora(flux2_pipe.transformer, targets_b, rank=2, seed=4, scale=0.7, template="b")
    tp = TemplatePipeline(flux2_pipe)
    merged = run(tp, "flux2_klein", templates=[a, b], negative_templates=[a, b])

    call = CallState()
    carrier = LoraCarrier()
    injections = [
        carrier.injection(cache, InjectionTarget(flux2_pipe, tp.adapter, branch, call))
        for cache in (a, b)
        for branch in ("cond", "uncond")
    ]
    from diffusion_templates.injection import BranchTracker

    token = CURRENT_CALL.set(call)
    with BranchTracker(tp.adapter, call):
        for injection in injections:
            injection.apply()
        try:
            sequential = run(flux2_pipe, "flux2_klein")
        finally:
            for injection in reversed(injections):
                injection.remove()
            CURRENT_CALL.reset(token)
    assert torch.equal(merged, sequential)
    peft = _with_peft(
        flux2_pipe,
        "flux2_klein",
        {"a": a.model_copy(update={"scaling": {}}), "b": b.model_copy(update={"scaling": {}})},
        {"a": 1.0, "b": 0.7},
    )
    assert (merged - peft).abs().max() < 1e-4


def test_overlapping_loras_merge_to_the_sum_of_deltas(flux2_pipe):
    targets = TARGETS["flux2_klein"][0]
    a = random_lora(flux2_pipe.transformer, targets, rank=4, seed=5, scale=0.3)
    b = random_lora(flux2_pipe.transformer, targets[:2], rank=2, seed=6, scale=1.5)
    tp = TemplatePipeline(flux2_pipe)
    ours = run(tp, "flux2_klein", templates=[a, b], negative_templates=[a, b])
    reference = _with_peft(
        flux2_pipe,
        "flux2_klein",
        {"a": a.model_copy(update={"scaling": {}}), "b": b.model_copy(update={"scaling": {}})},
        {"a": 0.3, "b": 1.5},
    )
    assert (ours - reference).abs().max() < 1e-4


def test_lora_weights_are_never_written(flux2_pipe):
    weight = flux2_pipe.transformer.transformer_blocks[0].attn.to_q.weight
    version = weight._version
    tp = TemplatePipeline(flux2_pipe)
    run(tp, "flux2_klein", templates=[{"template": "test-lora"}])
    assert weight._version == version
