"""imaging.py and the adapters' image/latent methods reproduce each pipeline's own preprocessing."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_templates import CacheError, TemplatePipeline
from diffusion_templates.imaging import (
    call_batch_size,
    encode_image,
    preprocess_image,
    preprocess_mask,
    to_image_tensor,
    to_mask_tensor,
)
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES

FAMILIES = ["flux2_klein", "flux", "sd3", "qwen_image", "sdxl"]


@pytest.fixture(scope="module")
def pipes():
    return {family: TINY_PIPELINES[family].build() for family in FAMILIES}


def picture(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- neutral forms


def test_image_forms_agree():
    image = picture((16, 24))
    array = np.array(image)
    expected = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    assert torch.equal(to_image_tensor(image), expected)
    assert torch.equal(to_image_tensor(array), expected)  # uint8 HWC
    assert torch.equal(to_image_tensor(array.astype(np.float32) / 255.0), expected)
    assert torch.equal(to_image_tensor(expected[0]), expected)  # CHW tensor
    assert torch.equal(to_image_tensor(torch.from_numpy(array).permute(2, 0, 1)), expected)  # uint8 tensor
    assert to_image_tensor([image, image]).shape == (2, 3, 16, 24)
    assert torch.equal(
        to_image_tensor(image.convert("L")), to_image_tensor(image.convert("L").convert("RGB"))
    )


def test_mask_forms_agree():
    mask = np.zeros((8, 12), dtype=np.uint8)
    mask[2:6, 3:9] = 255
    expected = torch.from_numpy(mask.astype(np.float32) / 255.0)[None, None]
    assert torch.equal(to_mask_tensor(Image.fromarray(mask)), expected)
    assert torch.equal(to_mask_tensor(Image.fromarray(mask).convert("RGB")), expected)
    assert torch.equal(to_mask_tensor(mask), expected)
    assert torch.equal(to_mask_tensor(mask > 0), expected)
    assert torch.equal(to_mask_tensor(torch.from_numpy(mask > 0)), expected)
    assert torch.equal(to_mask_tensor(expected[0]), expected)
    assert to_mask_tensor([mask, mask]).shape == (2, 1, 8, 12)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.full((3, 4, 4), 2.0), r"values must lie in \[0, 1\]"),
        (torch.zeros(4, 4, 4), r"image tensor \(3, H, W\)"),
        (np.zeros((4, 4)), r"image array"),
        ("a.png", "expected a PIL image"),
        ([], "empty list"),
    ],
)
def test_bad_images_are_clear_errors(bad, match):
    with pytest.raises(CacheError, match=match):
        to_image_tensor(bad)


def test_bad_masks_are_clear_errors():
    with pytest.raises(CacheError, match=r"mask tensor \(H, W\)"):
        to_mask_tensor(torch.zeros(1, 3, 4, 4))
    with pytest.raises(CacheError, match="integer|float or uint8"):
        to_mask_tensor(torch.zeros(4, 4, dtype=torch.int64))


def test_call_batch_size():
    assert call_batch_size({"prompt": "a"}) == 1
    assert call_batch_size({"prompt": ["a", "b"], "num_images_per_prompt": 3}) == 6
    assert call_batch_size({"prompt_embeds": torch.zeros(2, 4, 8), "num_images_per_prompt": 2}) == 4


# --------------------------------------------------------------------------- per pipeline


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocess_equals_the_pipeline_processor_on_a_pil_image(pipes, family):
    pipe = pipes[family]
    adapter = TemplatePipeline(pipe).adapter
    image = picture()
    reference = pipe.image_processor.preprocess(image, height=64, width=64)
    ours = preprocess_image(pipe, adapter, to_image_tensor(image), 64, 64)
    assert torch.equal(ours, reference)
    assert ours.stride() == reference.stride()  # channels-last, as numpy_to_pt lays PIL images out
    bigger = preprocess_image(pipe, adapter, to_image_tensor(picture((32, 32))), 64, 64)
    assert bigger.shape == (1, 3, 64, 64) and -1 <= bigger.min() and bigger.max() <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_is_processed_like_the_inpaint_pipelines(pipes, family):
    pipe = pipes[family]
    adapter = TemplatePipeline(pipe).adapter
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:40, 20:60] = 200
    processed = preprocess_mask(pipe, adapter, to_mask_tensor(Image.fromarray(mask)), 64, 64)
    reference = adapter.mask_processor().preprocess(Image.fromarray(mask), height=64, width=64)
    assert torch.equal(processed, reference)
    assert set(processed.unique().tolist()) == {0.0, 1.0}
    latents_mask = adapter.mask_latents(processed, 64, 64)
    loop = adapter.pack_latents(torch.zeros(adapter.image_latent_shape(1, 64, 64)))
    assert torch.broadcast_shapes(latents_mask.shape, loop.shape) == loop.shape


def _reference_encode(pipe, family, image, generator):
    """Each family's own diffusers code path from a preprocessed image to image latents."""
    if family == "flux":
        return diffusers.FluxImg2ImgPipeline._encode_vae_image(pipe, image, generator)
    if family == "sd3":  # the img2img pipeline inlines the same formula
        latents = pipe.vae.encode(image).latent_dist.sample(generator)
        return (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    if family == "qwen_image":
        ref = diffusers.QwenImageImg2ImgPipeline(**pipe.components)
        latents = ref._encode_vae_image(image.unsqueeze(2), generator)
        return latents.transpose(1, 2)
    if family == "flux2_klein":
        ref = diffusers.Flux2KleinInpaintPipeline(**pipe.components)
        return ref._encode_vae_image(image, generator)
    ref = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    return ref.prepare_latents(image, None, 1, 1, image.dtype, image.device, generator, add_noise=False)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_encode_equals_the_pipeline_encode(pipes, family):
    pipe = pipes[family]
    adapter = TemplatePipeline(pipe).adapter
    image = pipe.image_processor.preprocess(picture(), height=64, width=64)
    ours = encode_image(pipe, adapter, image, torch.Generator().manual_seed(1))
    reference = _reference_encode(pipe, family, image, torch.Generator().manual_seed(1))
    assert ours.shape == adapter.image_latent_shape(1, 64, 64)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_noise_and_packing_match_prepare_latents(pipes, family):
    """Noise drawn in image-latent form and handed over with call_latents is what the pipeline
    would have drawn itself; noise_from_call undoes call_latents."""
    from diffusion_templates.imaging import randn_like_pipeline

    pipe = pipes[family]
    adapter = TemplatePipeline(pipe).adapter
    shape = adapter.image_latent_shape(2, 64, 64)
    noise = randn_like_pipeline(shape, torch.Generator().manual_seed(5), torch.device("cpu"), torch.float32)
    channels = pipe.unet.config.in_channels if family == "sdxl" else pipe.transformer.config.in_channels
    if family in ("flux", "qwen_image", "flux2_klein"):
        channels //= 4
    own = pipe.prepare_latents(2, channels, 64, 64, torch.float32, "cpu", torch.Generator().manual_seed(5))
    own = own[0] if isinstance(own, tuple) else own
    if family == "sdxl":  # prepare_latents scales by init_noise_sigma; call_latents(noise) is unit noise
        own = own / pipe.scheduler.init_noise_sigma
    call = adapter.call_latents(noise)
    if family == "flux2_klein":  # the pipeline packs the (B, 4C, h, w) latents it is given
        call = adapter.pack_latents(call)
    assert torch.allclose(call, own, atol=0, rtol=1e-6)
    assert torch.equal(adapter.noise_from_call(adapter.call_latents(noise), 64, 64), noise)


@torch.no_grad()
def test_half_precision_sdxl_vae_is_upcast_without_writing_weights():
    """diffusers casts a force_upcast VAE to float32 for the encode and back; the adapter encodes
    with a float32 copy of the encoder instead, with the same result."""
    pipe = TINY_PIPELINES["sdxl"].build(dtype=torch.bfloat16)
    adapter = TemplatePipeline(pipe).adapter
    image = pipe.image_processor.preprocess(picture(), height=64, width=64).to(torch.bfloat16)
    before = pipeline_state(pipe)
    weights = [p.data_ptr() for p in pipe.vae.parameters()]
    ours = encode_image(pipe, adapter, image, torch.Generator().manual_seed(1))
    assert_pipeline_unchanged(before, pipe)
    assert [p.data_ptr() for p in pipe.vae.parameters()] == weights
    ref = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    expected = ref.prepare_latents(
        image, None, 1, 1, torch.bfloat16, image.device, torch.Generator().manual_seed(1), add_noise=False
    )
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, expected)
