"""The committed weights load offline, with plain diffusers, and generate; training runs and learns."""

from __future__ import annotations

import json
from importlib import metadata

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline

import dt_base_shapes
from dt_base_shapes import CALL_KWARGS, PROMPTS, WEIGHTS, load_base
from dt_base_shapes.data import all_combinations, is_held_out


def test_weights_are_a_standard_diffusers_folder_under_30_mb():
    index = json.loads((WEIGHTS / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert index["is_distilled"] is False  # base model: real CFG, so negative templates work
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (WEIGHTS / name).is_dir()
    assert not list(WEIGHTS.rglob("*.bin")) and not list(WEIGHTS.rglob("*.pt"))  # safetensors only
    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size < 30e6


def test_plain_from_pretrained_generates_64px():
    pipe = Flux2KleinPipeline.from_pretrained(WEIGHTS)  # no custom code, no network
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.bn.running_var.min() > 0  # latent statistics were set from the data
    out = pipe(
        prompt=PROMPTS[0],
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=4.0,
        max_sequence_length=32,
        text_encoder_out_layers=(1, 2),
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_load_base_returns_the_demo_base_model():
    from diffusion_templates.demo import BaseModel

    base = load_base()
    assert isinstance(base, BaseModel)
    assert isinstance(base.pipe, Flux2KleinPipeline)
    assert base.description.startswith(f"dt-base-shapes {dt_base_shapes.__version__}")
    assert base.call_kwargs["height"] == base.call_kwargs["width"] == 64
    kwargs = {**base.call_kwargs, "num_inference_steps": 2}
    image = base.pipe(prompt=base.prompts[0], generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert image.size == (64, 64)


def test_prompts_are_held_out_captions():
    combos = {a.caption: a for a in all_combinations()}
    assert PROMPTS and all(p in combos and is_held_out(combos[p]) for p in PROMPTS)
    assert set(CALL_KWARGS) >= {"num_inference_steps", "height", "width", "guidance_scale"}


def test_entry_point_is_registered_when_installed():
    try:
        metadata.distribution("dt-base-shapes")
    except metadata.PackageNotFoundError:
        pytest.skip("dt-base-shapes is not installed (only on the path)")
    eps = [ep for ep in metadata.entry_points(group="diffusion_templates.base_models") if ep.name == "shapes"]
    assert eps and eps[0].value == "dt_base_shapes:load_base"
