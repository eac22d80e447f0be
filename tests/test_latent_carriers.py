"""init_latents and latent_mask equal diffusers' img2img and inpainting pipelines.

Every reference is built from the tiny pipeline's own components (``XImg2ImgPipeline(**components)``)
and called with the same seed, strength and arguments; the template call runs the text-to-image
pipeline. FLUX.2 has no img2img/inpaint pipeline without reference conditioning, so it is checked
by its limits (strength 1 is text-to-image, strength ~0 the VAE round trip, the kept region is the
source).
"""

from __future__ import annotations

import contextlib

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_templates import CacheError, CarrierConflictError, TemplatePipeline, UnsupportedError
from diffusion_templates.carriers.init_latents import InitLatentsCache
from diffusion_templates.carriers.latent_mask import LatentMaskCache, LatentMaskCarrier
from diffusion_templates.imaging import to_image_tensor, to_mask_tensor
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES, build_sd3, tiny_call_kwargs
from helpers import count_denoiser_calls

STEPS = 4
IMG2IMG = {
    "flux": "FluxImg2ImgPipeline",
    "sd3": "StableDiffusion3Img2ImgPipeline",
    "qwen_image": "QwenImageImg2ImgPipeline",
    "sdxl": "StableDiffusionXLImg2ImgPipeline",
}
INPAINT = {
    "flux": "FluxInpaintPipeline",
    "sd3_16": "StableDiffusion3InpaintPipeline",
    "qwen_image": "QwenImageInpaintPipeline",
    "sdxl": "StableDiffusionXLInpaintPipeline",
}


def build_sd3_16():
    """Tiny SD3 with 16 latent channels: StableDiffusion3InpaintPipeline blends only for those."""
    base = build_sd3()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=64,
            pooled_projection_dim=64,
            out_channels=16,
        )
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
    pipe = diffusers.StableDiffusion3Pipeline(**{**base.components, "transformer": transformer, "vae": vae})
    for module in (transformer, vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


_PIPES: dict[str, object] = {}


def tiny(family: str):
    """One warmed-up tiny pipeline per family for this module."""
    if family not in _PIPES:
        pipe = build_sd3_16() if family == "sd3_16" else TINY_PIPELINES[family].build()
        pipe(prompt="warm up", **call_kwargs(family))
        # diffusers' own lazy state: Qwen-Image's VAE adds its conv caches on its first encode.
        TemplatePipeline(pipe)(
            prompt="warm up", templates=[init_cache(picture(), 0.5)], **call_kwargs(family)
        )
        _PIPES[family] = pipe
    return _PIPES[family]


def call_kwargs(family: str, **extra):
    base = "sd3" if family == "sd3_16" else family
    kwargs = tiny_call_kwargs(base, cfg=True, steps=STEPS, output_type="latent")
    if base == "flux":
        kwargs["guidance_scale"] = 3.5  # FluxPipeline and its img2img/inpaint siblings differ in default
    kwargs.update(extra)
    return kwargs


def reference(pipe, name: str):
    ref = getattr(diffusers, name)(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    return ref


def picture(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def box_mask(size=(64, 64), box=(16, 48, 16, 48)) -> Image.Image:
    """White (generate) inside a 16-pixel-aligned box, black (keep) elsewhere."""
    mask = np.zeros(size, dtype=np.uint8)
    mask[box[0] : box[1], box[2] : box[3]] = 255
    return Image.fromarray(mask)


def init_cache(image, strength, template="init"):
    return InitLatentsCache(image=to_image_tensor(image), strength=strength, template=template)


def mask_cache(mask, image, template="mask"):
    return LatentMaskCache(mask=to_mask_tensor(mask), image=to_image_tensor(image), template=template)


def ours(family, caches, **extra):
    pipe = tiny(family)
    before = pipeline_state(pipe)
    out = TemplatePipeline(pipe)(
        prompt="a red circle", templates=caches, **call_kwargs(family, **extra)
    ).images
    assert_pipeline_unchanged(before, pipe)
    return out


# --------------------------------------------------------------------------- equal to diffusers


@pytest.mark.parametrize("family", list(IMG2IMG))
def test_init_latents_equals_img2img(family):
    image = picture()
    out = ours(family, [init_cache(image, 0.6)])
    ref = reference(tiny(family), IMG2IMG[family])(
        prompt="a red circle", image=image, strength=0.6, **call_kwargs(family)
    ).images
    assert (out - ref).abs().max() < 1e-4
    plain = tiny(family)(prompt="a red circle", **call_kwargs(family)).images
    assert (out - plain).abs().max() > 1e-2


@pytest.mark.parametrize("family", list(INPAINT))
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_latent_mask_equals_inpaint(family, strength):
    """latent_mask alone is inpainting at strength 1; with init_latents, at that strength."""
    image, mask = picture(), box_mask()
    caches = [mask_cache(mask, image)]
    if strength < 1:
        caches.append(init_cache(image, strength))
    out = ours(family, caches)
    ref = reference(tiny(family), INPAINT[family])(
        prompt="a red circle", image=image, mask_image=mask, strength=strength, **call_kwargs(family)
    ).images
    assert (out - ref).abs().max() < 1e-4


REAL_SCHEDULERS = {  # the released models' scheduler configs: dynamic shifting, terminal stretch, shift 3
    "flux": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0),
    "qwen_image": dict(
        use_dynamic_shifting=True,
        base_shift=0.5986,
        max_shift=0.8,
        max_image_seq_len=8192,
        shift_terminal=0.02,
    ),
    "sd3": dict(shift=3.0),
}


@pytest.mark.parametrize("family", list(REAL_SCHEDULERS))
def test_init_latents_equals_img2img_with_the_real_schedules(family):
    pipe = tiny(family)
    original = pipe.scheduler
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(REAL_SCHEDULERS[family])
    try:
        image = picture()
        out = ours(family, [init_cache(image, 0.7)])
        ref = reference(pipe, IMG2IMG[family])(
            prompt="a red circle", image=image, strength=0.7, **call_kwargs(family)
        ).images
    finally:
        pipe.scheduler = original
    # SD3's img2img pipeline shifts its default sigmas in float64, the sigmas passed here are float32.
    assert (out - ref).abs().max() < 1e-4


def test_precomputed_latents_equal_img2img_given_latents():
    """An init_latents cache may hold latents (no VAE draw); FluxImg2ImgPipeline takes them as image."""
    pipe = tiny("flux")
    adapter = TemplatePipeline(pipe).adapter
    with torch.no_grad():
        processed = pipe.image_processor.preprocess(picture(), height=64, width=64)
        latents = adapter.encode_image(processed, torch.Generator().manual_seed(7))
    out = ours("flux", [InitLatentsCache(latents=latents, strength=0.5)])
    ref = reference(pipe, IMG2IMG["flux"])(
        prompt="a red circle", image=latents, strength=0.5, **call_kwargs("flux")
    ).images
    assert (out - ref).abs().max() < 1e-4


def test_user_latents_are_the_inpainting_noise():
    """diffusers' inpaint pipelines take given latents as the noise; FluxPipeline's are packed."""
    pipe = tiny("flux")
    adapter = TemplatePipeline(pipe).adapter
    noise = torch.randn(adapter.image_latent_shape(1, 64, 64), generator=torch.Generator().manual_seed(3))
    image, mask = picture(), box_mask()
    out = ours("flux", [mask_cache(mask, image)], latents=adapter.pack_latents(noise))
    ref = reference(pipe, INPAINT["flux"])(
        prompt="a red circle",
        image=image,
        mask_image=mask,
        strength=1.0,
        latents=noise,
        **call_kwargs("flux"),
    ).images
    assert (out - ref).abs().max() < 1e-4


# --------------------------------------------------------------------------- FLUX.2 by its limits


def flux2_source_latents(pipe, image):
    """What the FLUX.2 output latents are for the image itself: the VAE mode (raw, unpatchified)."""
    with torch.no_grad():
        processed = pipe.image_processor.preprocess(image, height=64, width=64)
        return pipe.vae.encode(processed).latent_dist.mode()


def test_flux2_strength_one_is_text_to_image():
    out = ours("flux2_klein", [init_cache(picture(), 1.0)])
    plain = tiny("flux2_klein")(prompt="a red circle", **call_kwargs("flux2_klein")).images
    assert (out - plain).abs().max() < 1e-5


def test_flux2_tiny_strength_is_the_vae_round_trip():
    pipe, image = tiny("flux2_klein"), picture()
    source = flux2_source_latents(pipe, image)
    out = ours("flux2_klein", [init_cache(image, 0.001)], num_inference_steps=1000)  # one step, sigma 1e-3
    plain = pipe(prompt="a red circle", **call_kwargs("flux2_klein")).images
    assert (out - source).abs().max() < 0.02 * (plain - source).abs().max()


def test_flux2_latent_mask_keeps_the_source_outside_the_mask():
    pipe, image = tiny("flux2_klein"), picture()
    source = flux2_source_latents(pipe, image)
    out = ours("flux2_klein", [mask_cache(box_mask(), image)])
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2:6, 2:6] = False  # the 16-pixel-aligned box, on the 8x8 VAE grid
    assert (out - source)[..., keep].abs().max() < 1e-5
    assert (out - source)[..., ~keep].abs().max() > 1e-2
    with_strength = ours("flux2_klein", [mask_cache(box_mask(), image), init_cache(image, 0.5)])
    assert (with_strength - source)[..., keep].abs().max() < 1e-5


# --------------------------------------------------------------------------- merge


def test_latent_masks_merge_to_the_union():
    image = picture()
    a = mask_cache(box_mask(box=(0, 32, 0, 32)), image, "a")
    b = mask_cache(box_mask(box=(16, 48, 16, 64)), image, "b")
    merged = LatentMaskCarrier().merge_caches([a, b])
    assert merged.template == "a+b"
    assert torch.equal(merged.mask, torch.maximum(a.mask, b.mask))
    assert torch.equal(merged.image, a.image)
    union = mask_cache(Image.fromarray((merged.mask[0, 0].numpy() * 255).astype(np.uint8)), image)
    assert torch.equal(ours("flux", [a, b]), ours("flux", [union]))


def test_latent_mask_sources_compose_where_each_keeps():
    left, right = picture(seed=1), picture(seed=2)
    a = mask_cache(box_mask(box=(0, 64, 32, 64)), left, "left")  # keeps the left half of `left`
    b = mask_cache(box_mask(box=(0, 64, 0, 32)), right, "right")  # keeps the right half of `right`
    merged = LatentMaskCarrier().merge_caches([a, b])
    assert torch.equal(merged.image[..., :32], a.image[..., :32])
    assert torch.equal(merged.image[..., 32:], b.image[..., 32:])
    assert merged.mask.max() == 1  # every pixel is generated by one of them


def test_latent_masks_keeping_one_region_with_different_sources_conflict():
    a = mask_cache(box_mask(box=(0, 32, 0, 32)), picture(seed=1), "a")
    b = mask_cache(box_mask(box=(32, 64, 32, 64)), picture(seed=2), "b")
    with pytest.raises(CarrierConflictError, match=r"'a' and 'b' both keep a region"):
        LatentMaskCarrier().merge_caches([a, b])


def test_two_init_latents_conflict():
    with pytest.raises(CarrierConflictError, match=r"'x\+y' each set the starting image"):
        TemplatePipeline(tiny("flux"))(
            prompt="p",
            templates=[init_cache(picture(), 0.5, "x"), init_cache(picture(), 0.7, "y")],
            **call_kwargs("flux"),
        )


# --------------------------------------------------------------------------- bad inputs


@contextlib.contextmanager
def guard(family: str):
    """A TemplatePipeline; afterwards: no denoising ran and the pipeline is unchanged."""
    pipe = tiny(family)
    before = pipeline_state(pipe)
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    calls, handle = count_denoiser_calls(denoiser)
    try:
        yield TemplatePipeline(pipe)
    finally:
        handle.remove()
    assert calls == [], "denoising started before the error"
    assert_pipeline_unchanged(before, pipe)


@pytest.fixture
def guarded():
    with guard("flux") as tp:
        yield tp


def test_mask_of_the_wrong_size(guarded):
    cache = mask_cache(box_mask(size=(32, 32), box=(0, 16, 0, 16)), picture(), "inpaint")
    with pytest.raises(CacheError, match=r"template 'inpaint': its mask is 32x32, its source image is 64x64"):
        guarded(prompt="p", templates=[cache], **call_kwargs("flux"))


def test_init_image_larger_than_requested(guarded):
    with pytest.raises(
        CacheError, match=r"template 'up': its image is 96x96, larger than the requested 64x64"
    ):
        guarded(prompt="p", templates=[init_cache(picture((96, 96)), 0.5, "up")], **call_kwargs("flux"))


def test_smaller_init_image_is_upscaled():
    out = ours("flux", [init_cache(picture((32, 32)), 0.5)])
    assert out.shape == (1, 16, 16)


def test_call_size_defaults_to_the_picture():
    kwargs = call_kwargs("flux")
    del kwargs["height"], kwargs["width"]
    pipe = tiny("flux")
    out = TemplatePipeline(pipe)(prompt="p", templates=[init_cache(picture((48, 32)), 0.5)], **kwargs).images
    assert out.shape == (1, 6, 16)  # 48x32 pixels: 3x2 packed tokens of 16 channels


def test_latents_argument_with_init_latents(guarded):
    with pytest.raises(CacheError, match="template 'init' sets the starting latents"):
        guarded(
            prompt="p",
            templates=[init_cache(picture(), 0.5)],
            latents=torch.zeros(1, 16, 16),
            **call_kwargs("flux"),
        )


def test_strength_that_leaves_no_step():
    """StableDiffusionXLImg2ImgPipeline runs int(steps * strength) steps: none for 0.1 x 4."""
    with guard("sdxl") as tp, pytest.raises(CacheError, match=r"strength 0.1 with 4 steps leaves no"):
        tp(prompt="p", templates=[init_cache(picture(), 0.1)], **call_kwargs("sdxl"))


def test_as_negative_template(guarded):
    with pytest.raises(UnsupportedError, match="given as a negative template"):
        guarded(prompt="p", negative_templates=[init_cache(picture(), 0.5, "neg")], **call_kwargs("flux"))


def test_unsupported_pipeline_class():
    pipe = reference(tiny("flux"), "FluxImg2ImgPipeline")
    with pytest.raises(
        UnsupportedError, match=r"template 'inpaint'.*drives FluxPipeline.*FluxImg2ImgPipeline"
    ):
        TemplatePipeline(pipe)(
            prompt="p", image=picture(), templates=[mask_cache(box_mask(), picture(), "inpaint")]
        )


def test_latents_of_the_wrong_form(guarded):
    cache = InitLatentsCache(latents=torch.zeros(1, 16, 8, 8), strength=0.5, template="lat")
    with pytest.raises(
        CacheError, match=r"template 'lat': latents have shape \(1, 16, 8, 8\).*\(B, 4, h, w\)"
    ):
        guarded(prompt="p", templates=[cache], **call_kwargs("flux"))


def test_cache_validation():
    with pytest.raises(ValueError, match="exactly one of image and latents"):
        InitLatentsCache(strength=0.5)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        InitLatentsCache(image=torch.zeros(1, 3, 8, 8), strength=1.5)
    with pytest.raises(ValueError, match=r"mask must be a float \(B, 1, H, W\)"):
        LatentMaskCache(mask=torch.zeros(1, 3, 8, 8), image=torch.zeros(1, 3, 8, 8))


def test_caches_round_trip(tmp_path):
    cache = mask_cache(box_mask(), picture(), "m")
    cache.save(tmp_path / "m.safetensors")
    loaded = LatentMaskCache.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded.mask, cache.mask) and torch.equal(loaded.image, cache.image)
    assert loaded.latents is None
