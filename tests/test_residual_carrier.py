"""The residual carrier equals diffusers' own ControlNet pipelines, and leaves the pipeline as it was.

Reference: ``XControlNetPipeline(**pipe.components, controlnet=cn)`` with the same tiny ControlNet
(random weights), control image, prompt and seed. The residual cache reaches the carrier through a
test-only template (``test-controlnet``) that prepares the control image with the adapter's
``prepare_control_image``, exactly as the native pipeline does before its loop. The native FLUX.1
and Qwen-Image pipelines VAE-sample the control image with the call's generator before drawing the
initial noise, and the template does the same with the same generator; the native SD3 pipeline
samples with the global RNG, so both runs seed it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from diffusion_templates import CacheError, Template, TemplateInputs, TemplatePipeline, UnsupportedError
from diffusion_templates.carriers.residual import ResidualCache, ResidualEntry
from diffusion_templates.plugins import default_host
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import tiny_call_kwargs
from diffusion_templates.testing.tiny_controlnets import (
    TINY_CONTROLNETS,
    build_flux_controlnet,
    build_sd3_controlnet,
    native_controlnet_pipeline,
)
from helpers import count_denoiser_calls

PROMPT = "a red circle"
FAMILIES = ["flux", "sd3", "qwen_image", "sdxl"]
# Call arguments where the native ControlNet pipeline's default differs from the base pipeline's.
NATIVE_DEFAULTS = {"flux": {"guidance_scale": 3.5}}


def control_image(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8))


class ControlNetInputs(TemplateInputs):
    controlnet: object
    image: object
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    size: int = 64
    generator: object = None
    cfg: bool = False  # SD3: VAE-sample the control once per CFG half, as diffusers does
    guess_mode: bool = False


class TestControlNet(Template):
    """Prepares a control image for the pipeline's backbone; emits one ControlNet residual cache."""

    Inputs = ControlNetInputs
    carriers = ("residual",)

    def encode(self, inputs: ControlNetInputs, context) -> ResidualCache:
        control = context.adapter.prepare_control_image(
            inputs.image,
            controlnet=inputs.controlnet,
            height=inputs.size,
            width=inputs.size,
            generator=inputs.generator,
            do_classifier_free_guidance=inputs.cfg,
            guess_mode=inputs.guess_mode,
        )
        return ResidualCache.from_controlnet(
            inputs.controlnet,
            control,
            conditioning_scale=inputs.scale,
            start=inputs.start,
            end=inputs.end,
            guess_mode=inputs.guess_mode,
        )


@pytest.fixture(autouse=True)
def _template(_fresh_plugin_host):
    default_host().register("template", "test-controlnet", TestControlNet)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (thread start-up dominates on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def controlnets():
    cache = {}

    def get(family: str, seed: int = 1, **config):
        key = (family, seed, tuple(sorted(config.items())))
        if key not in cache:
            cache[key] = TINY_CONTROLNETS[family].build(seed=seed, **config)
        return cache[key]

    return get


def call_kwargs(family: str, cfg: bool = True) -> dict:
    return {"prompt": PROMPT, **tiny_call_kwargs(family, cfg=cfg, output_type="latent")}


def spec(family: str, controlnet, kwargs: dict, cfg: bool = True, **inputs) -> dict:
    """A test-controlnet spec for the call ``kwargs`` (the VAE sample consumes the same RNG as native)."""
    generator = None if family == "sd3" else kwargs["generator"]
    return {
        "template": "test-controlnet", "controlnet": controlnet, "image": control_image(),
        "generator": generator, "cfg": cfg and family == "sd3", **inputs,
    }  # fmt: skip


def native(pipe, family: str, controlnet, cfg: bool = True, images=None, **kwargs):
    """diffusers' ControlNet pipeline of ``family`` on ``pipe``'s components."""
    reference = native_controlnet_pipeline(pipe, controlnet, family)
    key = "image" if family == "sdxl" else "control_image"
    call = {**call_kwargs(family, cfg), **NATIVE_DEFAULTS.get(family, {}), **kwargs}
    call[key] = images if images is not None else control_image()
    torch.manual_seed(0)
    return reference(**call).images


def ours(pipe, family: str, specs, cfg: bool = True, **kwargs):
    call = {**call_kwargs(family, cfg), **kwargs}
    specs = [spec(family, **s, kwargs=call, cfg=cfg) if "controlnet" in s else s for s in specs]
    torch.manual_seed(0)
    return TemplatePipeline(pipe)(templates=specs, **call).images


# --------------------------------------------------------------------------- equality with diffusers


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_native_controlnet_pipeline_with_cfg(family, tiny_pipes, controlnets):
    pipe, controlnet = tiny_pipes(family), controlnets(family)
    reference = native(pipe, family, controlnet, controlnet_conditioning_scale=0.8)
    without = native(pipe, family, controlnet, controlnet_conditioning_scale=0.0)
    before = pipeline_state(pipe)
    result = ours(pipe, family, [{"controlnet": controlnet, "scale": 0.8}], **NATIVE_DEFAULTS.get(family, {}))
    assert_pipeline_unchanged(before, pipe)
    assert (result - reference).abs().max() < 1e-4
    assert (result - without).abs().max() > 1e-2  # the residuals matter


def test_equals_native_without_cfg(tiny_pipes, controlnets):
    pipe, controlnet = tiny_pipes("sd3"), controlnets("sd3")
    reference = native(pipe, "sd3", controlnet, cfg=False)
    assert (ours(pipe, "sd3", [{"controlnet": controlnet}], cfg=False) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("start,end", [(0.5, 1.0), (0.0, 0.5)])
def test_step_window_equals_control_guidance_start_end(start, end, tiny_pipes, controlnets):
    pipe, controlnet = tiny_pipes("qwen_image"), controlnets("qwen_image")
    reference = native(pipe, "qwen_image", controlnet, control_guidance_start=start, control_guidance_end=end)
    result = ours(pipe, "qwen_image", [{"controlnet": controlnet, "start": start, "end": end}])
    assert (result - reference).abs().max() < 1e-4
    full = native(pipe, "qwen_image", controlnet)
    assert (result - full).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_merge_equals_multi_controlnet(family, tiny_pipes, controlnets):
    pipe = tiny_pipes(family)
    first, second = controlnets(family, seed=1), controlnets(family, seed=2)
    images = [control_image(0), control_image(1)]
    reference = native(
        pipe, family, [first, second], images=images,
        controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.5],
        control_guidance_end=[1.0, 1.0],
    )  # fmt: skip
    result = ours(
        pipe, family,
        [{"controlnet": first, "scale": 0.7, "image": images[0]},
         {"controlnet": second, "scale": 1.3, "start": 0.5, "image": images[1]}],
        **NATIVE_DEFAULTS.get(family, {}),
    )  # fmt: skip
    assert (result - reference).abs().max() < 1e-4


def test_sdxl_guess_mode_equals_native(tiny_pipes, controlnets):
    pipe, controlnet = tiny_pipes("sdxl"), controlnets("sdxl")
    reference = native(pipe, "sdxl", controlnet, guess_mode=True)
    result = ours(pipe, "sdxl", [{"controlnet": controlnet, "guess_mode": True}])
    assert (result - reference).abs().max() < 1e-4


def _prepared(pipe, family, controlnet, call, cfg=False):
    adapter = TemplatePipeline(pipe).adapter
    generator = None if family == "sd3" else call["generator"]
    return adapter.prepare_control_image(
        control_image(), controlnet=controlnet, height=64, width=64, generator=generator,
        do_classifier_free_guidance=cfg,
    )  # fmt: skip


def test_flux_union_controlnet_with_control_mode(tiny_pipes, controlnets):
    pipe, controlnet = tiny_pipes("flux"), controlnets("flux", num_mode=3, guidance_embeds=False)
    reference = native(pipe, "flux", controlnet, control_mode=2)
    call = {**call_kwargs("flux"), **NATIVE_DEFAULTS["flux"]}
    control = _prepared(pipe, "flux", controlnet, call)
    cache = ResidualCache.from_controlnet(controlnet, control, control_mode=2)
    assert (TemplatePipeline(pipe)(templates=[cache], **call).images - reference).abs().max() < 1e-4


def test_sd35_style_controlnet_sharing_the_patch_embedding(tiny_pipes):
    """SD3.5 large ControlNets have no pos_embed (the native pipeline copies the transformer's into
    the ControlNet); the carrier feeds them the transformer's patch embedding, leaving them as they are."""
    pipe = tiny_pipes("sd3")
    config = {"use_pos_embed": False, "joint_attention_dim": None}
    reference = native(pipe, "sd3", build_sd3_controlnet(seed=1, **config))
    controlnet = build_sd3_controlnet(seed=1, **config)
    call = call_kwargs("sd3")
    torch.manual_seed(0)
    cache = ResidualCache.from_controlnet(controlnet, _prepared(pipe, "sd3", controlnet, call, cfg=True))
    assert (TemplatePipeline(pipe)(templates=[cache], **call).images - reference).abs().max() < 1e-4
    assert controlnet.pos_embed is None


# --------------------------------------------------------------------------- static residuals


def _with_kwargs_reference(pipe, family, per_call):
    """A reference sharing no carrier code: a torch pre-hook passing ``per_call(i)`` kwargs on call i."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        return args, {**kwargs, **per_call(len(calls) - 1)}

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return pipe(**call_kwargs(family, cfg=False)).images
    finally:
        handle.remove()


def test_static_residuals_with_window_and_mismatched_counts(tiny_pipes):
    pipe = tiny_pipes("flux")
    generator = torch.Generator().manual_seed(3)
    dim, tokens = pipe.transformer.inner_dim, 16

    def noise():
        return torch.randn(1, tokens, dim, generator=generator)

    da, sa, db = [noise()], [noise(), noise()], [noise(), noise()]
    a = ResidualCache.from_residuals({"double": da, "single": sa}, conditioning_scale=0.5)
    b = ResidualCache.from_residuals({"double": db}, conditioning_scale=2.0, start=0.5)
    before = pipeline_state(pipe)
    result = ours(pipe, "flux", [a, b], cfg=False)
    assert_pipeline_unchanged(before, pipe)

    def per_call(step):  # 2 steps, no CFG: one transformer call per step; b only in the second half
        double = [0.5 * da[0]] * 2 if step == 0 else [0.5 * da[0] + 2 * db[0], 0.5 * da[0] + 2 * db[1]]
        return {"controlnet_block_samples": double, "controlnet_single_block_samples": [0.5 * s for s in sa]}

    reference = _with_kwargs_reference(pipe, "flux", per_call)
    assert (result - reference).abs().max() < 1e-4


def test_static_cache_round_trip(tmp_path):
    from diffusion_templates import TemplateCache

    cache = ResidualCache.from_residuals(
        {"double": [torch.randn(1, 16, 32), torch.randn(1, 16, 32)], "single": [torch.randn(1, 16, 32)]},
        conditioning_scale=0.5, start=0.25, template="t",
    )  # fmt: skip
    cache.save(tmp_path / "static.safetensors")
    loaded = TemplateCache.load(tmp_path / "static.safetensors")
    assert isinstance(loaded, ResidualCache) and loaded.entries == cache.entries
    assert loaded.residuals.keys() == cache.residuals.keys()
    assert all(torch.equal(loaded.residuals[k], v) for k, v in cache.residuals.items())


def test_cache_round_trip_with_a_controlnet_folder(tmp_path, tiny_pipes, controlnets):
    pipe, controlnet = tiny_pipes("qwen_image"), controlnets("qwen_image")
    call = call_kwargs("qwen_image", cfg=False)
    control = TemplatePipeline(pipe).adapter.prepare_control_image(
        control_image(), controlnet=controlnet, height=64, width=64, generator=call["generator"]
    )
    in_memory = ResidualCache.from_controlnet(controlnet, control, conditioning_scale=0.6)
    with pytest.raises(CacheError, match="in-memory ControlNets"):
        in_memory.save(tmp_path / "cache.safetensors")
    controlnet.save_pretrained(tmp_path / "controlnet")
    on_disk = ResidualCache.from_controlnet(str(tmp_path / "controlnet"), control, conditioning_scale=0.6)
    on_disk.save(tmp_path / "cache.safetensors")
    loaded = ResidualCache.load(tmp_path / "cache.safetensors")
    assert loaded.entries[0].controlnet == str(tmp_path / "controlnet") and loaded.entries[0].module is None
    results = []
    for cache in (in_memory, loaded):
        call = call_kwargs("qwen_image", cfg=False)
        results.append(TemplatePipeline(pipe)(templates=[cache], **call).images)
    # from_pretrained rebuilds the model from its JSON config: float-rounding-level differences only
    assert (results[0] - results[1]).abs().max() < 1e-5


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture
def guarded(tiny_pipes):
    """(pipe, family) checks: the error comes before any denoiser call and nothing changed."""
    watched = []

    def watch(family):
        pipe = tiny_pipes(family)
        denoiser = pipe.unet if family == "sdxl" else pipe.transformer
        watched.append((pipe, pipeline_state(pipe), count_denoiser_calls(denoiser)))
        return pipe

    yield watch
    for pipe, before, (calls, handle) in watched:
        handle.remove()
        assert calls == [], "denoising started before the error"
        assert_pipeline_unchanged(before, pipe)


def _static(**groups):
    residuals = {group: [torch.zeros(shape) for shape in shapes] for group, shapes in groups.items()}
    return ResidualCache.from_residuals(residuals)


def _controlnet(controlnet, control, **entry):
    return lambda: ResidualCache.from_controlnet(controlnet(), control, **entry)


BAD_FLUX_CACHES = {
    "controlnet of another family": (
        _controlnet(build_sd3_controlnet, torch.zeros(1, 4, 8, 8)),
        r"entry 0: holds a SD3ControlNetModel; backbone 'flux' runs FluxControlNetModel",
    ),
    "controlnet with more blocks than the transformer": (
        _controlnet(lambda: build_flux_controlnet(num_layers=3), torch.zeros(1, 16, 16)),
        r"3 residuals for group 'double', but backbone 'flux' has only 2 blocks",
    ),
    "more static residuals than blocks": (
        lambda: _static(double=[(1, 16, 32)] * 3),
        r"3 residuals for group 'double'",
    ),
    "static residual of the wrong width": (
        lambda: _static(double=[(1, 16, 7)]),
        r"residual double/0 has shape \(1, 16, 7\).*\(batch, \?, 32\)",
    ),
    "unknown residual group": (
        lambda: _static(joint=[(1, 16, 32)]),
        r"groups \['joint'\] do not exist in backbone 'flux'",
    ),
    "guess_mode on FLUX": (
        _controlnet(build_flux_controlnet, torch.zeros(1, 16, 16), guess_mode=True),
        r"guess_mode does not apply to backbone 'flux'",
    ),
    "control conditioning of the wrong size": (
        _controlnet(build_flux_controlnet, torch.zeros(1, 4, 16)),
        r"control conditioning has shape \(1, 4, 16\); a 64x64 call needs \(batch, 16, 16\)",
    ),
}


@pytest.mark.parametrize("case", BAD_FLUX_CACHES)
def test_bad_caches_are_clear_errors_before_denoising(case, guarded):
    make, match = BAD_FLUX_CACHES[case]
    pipe = guarded("flux")
    with pytest.raises(CacheError, match=match):
        TemplatePipeline(pipe)(templates=[make()], **call_kwargs("flux"))


def test_control_image_of_the_wrong_size(guarded, controlnets):
    pipe = guarded("sdxl")
    controlnet = controlnets("sdxl")
    small = {"controlnet": controlnet, "size": 32}
    with pytest.raises(CacheError, match=r"\(1, 3, 32, 32\); a 64x64 call needs \(batch, 3, 64, 64\)"):
        ours(pipe, "sdxl", [small])


def test_sdxl_static_residuals_need_down_and_mid(guarded):
    pipe = guarded("sdxl")
    with pytest.raises(CacheError, match="needs residuals for group 'mid'"):
        TemplatePipeline(pipe)(templates=[_static(down=[(1, 16, 8, 8)] * 4)], **call_kwargs("sdxl"))


def test_residuals_as_negative_template_are_refused(guarded, controlnets):
    pipe = guarded("qwen_image")
    cache = _static(double=[(1, 16, 48)])
    with pytest.raises(UnsupportedError, match="pass it in `templates`"):
        TemplatePipeline(pipe)(negative_templates=[cache], **call_kwargs("qwen_image"))


def test_flux2_does_not_support_residuals(tiny_pipes):
    pipe = tiny_pipes("flux2_klein")
    with pytest.raises(UnsupportedError, match="carrier 'residual', which backbone 'flux2' does not support"):
        TemplatePipeline(pipe)(templates=[_static(double=[(1, 16, 32)])], **call_kwargs("flux2_klein"))


def test_malformed_caches_do_not_validate():
    with pytest.raises(ValidationError, match="must be smaller than end"):
        ResidualEntry(start=0.6, end=0.5)
    with pytest.raises(ValidationError, match=r"needs control\['0'\]"):
        ResidualCache(entries=[{"controlnet": "some/folder"}])
    with pytest.raises(ValidationError, match=r"indices \[1\] must be 0..0"):
        ResidualCache(entries=[{}], residuals={"0/double/1": torch.zeros(1, 4, 4)})
