"""The shipped ``shapes-high-key`` LoRA (``dt demo``'s aesthetic) and the recipe that trains it.

The file is a diffusers-format LoRA for the dt-base-shapes model, applied through the ``aesthetic``
template like any other LoRA file; the recipe is ``dt_template_aesthetic.shapes`` (``dt_sdk.train``).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from dt_template_aesthetic import AestheticInputs, AestheticTemplate, load_lora
from dt_template_aesthetic.shapes import RECIPE, SHIPPED, backdrop_stats, target_modules

from diffusion_templates import TemplateError, TemplatePipeline
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from dt_sdk.conformance import build_tiny_pipeline, single_thread, tiny_call_kwargs_for

dt_base_shapes = pytest.importorskip("dt_base_shapes")
from dt_base_shapes.data import Attributes  # noqa: E402

CAPTION = Attributes("circle", "red", "large", "center", ("green",))  # dt_base_shapes.PROMPTS[0]


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@functools.cache
def shapes_pipeline():
    pipe = dt_base_shapes.load_pipeline()
    # warm-up: the first call installs the text encoder's output-capturing hooks and diffusers' hook
    # registry (empty) on the transformer; pipeline_state is compared from here on
    pipe(prompt="warm up", **{**dt_base_shapes.CALL_KWARGS, "num_inference_steps": 1}, output_type="latent")
    return pipe


def _generate(tp, templates, negative=(), steps=8):
    kwargs = {**dt_base_shapes.CALL_KWARGS, "num_inference_steps": steps}
    out = tp(
        prompt=CAPTION.caption, templates=list(templates), negative_templates=list(negative),
        generator=torch.Generator().manual_seed(0), output_type="np", **kwargs,
    )
    return np.asarray(out.images[0])


def test_shipped_file_is_the_recipes_rank_4_lora_for_the_shapes_model():
    assert SHIPPED.is_file(), "run python -m dt_template_aesthetic.shapes"
    pipe = shapes_pipeline()
    cache, skipped = load_lora(str(SHIPPED), TemplatePipeline(pipe).adapter, template="aesthetic")
    assert not skipped
    layers = target_modules(pipe.transformer, RECIPE["targets"])
    assert sorted(cache.down) == sorted(layers)
    assert all(tuple(cache.delta(m).shape) == (o, i) for m, (i, o) in layers.items())
    assert {a.shape[0] for a in cache.down.values()} == {4}
    assert all(cache.up[m].abs().max() > 0 for m in cache.up)  # trained (B starts at zero)


def test_shipped_lora_gives_a_white_backdrop_and_leaves_the_pipeline_unchanged():
    pipe = shapes_pipeline()
    tp = TemplatePipeline(pipe)
    before = pipeline_state(pipe)
    plain = _generate(tp, [])
    spec = {"template": "aesthetic", "loras": [str(SHIPPED)]}
    both = _generate(tp, [spec], [spec])  # the trained setting: the LoRA on both CFG branches
    demo = _generate(tp, [{"template": "aesthetic", **AestheticTemplate.demo_inputs(None)}])
    again = _generate(tp, [])
    assert_pipeline_unchanged(before, pipe)
    np.testing.assert_array_equal(again, plain)
    p = backdrop_stats(plain[None], [CAPTION])
    assert p["caption"] == 1 and p["backdrop"] == 0, p  # green, as the caption says
    for images in (both, demo):
        s = backdrop_stats(images[None], [CAPTION])
        assert s["backdrop"] == 1 and s["background_luminance"] > p["background_luminance"] + 0.3, (p, s)


def test_shipped_file_equals_diffusers_load_lora_weights():
    """diffusers reads the file too; a LoRA loaded into diffusers acts on both CFG branches."""
    pytest.importorskip("peft")
    spec = {"template": "aesthetic", "loras": [str(SHIPPED)]}
    ours = _generate(TemplatePipeline(shapes_pipeline()), [spec], [spec])
    reference = dt_base_shapes.load_pipeline()
    reference.load_lora_weights(str(SHIPPED))
    theirs = np.asarray(
        reference(
            prompt=CAPTION.caption, generator=torch.Generator().manual_seed(0), output_type="np",
            **{**dt_base_shapes.CALL_KWARGS, "num_inference_steps": 8},
        ).images[0]
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_demo_inputs_use_the_shipped_file_unless_the_environment_names_files(monkeypatch, tmp_path):
    monkeypatch.delenv("DT_AESTHETIC_LORAS", raising=False)
    inputs = AestheticInputs(**AestheticTemplate.demo_inputs(None))
    assert [(s.path, s.weight) for s in inputs.loras] == [(str(SHIPPED), 1.0)]
    other = tmp_path / "mine.safetensors"
    other.write_bytes(SHIPPED.read_bytes())
    monkeypatch.setenv("DT_AESTHETIC_LORAS", str(other))
    assert AestheticTemplate.demo_inputs(None) == {"loras": [str(other)]}


def test_shipped_file_on_another_model_fails_with_a_clear_error():
    pipe = build_tiny_pipeline("flux2")  # same family, other layer sizes
    spec = {"template": "aesthetic", "loras": [str(SHIPPED)]}
    with pytest.raises(TemplateError, match="is it a LoRA for another model"):
        TemplatePipeline(pipe)(
            prompt="a red circle", templates=[spec], **tiny_call_kwargs_for("flux2")
        )


def test_recipe_trains_two_steps_and_exports_a_loadable_file(tmp_path):
    from dt_template_aesthetic import shapes

    pipe = shapes_pipeline()
    before = pipeline_state(pipe)
    out = tmp_path / "high-key.safetensors"
    record = shapes.train_shapes(
        out, data=tmp_path / "data", steps=2, batch=4, n=8, pipe=pipe, log=lambda *a: None
    )
    assert record["steps"] == 2 and all(np.isfinite(record["losses"]))
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert_pipeline_unchanged(before, pipe)
    cache, _ = load_lora(str(out), TemplatePipeline(pipe).adapter, template="aesthetic")
    shipped, _ = load_lora(str(SHIPPED), TemplatePipeline(pipe).adapter, template="aesthetic")
    assert cache.down.keys() == shipped.down.keys()
    assert all(cache.up[m].abs().max() > 0 for m in cache.up)  # two steps moved B off zero
