"""``color-kv``: the trained value-encoder template (conformance kit, shipped weights, effect).

The kit runs on the tiny FLUX.2 pipeline with an untrained model saved for its attention layout
(the shipped ``shapes`` weights fit the dt-base-shapes model only); the shipped weights are tested on
the dt-base-shapes pipeline itself.
"""

from __future__ import annotations

import functools
import tempfile

import numpy as np
import pytest
import torch
from diffusion_templates import TemplateError, TemplateInputError, TemplatePipeline
from diffusion_templates.context import EncodeContext
from diffusion_templates.plugins import PluginHost
from diffusion_templates.testing.snapshot import pipeline_state, state_differences
from dt_sdk.conformance import (
    MISSING,
    TemplateConformance,
    build_tiny_pipeline,
    cache_fit_problems,
    single_thread,
    tiny_call_kwargs_for,
)

from dt_template_color.kv import ColorKVModel, ColorKVTemplate, parse_color, shipped_weights

TEMPLATE = "color-kv"


def _tiny_weights() -> str:
    """An untrained model saved for the tiny FLUX.2 pipeline's attention layout (for the kit)."""
    folder = tempfile.mkdtemp(prefix="dt-color-kv-")
    layers = TemplatePipeline(build_tiny_pipeline("flux2")).adapter.attention_layers()
    torch.manual_seed(0)
    ColorKVModel.for_attention_layers(layers).save_pretrained(folder)
    return folder


TINY_WEIGHTS = _tiny_weights()


class TestColorKV(TemplateConformance):
    template = TEMPLATE
    valid_inputs = [
        {"color": [0.9, 0.2, 0.1], "weights": TINY_WEIGHTS},
        {"color": "orange", "weights": TINY_WEIGHTS},
        {"color": "#2846dc", "weights": TINY_WEIGHTS},
    ]
    invalid_inputs = [
        {"color": [1.5, 0.0, 0.0]},
        {"color": [0.5, 0.5]},
        {"color": "not-a-colour"},
        {"color": [float("nan"), 0.0, 0.0]},
        ({"color": MISSING}, "color"),
        ({"weights": "no-such-weights"}, "weights"),
    ]


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@functools.cache
def shapes_pipeline():
    dt_base_shapes = pytest.importorskip("dt_base_shapes")
    return dt_base_shapes.load_pipeline()


def _context(pipe) -> EncodeContext:
    return EncodeContext(pipe=pipe, adapter=TemplatePipeline(pipe).adapter, template=TEMPLATE)


def test_colour_forms():
    assert parse_color("red") == (1.0, 0.0, 0.0)
    assert parse_color("#2846dc") == parse_color((40 / 255, 70 / 255, 220 / 255))
    assert ColorKVTemplate.Inputs(color=(0.1, 0.2, 0.3)).color == (0.1, 0.2, 0.3)


def test_schema_errors_name_template_and_field():
    tp = TemplatePipeline(build_tiny_pipeline("flux2"))
    with pytest.raises(TemplateInputError, match=r"color-kv.*\n.*'weights'"):
        tp.encode({"template": TEMPLATE, "color": "red", "weights": "/no/such/folder"})
    with pytest.raises(TemplateInputError, match=r"color-kv[\s\S]*'color'[\s\S]*unknown colour"):
        tp.encode({"template": TEMPLATE, "color": "blurple"})


@pytest.mark.parametrize("which", ["tiny", "shapes"])
def test_untrained_model_gives_a_fitting_kv_cache(which):
    pipe = build_tiny_pipeline("flux2") if which == "tiny" else shapes_pipeline()
    context = _context(pipe)
    plugin = ColorKVTemplate()
    model = plugin.new_model(context)
    inputs = ColorKVTemplate.Inputs(color="orange")
    cache = plugin.to_cache(model.encode(inputs, context), context)
    assert cache_fit_problems(cache, context.adapter) == []
    assert set(cache.keys) == set(context.adapter.attention_layers())
    # forward is differentiable and batched, as training needs it
    out = model(value=torch.tensor([[0.2, 0.3, 0.4], [0.9, 0.1, 0.0]]))
    loss = sum(v.sum() + k.sum() for k, v in zip(out["keys"].values(), out["values"].values(), strict=True))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_shipped_weights_apply_and_leave_the_pipeline_unchanged():
    assert "shapes" in shipped_weights()
    import dt_base_shapes

    pipe = shapes_pipeline()
    tp = TemplatePipeline(pipe)
    kwargs = {**dt_base_shapes.CALL_KWARGS, "num_inference_steps": 4, "output_type": "np"}
    prompt = "a large circle in the center on a white background"
    bare = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    before = pipeline_state(pipe)
    out = tp(
        prompt=prompt,
        templates=[{"template": TEMPLATE, "color": "blue"}],
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images
    assert state_differences(before, pipeline_state(pipe)) == []
    assert not np.array_equal(out, bare)
    again = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.array_equal(again, bare)


def test_weights_for_another_layout_are_refused_before_denoising():
    pipe = build_tiny_pipeline("flux2")
    tp = TemplatePipeline(pipe)
    with pytest.raises(TemplateError) as info:
        tp(
            prompt="x",
            templates=[{"template": TEMPLATE, "color": "red"}],
            **{**tiny_call_kwargs_for("flux2"), "callback_on_step_end": _never},
        )
    message = str(info.value)
    assert TEMPLATE in message and "'weights'" in message and "'shapes'" in message
    assert "[2, 16]" in message and ("[2, 32]" in message or "[4, 32]" in message)


def _never(*args, **kwargs):  # pragma: no cover - a denoising step must not run
    raise AssertionError("denoising ran")


def test_shipped_weights_colour_the_shape_as_requested():
    """Red vs blue request, prompt without a colour word: the shape's centre follows."""
    import dt_base_shapes

    tp = TemplatePipeline(shapes_pipeline())
    kwargs = {**dt_base_shapes.CALL_KWARGS, "num_inference_steps": 10, "output_type": "np"}
    centre = {}
    for name, rgb in {"red": (0.86, 0.16, 0.16), "blue": (0.16, 0.27, 0.86)}.items():
        image = tp(
            prompt="a large circle in the center on a white background",
            templates=[{"template": TEMPLATE, "color": rgb}],
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images[0]
        centre[name] = image[26:38, 26:38].reshape(-1, 3).mean(axis=0)
    print(
        f"\ncolor-kv: centre RGB for red {np.round(centre['red'], 2)}, for blue {np.round(centre['blue'], 2)}"
    )
    assert centre["red"][0] - centre["red"][2] > 0.2
    assert centre["blue"][2] - centre["blue"][0] > 0.2


def test_registered():
    assert PluginHost().info("template", TEMPLATE) is not None
