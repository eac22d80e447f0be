"""After every call, successful or raising, the wrapped pipeline is bit-identical to before."""

from __future__ import annotations

import pytest
import torch

from diffusion_templates import TemplatePipeline
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from helpers import run

ALL_CARRIERS = [
    {"template": "test-kv", "scale": 0.5},
    {
        "template": "test-lora",
        "targets": ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_out"],
    },
]


class Boom(Exception):
    pass


def test_successful_call_restores_everything(flux2_pipe):
    bare = run(flux2_pipe, "flux2_klein")
    before = pipeline_state(flux2_pipe)
    tp = TemplatePipeline(flux2_pipe)
    out = run(tp, "flux2_klein", templates=ALL_CARRIERS, negative_templates=ALL_CARRIERS[:1])
    assert not torch.equal(out, bare)
    assert_pipeline_unchanged(before, flux2_pipe)
    assert torch.equal(run(flux2_pipe, "flux2_klein"), bare)


@pytest.mark.parametrize("fail_at_step", [0, 1])
def test_exception_from_step_callback_restores_everything(flux2_pipe, fail_at_step):
    bare = run(flux2_pipe, "flux2_klein")
    before = pipeline_state(flux2_pipe)
    tp = TemplatePipeline(flux2_pipe)

    def callback(pipe, step, timestep, kwargs):
        if step == fail_at_step:
            raise Boom(f"step {step}")
        return kwargs

    with pytest.raises(Boom):
        run(
            tp,
            "flux2_klein",
            templates=ALL_CARRIERS,
            negative_templates=ALL_CARRIERS,
            callback_on_step_end=callback,
        )
    assert_pipeline_unchanged(before, flux2_pipe)
    assert torch.equal(run(flux2_pipe, "flux2_klein"), bare)
    assert torch.equal(run(tp, "flux2_klein"), bare)


def test_exception_inside_the_denoiser_mid_step_restores_everything(flux2_pipe):
    bare = run(flux2_pipe, "flux2_klein")
    tp = TemplatePipeline(flux2_pipe)
    calls = []

    def explode(module, args):
        calls.append(1)
        if len(calls) == 3:  # step 1, cond branch: injections are active right now
            raise Boom("inside attention")

    handle = flux2_pipe.transformer.single_transformer_blocks[1].attn.register_forward_pre_hook(explode)
    try:
        before = pipeline_state(flux2_pipe)
        with pytest.raises(Boom):
            run(tp, "flux2_klein", templates=ALL_CARRIERS, negative_templates=ALL_CARRIERS)
        assert_pipeline_unchanged(before, flux2_pipe)
    finally:
        handle.remove()
    assert torch.equal(run(flux2_pipe, "flux2_klein"), bare)


def test_keyboard_interrupt_restores_everything(flux2_pipe):
    before = pipeline_state(flux2_pipe)
    tp = TemplatePipeline(flux2_pipe)

    def interrupt(pipe, step, timestep, kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tp, "flux2_klein", templates=ALL_CARRIERS, callback_on_step_end=interrupt)
    assert_pipeline_unchanged(before, flux2_pipe)


def test_fresh_pipeline_without_warm_up_is_restored_too():
    """diffusers creates its hook registry lazily on the first call; we leave none behind either."""
    from diffusion_templates.testing.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES["flux2_klein"].build()
    assert "_diffusers_hook" not in pipe.transformer.__dict__
    # Only the denoiser: transformers' text encoder installs its own output hooks on first use.
    before = pipeline_state(pipe.transformer)
    run(TemplatePipeline(pipe), "flux2_klein", templates=ALL_CARRIERS)
    assert_pipeline_unchanged(before, pipe.transformer)


def test_wrapping_changes_nothing_and_attributes_fall_through(flux2_pipe):
    before = pipeline_state(flux2_pipe)
    tp = TemplatePipeline(flux2_pipe)
    assert tp.transformer is flux2_pipe.transformer and tp.vae is flux2_pipe.vae
    assert "flux2" in repr(tp)
    assert_pipeline_unchanged(before, flux2_pipe)


def test_child_registry_caches_are_put_back_also_for_hooks_added_between_calls():
    """diffusers caches each registry's child registries; a call's own hooks must not stay in them,
    and a hook that the user registers on a block between two calls is seen by the next call."""
    from diffusers.hooks import HookRegistry, ModelHook

    from diffusion_templates.testing.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES["flux2_klein"].build()
    transformer = pipe.transformer
    tp = TemplatePipeline(pipe)
    run(pipe, "flux2_klein")  # diffusers creates the root registry and caches its (empty) child list
    root = transformer._diffusers_hook
    cached = root._child_registries_cache
    run(tp, "flux2_klein", templates=ALL_CARRIERS)
    assert root._child_registries_cache is cached  # not the list built during the call
    assert transformer._diffusers_hook is root

    block = transformer.transformer_blocks[0]
    HookRegistry.check_if_exists_or_initialize(block).register_hook(ModelHook(), "user")
    root.invalidate_child_registries_cache()  # what diffusers' enable_cache does
    block._diffusers_hook._child_registries_cache = sentinel = ["user's"]
    run(pipe, "flux2_klein")
    user_list = root._child_registries_cache
    assert user_list == [block._diffusers_hook]
    before = pipeline_state(pipe.transformer)
    run(tp, "flux2_klein", templates=ALL_CARRIERS)
    assert root._child_registries_cache is user_list
    assert block._diffusers_hook._child_registries_cache is sentinel
    assert_pipeline_unchanged(before, pipe.transformer)
