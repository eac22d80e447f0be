"""Which rows of each denoiser call belong to which CFG branch, decided from that call alone.

References share no carrier code: torch forward hooks that add a LoRA delta to chosen rows, PEFT's
``load_lora_weights``, and an SDPA stand-in that appends K/V to chosen rows. The rows a reference
picks come from what diffusers' pipeline does in that call (batched ``[uncond, cond]`` over the
images; SD3's skip-layer guidance call: the conditional inputs only, one row per image).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from dt_test_templates import random_lora

from diffusion_templates import CacheError, TemplatePipeline
from diffusion_templates.carriers.embedding import EmbeddingCache
from diffusion_templates.carriers.init_latents import InitLatentsCache
from diffusion_templates.carriers.latent_mask import LatentMaskCache
from diffusion_templates.carriers.residual import ResidualCache
from diffusion_templates.context import CURRENT_CALL, BatchLayout
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs
from diffusion_templates.testing.tiny_controlnets import build_flux_controlnet
from helpers import FAMILIES, count_denoiser_calls

SEQUENTIAL = {"flux2_klein", "flux", "qwen_image"}
#: SD3's skip-layer guidance on every step after the first (3 steps: two extra calls).
SLG = {
    "skip_guidance_layers": [1],
    "skip_layer_guidance_start": 0.0,
    "skip_layer_guidance_stop": 1.0,
    "num_inference_steps": 3,
}
SD3_LORA_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2"]
SDXL_LORA_TARGETS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def call(family: str, cfg: bool = True, seed: int = 0, **kwargs) -> dict:
    out = {"prompt": "a red circle", **tiny_call_kwargs(family, cfg=cfg, output_type="latent", seed=seed)}
    out.update(kwargs)
    return out


@contextlib.contextmanager
def recorded_layouts(denoiser: torch.nn.Module):
    """The ``CallState.layout`` each denoiser call ran with (read after the call's forward)."""
    seen: list[BatchLayout | None] = []

    def hook(module, args, kwargs, output):
        state = CURRENT_CALL.get()
        seen.append(None if state is None else state.layout)

    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


# --------------------------------------------------------------------------- the layout per call


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "batching", [{"prompt": ["a red circle", "a blue square"]}, {"num_images_per_prompt": 2}]
)
def test_layout_follows_each_call(family, batching, tiny_pipes):
    pipe = tiny_pipes(family)
    tp = TemplatePipeline(pipe)
    spec = {"template": "test-kv", "length": 2}
    for cfg in (True, False):
        with recorded_layouts(tp.adapter.denoiser) as seen:
            tp(templates=[spec], **call(family, cfg=cfg, **batching))
        if not cfg:
            expected = [BatchLayout.single("cond", 2)] * 2
        elif family in SEQUENTIAL:
            expected = [BatchLayout.single("cond", 2), BatchLayout.single("uncond", 2)] * 2
        else:
            expected = [BatchLayout.cfg(2)] * 2
        assert seen == expected, (family, cfg)


def test_sd3_skip_layer_call_is_conditional(tiny_pipes):
    pipe = tiny_pipes("sd3")
    tp = TemplatePipeline(pipe)
    for images in (1, 2):
        prompts = ["a red circle"] * images
        with recorded_layouts(pipe.transformer) as seen:
            tp(templates=[{"template": "test-kv"}], **call("sd3", prompt=prompts, **SLG))
        skip = BatchLayout.single("cond", images, purpose="skip_layers")
        assert seen == [BatchLayout.cfg(images), BatchLayout.cfg(images), skip, BatchLayout.cfg(images), skip]


# --------------------------------------------------------------------------- SD3 skip-layer guidance


def _lora(pipe, targets, seed, scale=1.0, template=None):
    return random_lora(pipe.transformer, targets, rank=4, seed=seed, scale=scale, template=template)


@contextlib.contextmanager
def lora_on_rows(denoiser, cache, pick):
    """Reference LoRA: forward hooks on the Linear modules adding ``scale * B A x`` to ``pick(batch)``
    rows, where ``batch`` is the running denoiser call's batch (read by a pre-hook)."""
    batch = [0]
    handles = [
        denoiser.register_forward_pre_hook(lambda m, a, k: batch.__setitem__(0, _batch(k)), with_kwargs=True)
    ]
    for path in cache.down:
        module = denoiser.get_submodule(path)
        down, up, scale = cache.down[path], cache.up[path], cache.scale_of(path)

        def hook(module, args, output, down=down, up=up, scale=scale):
            rows = pick(batch[0])
            if rows is None:
                return output
            delta = (args[0][rows] @ down.T @ up.T) * scale
            out = output.clone()
            out[rows] = out[rows] + delta
            return out

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _batch(kwargs) -> int:
    return (
        int(kwargs["hidden_states"].shape[0]) if "hidden_states" in kwargs else int(kwargs["sample"].shape[0])
    )


def _sd3_rows(images: int, branch: str):
    """What StableDiffusion3Pipeline computes in a call of ``batch`` rows: [uncond, cond] (2 x images) or
    the skip-layer call on the conditional inputs (images rows)."""

    def pick(batch: int):
        if batch == 2 * images:
            return slice(0, images) if branch == "uncond" else slice(images, batch)
        return slice(0, batch) if branch == "cond" else None

    return pick


@pytest.mark.parametrize("seed", [0, 1])
def test_sd3_skip_layers_identical_prompts_stay_identical(seed, tiny_pipes):
    """Measured on main: the skip-layer call was split as [uncond, cond], so the second image got the
    negative templates there (rows differing by 6.2e-3)."""
    pipe = tiny_pipes("sd3")
    tp = TemplatePipeline(pipe)
    positive = [_lora(pipe, SD3_LORA_TARGETS, seed), {"template": "test-kv", "seed": seed}]
    negative = [_lora(pipe, SD3_LORA_TARGETS, seed + 10), {"template": "test-kv", "seed": seed + 10}]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).repeat(2, 1, 1, 1)
    kwargs = call("sd3", seed=seed, prompt=["a cat"] * 2, latents=noise, **SLG)
    before = pipeline_state(pipe)
    out = tp(templates=positive, negative_templates=negative, **kwargs).images
    assert_pipeline_unchanged(before, pipe)
    assert (out[0] - out[1]).abs().max() < 1e-6
    bare = pipe(**call("sd3", seed=seed, prompt=["a cat"] * 2, latents=noise, **SLG)).images
    assert (out - bare).abs().max() > 1e-4


@pytest.mark.parametrize("branch", ["cond", "uncond"])
@pytest.mark.parametrize("images", [1, 2])
def test_sd3_skip_layers_lora_reaches_its_branch_rows_only(branch, images, tiny_pipes):
    pipe = tiny_pipes("sd3")
    tp = TemplatePipeline(pipe)
    cache = _lora(pipe, SD3_LORA_TARGETS, seed=images)
    kwargs = call("sd3", prompt=["a cat", "a dog"][:images], **SLG)
    where = {"templates": [cache]} if branch == "cond" else {"negative_templates": [cache]}
    ours = tp(**where, **call("sd3", prompt=["a cat", "a dog"][:images], **SLG)).images
    with lora_on_rows(pipe.transformer, cache, _sd3_rows(images, branch)):
        reference = pipe(**kwargs).images
    assert (ours - reference).abs().max() < 1e-5
    assert (ours - pipe(**call("sd3", prompt=["a cat", "a dog"][:images], **SLG)).images).abs().max() > 1e-4


def test_sd3_skip_layers_lora_in_both_branches_equals_peft():
    """A LoRA given as template and as negative template reaches every row of every call: PEFT's."""
    pipe = TINY_PIPELINES["sd3"].build()
    cache = _lora(pipe, SD3_LORA_TARGETS, seed=4)
    kwargs = lambda: call("sd3", prompt=["a cat", "a dog"], **SLG)  # noqa: E731
    ours = TemplatePipeline(pipe)(templates=[cache], negative_templates=[cache], **kwargs()).images
    pipe.load_lora_weights(cache.to_state_dict("transformer"), adapter_name="t")
    try:
        reference = pipe(**kwargs()).images
    finally:
        pipe.unload_lora_weights()
    assert (ours - reference).abs().max() < 1e-5


# The kv reference: SD3's attention processor calls F.scaled_dot_product_attention (B, H, L, D).


@contextlib.contextmanager
def kv_on_rows(monkeypatch, denoiser, layers, caches_by_branch, pick):
    """Reference kv: each row of each attention call gets its branch's cache tokens appended (row i of
    the branch takes cache row i, or row 0 of a batch-1 cache), attention computed row by row."""
    from diffusers.models import attention_processor

    current, batch = [None], [0]
    handles = [
        denoiser.register_forward_pre_hook(lambda m, a, k: batch.__setitem__(0, _batch(k)), with_kwargs=True)
    ]
    for name, layer in layers.items():
        handles.append(layer.module.register_forward_pre_hook(lambda m, a, n=name: current.__setitem__(0, n)))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    class Functional:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        def scaled_dot_product_attention(self, query, key, value, attn_mask=None, **kw):
            rows = pick(batch[0])  # {branch: slice}
            outs = []
            for i in range(query.shape[0]):
                branch = next((b for b, r in rows.items() if r.start <= i < r.stop), None)
                k, v = key[i : i + 1], value[i : i + 1]
                cache = caches_by_branch.get(branch)
                if cache is not None and current[0] in cache.keys:
                    j = i - rows[branch].start
                    ck, cv = cache.keys[current[0]], cache.values[current[0]]
                    ck, cv = ck[j if ck.shape[0] > 1 else 0], cv[j if cv.shape[0] > 1 else 0]
                    k = torch.cat([k, ck.transpose(0, 1)[None].to(k.dtype)], dim=2)
                    v = torch.cat([v, cv.transpose(0, 1)[None].to(v.dtype)], dim=2)
                outs.append(sdpa(query[i : i + 1], k, v, **kw))
            return torch.cat(outs)

    monkeypatch.setattr(attention_processor, "F", Functional())
    try:
        yield
    finally:
        monkeypatch.undo()
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("images,kv_batch", [(1, 1), (2, 2), (2, 1)])
def test_sd3_skip_layers_kv_per_image_equals_row_reference(images, kv_batch, tiny_pipes, monkeypatch):
    pipe = tiny_pipes("sd3")
    tp = TemplatePipeline(pipe)
    pos = {"template": "test-kv", "seed": 3, "batch": kv_batch, "length": 3}
    neg = {"template": "test-kv", "seed": 5, "length": 2}
    prompts = ["a cat", "a dog"][:images]
    ours = tp(templates=[pos], negative_templates=[neg], **call("sd3", prompt=prompts, **SLG)).images
    caches = {"cond": tp.encode(pos)[0], "uncond": tp.encode(neg, negative=True)[0]}

    def pick(batch):
        if batch == 2 * images:
            return {"uncond": slice(0, images), "cond": slice(images, batch)}
        return {"cond": slice(0, batch)}

    with kv_on_rows(monkeypatch, pipe.transformer, tp.adapter.attention_layers(), caches, pick):
        reference = pipe(**call("sd3", prompt=prompts, **SLG)).images
    assert (ours - reference).abs().max() < 1e-5


# --------------------------------------------------------------------------- injecting() after a CFG call


def _direct_inputs(tp, family):
    """The denoiser's arguments of a bare call's first step (no CFG) with its one row repeated: a
    direct call on two identical images."""
    captured = {}

    def hook(module, args, kwargs):
        captured.setdefault("call", (args, dict(kwargs)))

    handle = tp.adapter.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        tp.pipe(**call(family, cfg=False))
    finally:
        handle.remove()
    args, kwargs = captured["call"]

    def twice(value):
        if isinstance(value, dict):
            return {k: twice(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == 1:
            return value.repeat(2, *[1] * (value.ndim - 1))
        return value

    names = ("sample", "timestep") if family == "sdxl" else ()  # the UNet takes these positionally
    return {**twice(kwargs), **{name: twice(arg) for name, arg in zip(names, args, strict=False)}}


def _prediction(output):
    return output[0] if isinstance(output, tuple) else output.sample


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_injecting_after_a_cfg_call_is_conditional(family, tiny_pipes):
    pipe = tiny_pipes(family)
    tp = TemplatePipeline(pipe)
    denoiser = tp.adapter.denoiser
    targets = SD3_LORA_TARGETS if family == "sd3" else SDXL_LORA_TARGETS
    cache = random_lora(denoiser, targets, rank=4, seed=7)
    inputs = _direct_inputs(tp, family)
    with torch.no_grad():
        bare = _prediction(denoiser(**inputs))
        with lora_on_rows(denoiser, cache, lambda batch: slice(0, batch)):
            reference = _prediction(denoiser(**inputs))
    tp(templates=[cache], **call(family))  # a CFG call: leaves do_classifier_free_guidance on
    assert pipe.do_classifier_free_guidance
    with torch.no_grad():
        with tp.injecting(templates=[cache]):
            ours = _prediction(denoiser(**inputs))
        with tp.injecting(negative_templates=[cache]):
            negative = _prediction(denoiser(**inputs))
        with tp.injecting(negative_templates=[cache], call_kwargs={"prompt": "a cat"}):  # 1 image, 2 rows
            negative_with_kwargs = _prediction(denoiser(**inputs))
        with tp.injecting(negative_templates=[cache]) as state:  # the caller's own [uncond, cond] rows
            state.fixed_layout = BatchLayout.cfg(1)
            split = _prediction(denoiser(**inputs))
    assert torch.equal(ours[0], ours[1])
    assert (ours - reference).abs().max() < 1e-5
    assert torch.equal(negative, bare)  # a direct call counts as conditional: negative templates miss it
    assert torch.equal(negative_with_kwargs, bare)  # whatever call_kwargs say about the image count
    assert (split[0] - reference[0]).abs().max() < 1e-5 and torch.equal(split[1], bare[1])


def test_injecting_uncond_cache_context_reaches_negative_templates(tiny_pipes):
    pipe = tiny_pipes("flux")
    tp = TemplatePipeline(pipe)
    cache = random_lora(pipe.transformer, ["transformer_blocks.0.attn.to_q"], rank=4, seed=2)
    inputs = _direct_inputs(tp, "flux")
    tp(templates=[cache], **call("flux"))
    with torch.no_grad():
        bare = _prediction(pipe.transformer(**inputs))
        with tp.injecting(negative_templates=[cache]):
            cond = _prediction(pipe.transformer(**inputs))
            with pipe.transformer.cache_context("uncond"):
                uncond = _prediction(pipe.transformer(**inputs))
    assert torch.equal(cond, bare)
    assert (uncond - bare).abs().max() > 1e-4


# --------------------------------------------------------------------------- per-image tensors, refused early


@contextlib.contextmanager
def no_denoising(denoiser):
    calls, handle = count_denoiser_calls(denoiser)
    try:
        yield
    finally:
        handle.remove()
        assert not calls, "refused only after denoising started"


def _refused(tp, family, templates, match, **kwargs):
    before = pipeline_state(tp.pipe)
    with no_denoising(tp.adapter.denoiser), pytest.raises(CacheError, match=match):
        tp(templates=templates, **call(family, **kwargs))
    assert_pipeline_unchanged(before, tp.pipe)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_kv_batch_fitting_no_image_count_is_refused(family, tiny_pipes):
    tp = TemplatePipeline(tiny_pipes(family))
    spec = {"template": "test-kv", "batch": 3}
    _refused(
        tp,
        family,
        [spec],
        r"test-kv.*batch 3, the call makes 2 image\(s\); give 1 .* or 2",
        prompt=["a", "b"],
    )
    _refused(tp, family, [{**spec, "batch": 4}], r"makes 2 image\(s\)", prompt="a", num_images_per_prompt=2)


def test_residual_control_counted_in_images(tiny_pipes):
    pipe = tiny_pipes("flux")
    tp = TemplatePipeline(pipe)
    controlnet = build_flux_controlnet(seed=1)
    cache = ResidualCache.from_controlnet(controlnet, torch.randn(3, 16, 16), template="cn3")
    _refused(
        tp, "flux", [cache], r"cn3.*batch 3, the call makes 2 image\(s\); give 1 .* or 2", prompt=["a", "b"]
    )


def test_residual_sd3_cfg_doubled_control_is_counted_in_images(tiny_pipes):
    from diffusion_templates.testing.tiny_controlnets import build_sd3_controlnet

    pipe = tiny_pipes("sd3")
    tp = TemplatePipeline(pipe)
    controlnet = build_sd3_controlnet(seed=1)
    control = torch.randn(3, 4, 8, 8)
    _refused(
        tp,
        "sd3",
        [ResidualCache.from_controlnet(controlnet, control, template="cn")],
        r"cn.*2 image\(s\)",
        prompt=["a", "b"],
    )
    # one sample per CFG half and image (4 rows for 2 images) is what diffusers' SD3 pipeline prepares
    tp(
        templates=[ResidualCache.from_controlnet(controlnet, torch.randn(4, 4, 8, 8))],
        **call("sd3", prompt=["a", "b"]),
    )


def test_embedding_latent_mask_init_latents_per_image_batches_refused(tiny_pipes):
    pipe = tiny_pipes("flux")
    tp = TemplatePipeline(pipe)
    dim = pipe.transformer.config.joint_attention_dim
    embedding = EmbeddingCache(delta=torch.zeros(3, 1, dim), template="emb3")
    _refused(tp, "flux", [embedding], r"emb3.*batch 3, the call has 2 prompt", prompt=["a", "b"])
    image = torch.rand(3, 3, 64, 64)
    init = InitLatentsCache(image=image, strength=0.5, template="init3")
    _refused(tp, "flux", [init], r"init3.*batch 3, the call makes 2 image\(s\)", cfg=False, prompt=["a", "b"])
    mask = LatentMaskCache(mask=torch.ones(3, 1, 64, 64), image=torch.rand(1, 3, 64, 64), template="mask3")
    _refused(
        tp,
        "flux",
        [mask],
        r"mask3.*mask has batch 3, the call makes 4 image\(s\)",
        cfg=False,
        num_images_per_prompt=4,
    )
