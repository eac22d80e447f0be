"""``structure-kv``: the trained silhouette template (conformance kit, RoPE'd keys, shipped weights, effect).

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
from dt_template_depth.structure import (
    StructureKVModel,
    StructureKVTemplate,
    image_rope,
    rotate,
    shipped_weights,
)

from diffusion_templates import TemplateError, TemplateInputError, TemplatePipeline
from diffusion_templates.context import EncodeContext
from diffusion_templates.testing.snapshot import pipeline_state, state_differences
from dt_sdk.conformance import (
    MISSING,
    TemplateConformance,
    build_tiny_pipeline,
    cache_fit_problems,
    single_thread,
    tiny_call_kwargs_for,
)

TEMPLATE = "structure-kv"


def _tiny_weights() -> str:
    folder = tempfile.mkdtemp(prefix="dt-structure-kv-")
    layers = TemplatePipeline(build_tiny_pipeline("flux2")).adapter.attention_layers()
    torch.manual_seed(0)
    StructureKVModel.for_attention_layers(layers).save_pretrained(folder)
    return folder


def disc(cx: float, cy: float, r: float, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.float32)


TINY_WEIGHTS = _tiny_weights()


class TestStructureKV(TemplateConformance):
    template = TEMPLATE
    valid_inputs = [
        {"mask": disc(20, 20, 10), "weights": TINY_WEIGHTS},
        {"mask": (disc(40, 40, 12) * 255).astype(np.uint8), "weights": TINY_WEIGHTS},
    ]
    invalid_inputs = [
        {"mask": np.full((64, 64), 2.0, dtype=np.float32)},
        {"mask": np.zeros((4, 4), dtype=np.float32)},
        {"mask": "/no/such/mask.png"},
        ({"mask": MISSING}, "mask"),
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


def test_schema_errors_name_template_and_field():
    tp = TemplatePipeline(build_tiny_pipeline("flux2"))
    with pytest.raises(TemplateInputError, match=r"structure-kv[\s\S]*'weights'"):
        tp.encode({"template": TEMPLATE, "mask": disc(20, 20, 8), "weights": "/no/such/folder"})
    with pytest.raises(TemplateInputError, match=r"structure-kv[\s\S]*'mask'"):
        tp.encode({"template": TEMPLATE, "mask": np.zeros((64, 64, 4))})


def test_keys_carry_the_image_tokens_rope():
    """The rotary tables are the transformer's own for the image ids FLUX.2 uses, rows major."""
    pipe = shapes_pipeline()
    context = _context(pipe)
    cos, sin = image_rope(context, (8, 8), 32)
    ids = pipe._prepare_latent_ids(torch.zeros(1, 1, 8, 8))[0]
    ref_cos, ref_sin = pipe.transformer.pos_embed(ids)
    torch.testing.assert_close(cos, ref_cos.float())
    torch.testing.assert_close(sin, ref_sin.float())
    from diffusers.models.embeddings import apply_rotary_emb

    x = torch.randn(1, 64, 2, 32)
    torch.testing.assert_close(
        rotate(x, cos[None], sin[None]), apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    )


@pytest.mark.parametrize("which", ["tiny", "shapes"])
def test_untrained_model_gives_a_fitting_kv_cache(which):
    pipe = build_tiny_pipeline("flux2") if which == "tiny" else shapes_pipeline()
    context = _context(pipe)
    plugin = StructureKVTemplate()
    model = plugin.new_model(context)
    inputs = StructureKVTemplate.Inputs(mask=disc(32, 32, 12))
    forward = model.process_inputs(inputs, context)
    assert all(v.shape[0] == 1 for v in forward.values())
    cache = plugin.to_cache(model(**forward), context)
    assert cache_fit_problems(cache, context.adapter) == []
    grid = 8 if which == "shapes" else 4  # 64 px: the packed latent grid of each pipeline
    assert {k.shape[1] for k in cache.keys.values()} == {grid * grid}
    batch = {k: torch.cat([v, v]) for k, v in forward.items()}
    out = model(**batch)
    sum(t.sum() for part in out.values() for t in part.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_shipped_weights_apply_and_leave_the_pipeline_unchanged():
    assert "shapes" in shipped_weights()
    import dt_base_shapes

    pipe = shapes_pipeline()
    tp = TemplatePipeline(pipe)
    kwargs = {**dt_base_shapes.CALL_KWARGS, "num_inference_steps": 4, "output_type": "np"}
    prompt = "a red shape on a white background"
    bare = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    before = pipeline_state(pipe)
    out = tp(
        prompt=prompt,
        templates=[{"template": TEMPLATE, "mask": disc(20, 20, 10)}],
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images
    assert state_differences(before, pipeline_state(pipe)) == []
    assert not np.array_equal(out, bare)
    assert np.array_equal(
        pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kwargs).images, bare
    )


def _never(*args, **kwargs):  # pragma: no cover - a denoising step must not run
    raise AssertionError("denoising ran")


def test_weights_for_another_layout_are_refused_before_denoising():
    tp = TemplatePipeline(build_tiny_pipeline("flux2"))
    with pytest.raises(TemplateError) as info:
        tp(
            prompt="x",
            templates=[{"template": TEMPLATE, "mask": disc(20, 20, 10)}],
            **{**tiny_call_kwargs_for("flux2"), "callback_on_step_end": _never},
        )
    message = str(info.value)
    assert TEMPLATE in message and "'weights'" in message and "'shapes'" in message
    assert "[2, 16]" in message and ("[2, 32]" in message or "[4, 32]" in message)


def iou(image: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the generated foreground (far from the median colour outside the mask) with the mask."""
    outside = mask < 0.5
    background = np.median(image[outside], axis=0)
    fg = np.sqrt(((image - background) ** 2).sum(axis=-1)) > 0.25
    inside = mask >= 0.5
    return float((fg & inside).sum() / max(1, (fg | inside).sum()))


def test_shipped_weights_put_the_shape_in_the_mask():
    """Two masks, a prompt without shape or position: the shape lands in the mask asked for."""
    import dt_base_shapes

    tp = TemplatePipeline(shapes_pipeline())
    kwargs = {**dt_base_shapes.CALL_KWARGS, "num_inference_steps": 10, "output_type": "np"}
    masks = {"top left": disc(18, 18, 9), "bottom right": disc(46, 46, 9)}
    images = {
        name: tp(
            prompt="a red shape on a white background",
            templates=[{"template": TEMPLATE, "mask": m}],
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images[0]
        for name, m in masks.items()
    }
    own = [iou(images[n], masks[n]) for n in masks]
    other = [
        iou(images[a], masks[b]) for a, b in [("top left", "bottom right"), ("bottom right", "top left")]
    ]
    print(
        f"\nstructure-kv: IoU with the requested mask {np.round(own, 2)}, "
        f"with the other mask {np.round(other, 2)}"
    )
    assert min(own) > 0.3 and min(own) > max(other) + 0.2
