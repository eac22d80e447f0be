"""Tests that catch what the older ones could not (issue 20, checked by mutation): the user's step
callback inside ``compose_step_callbacks``, and ``registry_cache_guard``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from diffusion_templates import TemplatePipeline
from diffusion_templates.injection import Injection, compose_step_callbacks
from helpers import run


class _Shift(Injection):
    """A step-callback injection: adds ``delta`` to the latents at every step end."""

    step_tensor_inputs = ("latents", "prompt_embeds")

    def __init__(self, delta: float) -> None:
        self.delta = delta

    def on_step_end(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"latents": tensors["latents"] + self.delta}


@pytest.mark.parametrize("deltas", [(1.0,), (0.5, 2.0)])
def test_compose_step_callbacks_calls_the_users_callback_after_the_injections(deltas):
    seen: list[tuple[int, float]] = []

    def user(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        seen.append((step, float(tensors["latents"].sum())))
        return {"latents": tensors["latents"] * 10}

    kwargs = {"callback_on_step_end": user, "callback_on_step_end_tensor_inputs": ["latents"], "x": 1}
    composed = compose_step_callbacks([_Shift(d) for d in deltas], kwargs)
    assert composed["x"] == 1
    assert composed["callback_on_step_end_tensor_inputs"] == ["latents", "prompt_embeds"]
    callback = composed["callback_on_step_end"]
    for step in range(3):
        out = callback(None, step, None, {"latents": torch.zeros(2), "prompt_embeds": torch.ones(1)})
        # The user's callback ran on the injections' latents and its result is what comes back.
        assert torch.equal(out["latents"], torch.full((2,), 10 * sum(deltas)))
        assert torch.equal(out["prompt_embeds"], torch.ones(1))
    assert seen == [(step, 2 * sum(deltas)) for step in range(3)]


def test_the_users_callback_runs_in_a_templated_call_with_a_step_carrier():
    """End to end on the embedded model: ``inpaint`` (a latent-mask carrier, which blends at every
    step end) and the user's own callback both act; the user's runs at every step, its latents used."""
    import dt_base_shapes
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (64, 64), (30, 80, 160))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([16, 16, 48, 48], fill=255)

    pipe = dt_base_shapes.load_pipeline()
    tp = TemplatePipeline(pipe)
    kwargs = {**dt_base_shapes.CALL_KWARGS, "num_inference_steps": 3, "output_type": "latent"}
    template = [{"template": "inpaint", "image": picture, "mask": mask}]
    steps: list[int] = []

    def count(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        steps.append(step)
        return {}

    def zero(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"latents": torch.zeros_like(tensors["latents"])}

    for seed in (0, 1):
        steps.clear()
        gen = torch.Generator().manual_seed
        plain = tp(prompt=dt_base_shapes.PROMPTS[0], templates=template, generator=gen(seed), **kwargs).images
        counted = tp(
            prompt=dt_base_shapes.PROMPTS[0],
            templates=template,
            generator=gen(seed),
            callback_on_step_end=count,
            **kwargs,
        ).images
        assert steps == [0, 1, 2]
        assert torch.equal(plain, counted)
        zeroed = tp(
            prompt=dt_base_shapes.PROMPTS[0],
            templates=template,
            generator=gen(seed),
            callback_on_step_end=zero,
            **kwargs,
        ).images
        assert not torch.equal(zeroed, plain)


ALL_CARRIERS = [
    {"template": "test-kv", "scale": 0.5},
    {"template": "test-lora", "targets": ["transformer_blocks.0.attn.to_q"]},
]


@pytest.mark.parametrize("templates", [ALL_CARRIERS[:1], ALL_CARRIERS])
def test_an_invalidated_child_registry_cache_is_left_invalidated(templates):
    """diffusers rebuilds a registry's child list on the first ``cache_context`` after it was
    invalidated (``enable_cache`` does that): built during a templated call, the list would keep the
    registries of the call's own hooks after they are gone. The guard puts ``None`` back."""
    from diffusion_templates.testing.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES["flux2_klein"].build()
    tp = TemplatePipeline(pipe)
    bare = run(pipe, "flux2_klein")
    root = pipe.transformer._diffusers_hook
    for seed in (0, 3):
        root.invalidate_child_registries_cache()
        assert root._child_registries_cache is None
        run(tp, "flux2_klein", templates=templates, seed=seed)
        assert root.__dict__.get("_child_registries_cache") is None
        assert pipe.transformer._diffusers_hook is root
    assert torch.equal(run(pipe, "flux2_klein"), bare)
    assert root._child_registries_cache == []  # rebuilt by the bare call: no registry of ours in it
