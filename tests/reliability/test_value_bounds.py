"""Bounded values: every tensor and number that reaches a carrier is finite and within ``limits.py``'s
bounds, checked before denoising, with an error naming the template, the tensor or field and the bound.

Covered for each carrier and each way a cache arrives (a plugin's own encode, a cache object passed
in ``templates=``, a cache file, a LoRA file): NaN/Inf, finite but absurd magnitudes, masks and images
outside [0, 1], NaN/Infinity in JSON metadata, float8 cache files. Also the "late or wrong errors" of
the same attack: ``start=1.0`` with the default ``end``, ``templates="name"``, 1-D LoRA factors.
Every refused call runs no denoiser step and leaves the pipeline bit-identical.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import Field
from safetensors.torch import save_file

from diffusion_templates import (
    CacheError,
    EmbeddingCache,
    GuidanceCache,
    InitLatentsCache,
    KVCache,
    LatentMaskCache,
    LoraCache,
    ResidualCache,
    Template,
    TemplateCache,
    TemplateError,
    TemplateInputError,
    TemplatePipeline,
    UnknownTemplateError,
    limits,
)
from diffusion_templates.plugins import default_host
from diffusion_templates.template import TemplateInputs
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import tiny_call_kwargs
from helpers import count_denoiser_calls, run

SETTINGS = (
    "DT_MAX_KV_MAGNITUDE",
    "DT_MAX_LORA_MAGNITUDE",
    "DT_MAX_EMBEDDING_MAGNITUDE",
    "DT_MAX_RESIDUAL_MAGNITUDE",
    "DT_MAX_LATENT_MAGNITUDE",
    "DT_MAX_GUIDANCE_STRENGTH",
    "DT_MAX_CONDITIONING_SCALE",
)
TARGET = "transformer_blocks.0.attn.to_q"
NONFINITE = "holds NaN or infinite values"
#: finite values beyond the default bounds, and non-finite ones (several inputs, not one)
BAD_VALUES = [float("nan"), float("inf"), -float("inf"), 3e38, -1e30, 1e5]


def _bound_message(value: float, setting: str) -> str:
    return NONFINITE if not math.isfinite(value) else rf"more than the limit of .*\({setting}\)"


@pytest.fixture(autouse=True)
def _default_bounds(monkeypatch):
    for var in SETTINGS:
        monkeypatch.delenv(var, raising=False)


class Guard:
    """``guard(family)``: a TemplatePipeline whose calls must not reach the denoiser; at the end of the
    test the pipeline is compared with its state from before. ``allow()`` forgets the steps of a call
    that was meant to run."""

    def __init__(self, tiny_pipes):
        self.tiny_pipes = tiny_pipes
        self.opened: list = []

    def __call__(self, family: str = "flux2_klein", **options) -> TemplatePipeline:
        pipe = self.tiny_pipes(family)
        tp = TemplatePipeline(pipe, **{"store": None, **options})
        before = pipeline_state(pipe)  # before the counting hook, which is gone again at the end
        calls, handle = count_denoiser_calls(tp.adapter.denoiser)
        self.opened.append((pipe, before, calls, handle))
        return tp

    def allow(self) -> None:
        for _, _, calls, _ in self.opened:
            calls.clear()

    def close(self) -> None:
        for pipe, before, calls, handle in self.opened:
            handle.remove()
            assert calls == [], "a denoiser step ran before the refusal"
            assert_pipeline_unchanged(before, pipe)


@pytest.fixture
def guarded(tiny_pipes):
    guard = Guard(tiny_pipes)
    yield guard
    guard.close()


def refused(tp: TemplatePipeline, family: str, pattern: str, error: type = CacheError, **kwargs) -> str:
    with pytest.raises(error, match=pattern) as info:
        run(tp, family, **kwargs)
    return str(info.value)


def poisoned(shape: tuple[int, ...], value: float, seed: int) -> torch.Tensor:
    """Random values with one entry set to ``value`` at a seeded position."""
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator) * 0.5
    flat = tensor.view(-1)
    flat[int(torch.randint(flat.numel(), (1,), generator=generator))] = value
    return tensor


def kv_cache(tp: TemplatePipeline, value: float, seed: int, *, field: str = "keys") -> KVCache:
    layer = tp.adapter.attention_layers()["double_0"]
    shape = (1, 3, layer.heads, layer.head_dim)
    good = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100))
    bad = poisoned(shape, value, seed)
    keys, values = (bad, good) if field == "keys" else (good, bad)
    return KVCache(keys={"double_0": keys}, values={"double_0": values}, template="direct-kv")


def lora_cache(tp: TemplatePipeline, seed: int, *, down_value=None, up_value=None, scaling=1.0) -> LoraCache:
    linear = tp.adapter.denoiser.get_submodule(TARGET)
    shape_down, shape_up = (4, linear.in_features), (linear.out_features, 4)
    down = poisoned(shape_down, down_value, seed) if down_value is not None else torch.randn(shape_down) * 0.1
    up = poisoned(shape_up, up_value, seed) if up_value is not None else torch.randn(shape_up) * 0.1
    return LoraCache(down={TARGET: down}, up={TARGET: up}, scaling={TARGET: scaling}, template="direct-lora")


# --------------------------------------------------------------------------- a plugin's own encode


class PoisonInputs(TemplateInputs):
    carrier: Literal["kv", "lora", "embedding"] = "kv"
    value: float = Field(float("nan"), description="the poisoned entry (NaN allowed on purpose)")
    seed: int = 0


class Poison(Template):
    """A template whose encode computes a cache with one bad value (a diverged Template model)."""

    Inputs = PoisonInputs
    carriers = ("kv", "lora", "embedding")

    def encode(self, inputs: PoisonInputs, context) -> TemplateCache:
        adapter = context.adapter
        if inputs.carrier == "kv":
            layer = adapter.attention_layers()["double_0"]
            shape = (1, 2, layer.heads, layer.head_dim)
            return KVCache(keys={"double_0": poisoned(shape, inputs.value, inputs.seed)},
                           values={"double_0": torch.zeros(shape)})  # fmt: skip
        if inputs.carrier == "lora":
            linear = adapter.denoiser.get_submodule(TARGET)
            return LoraCache(down={TARGET: poisoned((2, linear.in_features), inputs.value, inputs.seed)},
                             up={TARGET: torch.zeros(linear.out_features, 2)})  # fmt: skip
        dim, _ = adapter.text_embedding_dims()
        return EmbeddingCache(delta=poisoned((1, 1, dim), inputs.value, inputs.seed))


@pytest.mark.parametrize("store", [None, "default"])
@pytest.mark.parametrize(
    "carrier,setting,tensor",
    [
        ("kv", "DT_MAX_KV_MAGNITUDE", "keys/double_0"),
        ("lora", "DT_MAX_LORA_MAGNITUDE", f"down/{TARGET}"),
        ("embedding", "DT_MAX_EMBEDDING_MAGNITUDE", "delta"),
    ],
)
def test_a_plugins_encode_computing_bad_values_is_refused(guarded, carrier, setting, tensor, store):
    default_host().register("template", "poison", Poison)
    tp = guarded(store=store)
    for seed, value in enumerate(BAD_VALUES):
        spec = {"template": "poison", "carrier": carrier, "value": value, "seed": seed}
        message = refused(tp, "flux2_klein", _bound_message(value, setting), templates=[spec])
        assert f"{carrier} cache from template 'poison'" in message and repr(tensor) in message
    # the same template with a good value runs
    good = run(tp, "flux2_klein", templates=[{"template": "poison", "carrier": carrier, "value": 0.25}])
    assert torch.isfinite(good).all()
    guarded.allow()


# --------------------------------------------------------------------------- caches passed directly


@pytest.mark.parametrize("field", ["keys", "values"])
@pytest.mark.parametrize("branch", ["templates", "negative_templates"])
def test_kv_values_are_bounded(guarded, field, branch):
    tp = guarded()
    for seed, value in enumerate(BAD_VALUES):
        cache = kv_cache(tp, value, seed, field=field)
        message = refused(
            tp, "flux2_klein", _bound_message(value, "DT_MAX_KV_MAGNITUDE"), **{branch: [cache]}
        )
        assert "kv cache from template 'direct-kv'" in message and f"'{field}/double_0'" in message


def test_the_error_names_the_bad_template_of_a_merge(guarded):
    tp = guarded()
    good = kv_cache(tp, 0.5, 0).model_copy(update={"template": "fine"})
    bad = kv_cache(tp, 3e38, 1).model_copy(update={"template": "diverged"})
    message = refused(tp, "flux2_klein", "DT_MAX_KV_MAGNITUDE", templates=[good, bad])
    assert "template 'diverged'" in message and "3e+38" in message and "limit of 65504" in message


@pytest.mark.parametrize("factor", ["down", "up"])
def test_lora_factors_are_bounded(guarded, factor):
    tp = guarded()
    for seed, value in enumerate(BAD_VALUES):
        cache = lora_cache(tp, seed, **{f"{factor}_value": value})
        message = refused(
            tp, "flux2_klein", _bound_message(value, "DT_MAX_LORA_MAGNITUDE"), templates=[cache]
        )
        assert "lora cache from template 'direct-lora'" in message and f"'{factor}/{TARGET}'" in message


def test_lora_scaling_is_finite_and_counts_in_the_bound(guarded):
    tp = guarded()
    with pytest.raises(ValueError, match="scaling is nan"):
        lora_cache(tp, 0, scaling=float("nan"))
    for seed, scaling in enumerate([float("nan"), float("inf"), 1e30]):
        cache = lora_cache(tp, seed)
        cache.scaling[TARGET] = scaling  # a dict entry changed after validation
        pattern = (
            "must be finite"
            if not math.isfinite(scaling)
            else r"\(times its scaling\).*DT_MAX_LORA_MAGNITUDE"
        )
        refused(tp, "flux2_klein", pattern, templates=[cache])


@pytest.mark.parametrize(
    "terms,field",
    [
        ({"strength": 1e300}, "term 0 ('luminance') strength is 1e+300"),
        ({"strength": 5.0}, "term 0 ('luminance') strength is 5"),
        ({"strength": 2.0, "weights": [1.0, 1e300]}, "strength x largest step weight is 2e+300"),
        ({"strength": 1.0, "weights": [0.5, 8.0]}, "strength x largest step weight is 8"),
    ],
)
def test_guidance_strength_is_bounded(guarded, terms, field):
    tp = guarded()
    cache = GuidanceCache.single("luminance", 0.5, template="direct-guidance", **terms)
    message = refused(tp, "flux2_klein", "DT_MAX_GUIDANCE_STRENGTH", templates=[cache])
    assert "guidance cache from template 'direct-guidance'" in message and field in message
    assert "more than the limit of 4" in message


@pytest.mark.parametrize("field", ["tokens", "delta", "pooled_delta"])
def test_embedding_values_are_bounded(guarded, field):
    family = "flux"  # has a pooled prompt embedding
    tp = guarded(family)
    dim, pooled = tp.adapter.text_embedding_dims()
    shape = {"tokens": (1, 2, dim), "delta": (1, 1, dim), "pooled_delta": (1, pooled)}[field]
    for seed, value in enumerate(BAD_VALUES):
        cache = EmbeddingCache(**{field: poisoned(shape, value, seed)}, template="direct-embedding")
        message = refused(tp, family, _bound_message(value, "DT_MAX_EMBEDDING_MAGNITUDE"), templates=[cache])
        assert "embedding cache from template 'direct-embedding'" in message and repr(field) in message


@pytest.mark.parametrize("carrier", ["latent_mask", "init_latents"])
@pytest.mark.parametrize("value", [1.5, -0.25, 255.0, float("nan")])
def test_masks_and_images_must_lie_in_the_unit_range(guarded, carrier, value):
    tp = guarded()
    size = tiny_call_kwargs("flux2_klein")["height"]
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, size, size)
    mask[..., : size // 2] = 1.0
    fields = ["image"] if carrier == "init_latents" else ["image", "mask"]
    for field in fields:
        values = {"image": image.clone(), "mask": mask.clone()}
        values[field].view(-1)[7] = value
        if carrier == "init_latents":
            cache = InitLatentsCache(strength=0.6, image=values["image"], template="direct-picture")
        else:
            cache = LatentMaskCache(mask=values["mask"], image=values["image"], template="direct-picture")
        pattern = NONFINITE if math.isnan(value) else r"outside the bound \[0, 1\]"
        message = refused(tp, "flux2_klein", pattern, templates=[cache])
        assert f"{carrier} cache from template 'direct-picture'" in message and repr(field) in message


def test_latents_are_bounded(guarded):
    tp = guarded()
    size = tiny_call_kwargs("flux2_klein")["height"]
    shape = tp.adapter.image_latent_shape(1, size, size)
    for seed, value in enumerate(BAD_VALUES):
        cache = InitLatentsCache(
            strength=0.5, latents=poisoned(shape, value, seed), template="direct-latents"
        )
        message = refused(
            tp, "flux2_klein", _bound_message(value, "DT_MAX_LATENT_MAGNITUDE"), templates=[cache]
        )
        assert "'latents'" in message


def test_residuals_and_conditioning_scale_are_bounded(guarded):
    family = "flux"
    tp = guarded(family)
    for seed, value in enumerate(BAD_VALUES):
        cache = ResidualCache.from_residuals(
            {"double": [poisoned((1, 16, 8), value, seed)]}, template="static"
        )
        message = refused(tp, family, _bound_message(value, "DT_MAX_RESIDUAL_MAGNITUDE"), templates=[cache])
        assert "residual cache from template 'static'" in message and "'residuals/0/double/0'" in message
    for scale in (1e300, -50.0):
        cache = ResidualCache.from_residuals(
            {"double": [torch.zeros(1, 16, 8)]}, conditioning_scale=scale, template="static"
        )
        message = refused(tp, family, "DT_MAX_CONDITIONING_SCALE", templates=[cache])
        assert "entry 0 conditioning_scale" in message and "limit of 10" in message


# --------------------------------------------------------------------------- cheap: measured once


def test_a_cache_is_measured_once_and_again_after_an_in_place_change(guarded, monkeypatch):
    tp = guarded()
    measured = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: measured.append(t.shape) or aminmax(t))
    for seed in range(3):
        cache = kv_cache(tp, 0.5, seed)
        start = len(measured)
        cache.check_values()
        assert len(measured) == start + 2  # keys and values, one reduction each
        cache.check_values()
        cache.model_copy().check_values()  # copies share the tensors (as the store's do)
        assert len(measured) == start + 2
        cache.values["double_0"].mul_(1e36)  # in place: the version counter moves
        with pytest.raises(CacheError, match="'values/double_0' reaches .*DT_MAX_KV_MAGNITUDE"):
            cache.check_values()
        assert len(measured) == start + 3  # the changed tensor only


def test_store_hits_are_not_measured_again(guarded, monkeypatch):
    tp = guarded(store="default")
    spec = {"template": "test-kv", "seed": 4, "layers": ["double_0", "single_0"]}
    first = tp.encode(spec)
    measured = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: measured.append(t.shape) or aminmax(t))
    first[0].check_values()
    assert len(measured) == 4
    again = tp.encode(spec)
    assert again[0] is not first[0]  # the store's copy ...
    again[0].check_values()
    assert len(measured) == 4  # ... shares the measured tensors


# --------------------------------------------------------------------------- raising a bound


def test_a_raised_bound_lets_a_large_but_legitimate_value_through(guarded, monkeypatch):
    tp = guarded()
    large = kv_cache(tp, 2e5, 0)
    refused(tp, "flux2_klein", r"reaches \|value\| 200000, more than the limit of 65504", templates=[large])
    guidance = GuidanceCache.single("luminance", 0.5, strength=6.0, template="strong")
    refused(tp, "flux2_klein", "DT_MAX_GUIDANCE_STRENGTH", templates=[guidance])
    lora = lora_cache(tp, 1, up_value=5e4)
    refused(tp, "flux2_klein", "DT_MAX_LORA_MAGNITUDE", templates=[lora])

    monkeypatch.setenv("DT_MAX_KV_MAGNITUDE", "1e6")
    monkeypatch.setenv("DT_MAX_LORA_MAGNITUDE", "1e5")
    bare = run(tp.pipe, "flux2_klein")
    for cache in (large, lora):
        out = run(tp, "flux2_klein", templates=[cache])
        assert torch.isfinite(out).all() and not torch.equal(out, bare)
    guarded.allow()

    monkeypatch.setenv("DT_MAX_KV_MAGNITUDE", "1e5")  # read at call time: lowered again, refused again
    refused(tp, "flux2_klein", r"limit of 100000 \(DT_MAX_KV_MAGNITUDE\)", templates=[large])


@pytest.mark.parametrize("raw", ["0", "-3", "nan", "inf", "lots"])
def test_a_bad_bound_setting_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("DT_MAX_GUIDANCE_STRENGTH", raw)
    with pytest.raises(
        ValueError, match=rf"DT_MAX_GUIDANCE_STRENGTH={re.escape(repr(raw))}: expected a positive"
    ):
        limits.max_guidance_strength()


def test_defaults():
    assert limits.max_kv_magnitude() == limits.max_embedding_magnitude() == 65504.0
    assert (limits.max_lora_magnitude(), limits.max_guidance_strength(), limits.max_conditioning_scale()) == (
        1e4,
        4.0,
        10.0,
    )


# --------------------------------------------------------------------------- cache files


def _lora_file(tp: TemplatePipeline, path: Path, seed: int) -> Path:
    lora_cache(tp, seed).save(path)
    return path


def _rewrite_metadata(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["diffusion_templates.cache"] = edit(
        header["__metadata__"]["diffusion_templates.cache"]
    )
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_in_cache_metadata_is_refused(guarded, tmp_path, constant):
    tp = guarded()
    path = _lora_file(tp, tmp_path / "lora.safetensors", 0)
    _rewrite_metadata(path, lambda meta: meta.replace('"scaling": {"transformer_blocks.0.attn.to_q": 1.0}',
                                                      f'"scaling": {{"{TARGET}": {constant}}}'))  # fmt: skip
    assert constant in path.read_bytes().decode("latin-1")
    with pytest.raises(CacheError, match=rf"{re.escape(str(path))}: unreadable cache metadata: .*{constant}"):
        TemplateCache.load(path)


def test_saving_nan_metadata_is_refused(guarded, tmp_path):
    tp = guarded()
    cache = lora_cache(tp, 0)
    cache.scaling[TARGET] = float("nan")
    with pytest.raises(CacheError, match="a field holds NaN or infinity"):
        cache.save(tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


@pytest.mark.parametrize("dtype,name", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_float8_cache_files_are_a_cache_error(guarded, tmp_path, dtype, name):
    tp = guarded()
    cache = kv_cache(tp, 0.5, 2)
    with pytest.raises(CacheError, match="tensor 'keys/double_0' is torch.float8"):
        cache.model_copy(update={"keys": {"double_0": cache.keys["double_0"].to(dtype)}}).save(tmp_path / "x")
    path = tmp_path / "f8.safetensors"
    cache.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["keys/double_0"] = tensors["keys/double_0"].to(dtype)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(
        CacheError, match=rf"{re.escape(str(path))}: .*tensor 'keys/double_0': dtype '{name}'"
    ):
        KVCache.load(path)


def test_a_loaded_cache_with_huge_values_is_refused_at_the_call(guarded, tmp_path):
    tp = guarded()
    for seed, value in enumerate([3e38, -1e30, 7e4]):
        path = tmp_path / f"kv{seed}.safetensors"
        kv_cache(tp, value, seed).save(path)
        loaded = TemplateCache.load(path)  # finite: the file itself is well formed
        message = refused(tp, "flux2_klein", "DT_MAX_KV_MAGNITUDE", templates=[loaded])
        assert "'keys/double_0'" in message


# --------------------------------------------------------------------------- LoRA files (aesthetic)


def _aesthetic_file(tp: TemplatePipeline, path: Path, *, down=None, up=None, metadata=None) -> str:
    linear = tp.adapter.denoiser.get_submodule(TARGET)
    generator = torch.Generator().manual_seed(len(str(path)))
    tensors = {
        f"transformer.{TARGET}.lora_A.weight": down
        if down is not None
        else torch.randn(4, linear.in_features, generator=generator) * 0.1,
        f"transformer.{TARGET}.lora_B.weight": up
        if up is not None
        else torch.randn(linear.out_features, 4, generator=generator) * 0.1,
    }
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def test_lora_files_with_bad_values_are_refused(guarded, tmp_path):
    tp = guarded()
    linear = tp.adapter.denoiser.get_submodule(TARGET)
    for seed, value in enumerate(BAD_VALUES):
        path = _aesthetic_file(
            tp, tmp_path / f"bad{seed}.safetensors", up=poisoned((linear.out_features, 4), value, seed)
        )
        pattern = NONFINITE if not math.isfinite(value) else "DT_MAX_LORA_MAGNITUDE"
        message = refused(
            tp, "flux2_klein", pattern, TemplateError, templates=[{"template": "aesthetic", "loras": [path]}]
        )
        assert "template 'aesthetic'" in message and path in message


@pytest.mark.parametrize("alpha", ["NaN", "Infinity"])
def test_lora_file_metadata_with_nan_is_refused(guarded, tmp_path, alpha):
    tp = guarded()
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": f'{{"transformer.r": 4, "transformer.lora_alpha": {alpha}}}',
    }
    path = _aesthetic_file(tp, tmp_path / "meta.safetensors", metadata=metadata)
    message = refused(tp, "flux2_klein", f"{alpha} is not a JSON number", TemplateError,
                      templates=[{"template": "aesthetic", "loras": [path]}])  # fmt: skip
    assert path in message


@pytest.mark.parametrize("which", ["down", "up", "both"])
def test_one_dimensional_lora_factors_are_a_shape_error(guarded, tmp_path, which):
    tp = guarded()
    linear = tp.adapter.denoiser.get_submodule(TARGET)
    factors = {}
    if which in ("down", "both"):
        factors["down"] = torch.randn(linear.in_features)
    if which in ("up", "both"):
        factors["up"] = torch.randn(linear.out_features)
    path = _aesthetic_file(tp, tmp_path / f"flat-{which}.safetensors", **factors)
    message = refused(
        tp, "flux2_klein", "shape", TemplateError, templates=[{"template": "aesthetic", "loras": [path]}]
    )
    assert "is a Linear;" not in message and "2-D" in message and repr(TARGET) in message
    with pytest.raises(CacheError, match=r"LoRA factors must be 2-D"):
        LoraCache.from_state_dict(
            {
                f"transformer.{TARGET}.lora_A.weight": torch.randn(8),
                f"transformer.{TARGET}.lora_B.weight": torch.randn(8, 1),
            }
        )


def test_nan_alpha_in_a_state_dict_is_refused():
    state = {
        f"transformer.{TARGET}.lora_A.weight": torch.randn(2, 8),
        f"transformer.{TARGET}.lora_B.weight": torch.randn(8, 2),
        f"transformer.{TARGET}.alpha": torch.tensor(float("nan")),
    }
    with pytest.raises(CacheError, match=f"alpha of module '{TARGET}' is nan"):
        LoraCache.from_state_dict(state)


# --------------------------------------------------------------------------- late or wrong errors


@pytest.mark.parametrize(
    "template,fields",
    [
        ("brightness", {"scale": 0.5}),
        ("color", {"r": 0.5, "g": 0.5, "b": 0.5}),
        ("sharpness", {"scale": 0.5}),
    ],
)
@pytest.mark.parametrize("window", [{"start": 1.0}, {"start": 0.7, "end": 0.3}, {"start": 0.5, "end": 0.5}])
def test_start_and_end_are_validated_together(guarded, template, fields, window):
    tp = guarded()
    with pytest.raises(TemplateInputError) as info:
        run(tp, "flux2_klein", templates=[{"template": template, **fields, **window}])
    message = str(info.value)
    assert info.value.template == template and "field 'end'" in message
    assert f"start ({window['start']})" in message and f"end ({window.get('end', 1.0)})" in message


def test_young_and_old_age_are_validated_together():
    from dt_template_age.inputs import AgeInputs

    from diffusion_templates.errors import validate_inputs

    for fields in ({"age": 0.5, "young_age": 1.0}, {"age": 0.5, "young_age": 0.6, "old_age": 0.4}):
        with pytest.raises(
            TemplateInputError, match=r"field 'old_age': old_age \(.*\) must be larger than young_age"
        ):
            validate_inputs("age", AgeInputs, fields)


@pytest.mark.parametrize("argument", ["templates", "negative_templates"])
def test_a_single_spec_is_one_template_not_its_letters(guarded, argument):
    tp = guarded()
    # a name alone: one template (here missing its required field), never 'b', 'r', 'i', ...
    with pytest.raises(TemplateInputError) as info:
        run(tp, "flux2_klein", **{argument: "brightness"})
    assert info.value.template == "brightness" and "field 'scale'" in str(info.value)
    with pytest.raises(UnknownTemplateError, match="no-such-template"):
        run(tp, "flux2_klein", **{argument: "no-such-template"})
    for bad in (5, b"brightness", 2.5):
        with pytest.raises(TemplateInputError, match=rf"field '{argument}': expected a template spec"):
            run(tp, "flux2_klein", **{argument: bad})


@pytest.mark.parametrize("argument", ["templates", "negative_templates"])
def test_a_single_name_mapping_or_cache_equals_the_list_of_one(tiny_pipes, argument):
    open_tp = TemplatePipeline(tiny_pipes("flux2_klein"), store=None)
    for seed in (0, 1):
        spec = {"template": "test-kv", "seed": seed}
        cache = open_tp.encode(spec)[0]
        expected = run(open_tp, "flux2_klein", seed=seed, **{argument: [spec]})
        for single in (spec, cache):
            assert torch.equal(run(open_tp, "flux2_klein", seed=seed, **{argument: single}), expected)
        assert torch.equal(
            run(open_tp, "flux2_klein", seed=seed, **{argument: "test-kv"}),
            run(open_tp, "flux2_klein", seed=seed, **{argument: ["test-kv"]}),
        )


def test_a_third_party_cache_class_is_checked_for_finite_values():
    class Custom(TemplateCache):  # a carrier plugin's own cache class, with no bounds of its own
        carrier = "test-custom-values"
        x: torch.Tensor
        steps: torch.Tensor | None = None

    Custom(x=torch.ones(3), steps=torch.arange(3)).check_values()  # integer tensors are not measured
    for seed, value in enumerate([float("nan"), float("inf"), -float("inf")]):
        with pytest.raises(
            CacheError, match=r"test-custom-values cache from template 'c': tensor 'x' holds NaN"
        ):
            Custom(x=poisoned((2, 5), value, seed), template="c").check_values()
    Custom(x=torch.full((2,), 1e30)).check_values()  # no magnitude bound without the class saying so
