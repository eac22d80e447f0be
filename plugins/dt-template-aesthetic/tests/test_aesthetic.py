"""The aesthetic template equals diffusers' own LoRA loading, and reads every format to the same cache.

Reference: a fresh build of the same seeded tiny pipeline with ``load_lora_weights(file)`` per LoRA and
``set_adapters(names, adapter_weights=weights)`` (diffusers + PEFT). A LoRA loaded into diffusers acts on
both classifier-free-guidance branches; templates act on the conditional branch, so the comparison passes
the spec as a negative template too.
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_templates import LoraCache, TemplateError, TemplateInputError, TemplatePipeline
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs
from dt_sdk.conformance import MISSING, TemplateConformance, caches_equal, single_thread

TEMPLATE = "aesthetic"
PROMPT = "a red circle"
FAMILY = {"flux": "flux", "flux2": "flux2_klein", "sd3": "sd3", "qwen_image": "qwen_image", "sdxl": "sdxl"}
PREFIX = {"sdxl": "unet"}

# Modules of each tiny denoiser, and their kohya (sd-scripts) names where diffusers converts kohya files.
KOHYA = {
    "flux": {  # BFL layout: _convert_kohya_flux_lora_to_diffusers
        "transformer_blocks.0.attn.to_out.0": "lora_unet_double_blocks_0_img_attn_proj",
        "transformer_blocks.1.attn.to_add_out": "lora_unet_double_blocks_1_txt_attn_proj",
        "transformer_blocks.0.ff.net.0.proj": "lora_unet_double_blocks_0_img_mlp_0",
        "single_transformer_blocks.1.proj_out": "lora_unet_single_blocks_1_linear2",
    },
    "flux2": {  # BFL layout: _convert_kohya_flux2_lora_to_diffusers
        "transformer_blocks.0.attn.to_out.0": "lora_unet_double_blocks_0_img_attn_proj",
        "transformer_blocks.1.ff.linear_in": "lora_unet_double_blocks_1_img_mlp_0",
        "single_transformer_blocks.0.attn.to_out": "lora_unet_single_blocks_0_linear2",
    },
    "qwen_image": {  # _convert_non_diffusers_qwen_lora_to_diffusers
        "transformer_blocks.0.attn.to_q": "lora_unet_transformer_blocks_0_attn_to_q",
        "transformer_blocks.1.attn.add_k_proj": "lora_unet_transformer_blocks_1_attn_add_k_proj",
        "transformer_blocks.0.img_mlp.net.2": "lora_unet_transformer_blocks_0_img_mlp_net_2",
    },
    "sdxl": {  # diffusers-named kohya keys: _convert_non_diffusers_lora_to_diffusers
        m: "lora_unet_" + m.replace(".", "_")
        for m in (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0",
            "up_blocks.0.attentions.0.proj_in",
            "down_blocks.0.resnets.0.time_emb_proj",
        )
    },
    "sd3": {  # no diffusers converter: matched against the denoiser's own module names
        m: "lora_unet_" + m.replace(".", "_")
        for m in (
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.1.attn.add_v_proj",
            "transformer_blocks.0.ff.net.2",
        )
    },
}
BACKBONES = list(KOHYA)

_TMP = Path(tempfile.mkdtemp(prefix="dt-aesthetic-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@functools.cache
def tiny(backbone: str):
    """A tiny pipeline of ``backbone`` (built once; these tests read its module shapes or call it)."""
    with single_thread():
        return TINY_PIPELINES[FAMILY[backbone]].build()


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def factors(pipe, modules, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        linear = denoiser(pipe).get_submodule(module)
        down = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5
        up = torch.randn(linear.out_features, rank, generator=generator) * 0.5
        out[module] = (down, up)
    return out


def diffusers_file(path: Path, backbone: str, pairs, *, metadata: dict | None = None) -> str:
    prefix = PREFIX.get(backbone, "transformer")
    tensors = {}
    for module, (down, up) in pairs.items():
        tensors[f"{prefix}.{module}.lora_A.weight"] = down
        tensors[f"{prefix}.{module}.lora_B.weight"] = up
    extra = None
    if metadata:
        extra = {
            "format": "pt",
            "lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in metadata.items()}),
        }
    save_file(tensors, str(path), metadata=extra)
    return str(path)


def kohya_file(path: Path, backbone: str, pairs, alpha: float | None = None) -> str:
    tensors = {}
    for module, (down, up) in pairs.items():
        name = KOHYA[backbone][module]
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    save_file(tensors, str(path))
    return str(path)


def peft_folder(path: Path, pairs, lora_alpha: float, rank: int) -> str:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (down, up) in pairs.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = down
        tensors[f"base_model.model.{module}.lora_B.weight"] = up
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": lora_alpha, "target_modules": sorted(pairs)}
        )
    )
    return str(path)


def encode(backbone: str, spec: dict) -> LoraCache:
    (cache,) = TemplatePipeline(tiny(backbone), store=None).encode({"template": TEMPLATE, **spec})
    return cache


def dense(cache: LoraCache) -> dict[str, torch.Tensor]:
    return {module: cache.delta(module) for module in cache.down}


def assert_same_deltas(a: LoraCache, b: LoraCache, tol: float = 1e-6) -> None:
    da, db = dense(a), dense(b)
    assert set(da) == set(db)
    for module in da:
        assert (da[module] - db[module]).abs().max() <= tol * (1 + da[module].abs().max()), module


def call_kwargs(backbone: str) -> dict:
    return {"prompt": PROMPT, **tiny_call_kwargs(FAMILY[backbone], cfg=True, output_type="latent")}


# --------------------------------------------------------------------------- equality with diffusers

TWO = {  # two LoRAs per backbone: different modules (one shared, so both merge rules run) and ranks
    "flux": (
        ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_out"],
        ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2"],
    ),
    "sdxl": (
        ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.0.attentions.0.proj_in"],
        [
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.resnets.0.time_emb_proj",
        ],
    ),
}


@pytest.mark.parametrize("backbone", ["flux", "sdxl"])
def test_two_loras_equal_load_lora_weights_and_set_adapters(backbone, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    pipe = TINY_PIPELINES[FAMILY[backbone]].build()
    modules_a, modules_b = TWO[backbone]
    # The first file carries diffusers' LoRA metadata (lora_alpha 8 at rank 4: scaling 2).
    meta = {"r": 4, "lora_alpha": 8, "target_modules": modules_a}
    first = diffusers_file(
        tmp_path / "a.safetensors", backbone, factors(pipe, modules_a, 4, seed=1), metadata=meta
    )
    second = diffusers_file(tmp_path / "b.safetensors", backbone, factors(pipe, modules_b, 2, seed=2))
    weights = (0.7, -1.3)
    spec = {
        "template": TEMPLATE,
        "loras": [{"path": first, "weight": weights[0]}, {"path": second, "weight": weights[1]}],
    }
    with single_thread():
        plain = pipe(**call_kwargs(backbone)).images  # also the warm-up: diffusers adds its hook registry
        before = pipeline_state(pipe)
        ours = TemplatePipeline(pipe)(
            templates=[spec], negative_templates=[spec], **call_kwargs(backbone)
        ).images
    assert_pipeline_unchanged(before, pipe)
    reference_pipe = TINY_PIPELINES[FAMILY[backbone]].build()
    reference_pipe.load_lora_weights(first, adapter_name="a")
    reference_pipe.load_lora_weights(second, adapter_name="b")
    reference_pipe.set_adapters(["a", "b"], adapter_weights=list(weights))
    with single_thread():
        reference = reference_pipe(**call_kwargs(backbone)).images
    diff = (ours - reference).abs().max().item()
    print(f"\n{backbone}: max |template - load_lora_weights + set_adapters| = {diff:.3g}")
    assert diff < 1e-4
    assert (ours - plain).abs().max() > 1e-2


def test_mean_equals_sum_with_weights_over_n(tmp_path):
    pipe = tiny("flux")
    modules_a, modules_b = TWO["flux"]
    files = [
        diffusers_file(tmp_path / "a.safetensors", "flux", factors(pipe, modules_a, 4, seed=1)),
        diffusers_file(tmp_path / "b.safetensors", "flux", factors(pipe, modules_b, 2, seed=2)),
    ]
    weights = (0.9, 0.3)

    def bank(scale: float) -> list[dict]:
        return [{"path": f, "weight": w * scale} for f, w in zip(files, weights, strict=True)]

    mean = encode("flux", {"merge": "mean", "loras": bank(1.0)})
    summed = encode("flux", {"loras": bank(1 / 2)})
    assert caches_equal(mean, summed)
    full = encode("flux", {"loras": bank(1.0)})
    for module, delta in dense(full).items():
        assert torch.allclose(dense(mean)[module] * 2, delta, atol=1e-6)


def test_merge_is_exact_on_shared_modules(tmp_path):
    pipe = tiny("flux")
    modules_a, modules_b = TWO["flux"]
    a, b = factors(pipe, modules_a, 4, seed=1), factors(pipe, modules_b, 2, seed=2)
    files = [
        diffusers_file(tmp_path / "a.safetensors", "flux", a),
        diffusers_file(tmp_path / "b.safetensors", "flux", b),
    ]
    merged = encode("flux", {"loras": [{"path": files[0], "weight": 0.5}, {"path": files[1], "weight": 2.0}]})
    for module in set(a) | set(b):
        expected = sum(
            w * up @ down
            for w, pairs in ((0.5, a), (2.0, b))
            if module in pairs
            for down, up in [pairs[module]]
        )
        assert (merged.delta(module) - expected).abs().max() < 1e-6
    shared = modules_a[0]
    assert merged.down[shared].shape[0] == 6  # ranks 4 + 2 concatenated


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("backbone", BACKBONES)
def test_kohya_and_peft_load_to_the_same_cache_as_diffusers(backbone, tmp_path):
    pipe = tiny(backbone)
    pairs = factors(pipe, list(KOHYA[backbone]), rank=4, seed=3)
    reference = encode(backbone, {"loras": diffusers_file(tmp_path / "d.safetensors", backbone, pairs)})
    kohya = encode(backbone, {"loras": kohya_file(tmp_path / "k.safetensors", backbone, pairs)})
    assert caches_equal(kohya, reference)  # alpha == rank: bit for bit
    peft = encode(backbone, {"loras": peft_folder(tmp_path / "peft", pairs, lora_alpha=4, rank=4)})
    assert caches_equal(peft, reference)
    # alpha != rank: kohya alpha 2 and PEFT lora_alpha 2 at rank 4 mean half the delta
    half = {m: (down, up * 0.5) for m, (down, up) in pairs.items()}
    halved = encode(backbone, {"loras": diffusers_file(tmp_path / "h.safetensors", backbone, half)})
    assert_same_deltas(
        encode(backbone, {"loras": kohya_file(tmp_path / "k2.safetensors", backbone, pairs, 2)}), halved
    )
    assert_same_deltas(
        encode(backbone, {"loras": peft_folder(tmp_path / "p2", pairs, lora_alpha=2, rank=4)}), halved
    )
    spec_alpha = encode(
        backbone,
        {"loras": [{"path": diffusers_file(tmp_path / "d2.safetensors", backbone, pairs), "alpha": 2.0}]},
    )
    assert_same_deltas(spec_alpha, halved)


def test_kohya_fused_qkv_splits_like_diffusers(tmp_path):
    """FLUX.1 kohya ``img_attn_qkv`` is one LoRA on the fused projection: diffusers splits B over to_q/k/v."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    pipe = tiny("flux")
    inner = pipe.transformer.inner_dim
    generator = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, inner, generator=generator), torch.randn(3 * inner, 4, generator=generator)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(8.0),
    }
    save_file(tensors, str(tmp_path / "qkv.safetensors"))
    cache = encode("flux", {"loras": str(tmp_path / "qkv.safetensors")})
    expected = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        module = f"transformer_blocks.0.attn.{name}"
        reference = (
            expected[f"transformer.{module}.lora_B.weight"] @ expected[f"transformer.{module}.lora_A.weight"]
        )
        assert (cache.delta(module) - reference).abs().max() < 1e-5
        assert (cache.delta(module) - 2.0 * up[i * inner : (i + 1) * inner] @ down).abs().max() < 1e-5


def test_text_encoder_and_conv_layers_are_refused_or_skipped(tmp_path):
    pipe = tiny("sdxl")
    pairs = factors(pipe, list(KOHYA["sdxl"])[:2], rank=4, seed=5)
    clean = kohya_file(tmp_path / "clean.safetensors", "sdxl", pairs)
    tensors = load_file(clean)
    text = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    tensors[f"{text}.lora_down.weight"] = torch.randn(4, 32)
    tensors[f"{text}.lora_up.weight"] = torch.randn(32, 4)
    save_file(tensors, str(tmp_path / "with_text.safetensors"))
    with pytest.raises(TemplateError, match=r"aesthetic.*with_text.*text-encoder layers.*skip_unsupported"):
        encode("sdxl", {"loras": str(tmp_path / "with_text.safetensors")})
    skipped = encode("sdxl", {"loras": str(tmp_path / "with_text.safetensors"), "skip_unsupported": True})
    assert caches_equal(skipped, encode("sdxl", {"loras": clean}))
    conv = {
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.randn(4, 16, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.randn(16, 4, 1, 1),
    }
    save_file({**load_file(clean), **conv}, str(tmp_path / "with_conv.safetensors"))
    with pytest.raises(TemplateError, match=r"Conv2d.*Linear layers only"):
        encode("sdxl", {"loras": str(tmp_path / "with_conv.safetensors")})
    skipped = encode("sdxl", {"loras": str(tmp_path / "with_conv.safetensors"), "skip_unsupported": True})
    assert caches_equal(skipped, encode("sdxl", {"loras": clean}))


def test_bad_inputs_and_files_name_template_field_and_file(tmp_path):
    pipe = tiny("flux")
    good = diffusers_file(tmp_path / "good.safetensors", "flux", factors(pipe, TWO["flux"][0], 4, seed=1))
    (tmp_path / "weights.bin").write_bytes(b"not read")
    cases = [
        ({"loras": []}, "loras", "at least 1"),
        ({"loras": [good] * 17}, "loras", "at most 16"),
        ({"loras": [{"path": str(tmp_path / "weights.bin")}]}, "loras.0.path", "safetensors only"),
        ({"loras": [{"path": str(tmp_path / "missing.safetensors")}]}, "loras.0.path", "no LoRA file"),
        ({"loras": [{"path": good, "weight": 5}]}, "loras.0.weight", "less than or equal to 4"),
        ({"loras": [{"path": good, "alpha": 0}]}, "loras.0.alpha", "greater than 0"),
        ({"loras": [{"path": good, "scale": 1}]}, "loras.0.scale", "Extra inputs"),
        ({"loras": [good], "merge": "max"}, "merge", "'sum' or 'mean'"),
        ({"loras": [good], "strength": 1.0}, "strength", "Extra inputs"),
    ]
    tp = TemplatePipeline(pipe, store=None)
    for override, field, message in cases:
        with pytest.raises(TemplateInputError) as info:
            tp.encode({"template": TEMPLATE, **override})
        assert info.value.template == TEMPLATE
        assert field in {loc for loc, _, _ in info.value.errors}, (override, str(info.value))
        assert re.search(message, str(info.value)), str(info.value)
    # files that validate but cannot be applied: the error names the template and the file
    sdxl_lora = diffusers_file(
        tmp_path / "sdxl.safetensors", "sdxl", factors(tiny("sdxl"), TWO["sdxl"][0], 4, seed=1)
    )
    save_file({"x.lokr_w1": torch.zeros(2, 2)}, str(tmp_path / "lokr.safetensors"))
    save_file(
        {"transformer.x.lora_A.weight": torch.zeros(2, 2), "transformer.x.dora_scale": torch.zeros(2)},
        str(tmp_path / "dora.safetensors"),
    )
    other = diffusers_file(
        tmp_path / "other.safetensors",
        "flux",
        {"transformer_blocks.0.attn.nope": (torch.zeros(4, 32), torch.zeros(32, 4))},
    )
    for path, message in [
        (sdxl_lora, "another model"),
        (str(tmp_path / "lokr.safetensors"), "LyCORIS"),
        (str(tmp_path / "dora.safetensors"), "DoRA"),
        (other, "does not have"),
    ]:
        with pytest.raises(TemplateError, match=message) as info:
            tp.encode({"template": TEMPLATE, "loras": path})
        assert "aesthetic" in str(info.value) and Path(path).name in str(info.value)


def test_edited_file_is_read_again(tmp_path):
    """Computed caches are keyed by the file's content, not only its name."""
    import os

    pipe = tiny("flux")
    path = tmp_path / "lora.safetensors"
    diffusers_file(path, "flux", factors(pipe, TWO["flux"][0], 4, seed=1))
    tp = TemplatePipeline(pipe)
    (first,) = tp.encode({"template": TEMPLATE, "loras": str(path)})
    diffusers_file(path, "flux", factors(pipe, TWO["flux"][0], 4, seed=2))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    (second,) = tp.encode({"template": TEMPLATE, "loras": str(path)})
    assert not caches_equal(first, second)


# --------------------------------------------------------------------------- the conformance kit


@functools.cache
def conformance_lora(backbone: str) -> str:
    """A LoRA on the first attention layer of the kit's tiny pipeline of ``backbone``."""
    pipe = tiny(backbone)
    modules = list(KOHYA[backbone])[:2]
    return diffusers_file(_TMP / f"{backbone}.safetensors", backbone, factors(pipe, modules, 4, seed=7))


class _AestheticConformance(TemplateConformance):
    """One kit run per backbone: a LoRA file fits one backbone only."""

    template = TEMPLATE
    backbone = ""

    @property
    def valid_inputs(self):
        path = conformance_lora(self.backbone)
        return [
            {"loras": [{"path": path, "weight": 1.0}]},
            {"loras": [path, {"path": path, "weight": -0.5, "alpha": 2.0}], "merge": "mean"},
        ]

    invalid_inputs = [
        {"loras": []},
        ({"loras": MISSING}, "loras"),
        {"loras": [{"path": "missing.safetensors"}]},
        {"loras": [{"weight": 1.0}]},
        {"merge": "median"},
        {"skip_unsupported": "perhaps"},
    ]


class TestAestheticFlux(_AestheticConformance):
    backbone = "flux"
    backbones = ["flux"]


class TestAestheticFlux2(_AestheticConformance):
    backbone = "flux2"
    backbones = ["flux2"]


class TestAestheticSD3(_AestheticConformance):
    backbone = "sd3"
    backbones = ["sd3"]


class TestAestheticQwenImage(_AestheticConformance):
    backbone = "qwen_image"
    backbones = ["qwen_image"]


class TestAestheticSDXL(_AestheticConformance):
    backbone = "sdxl"
    backbones = ["sdxl"]
