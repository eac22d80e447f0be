"""Tests of the tiny offline pipelines in diffusion_templates.testing.tiny."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from diffusion_templates.testing.tiny import (
    TINY_PIPELINES,
    build_flux2_klein,
    clip_tokenizer,
    qwen_tokenizer,
    t5_tokenizer,
    tiny_call_kwargs,
)

NAMES = sorted(TINY_PIPELINES)
# CFG styles: one denoiser call per branch under cache_context("cond"/"uncond"), or one batched call.
SEQUENTIAL_CFG = {"flux2_klein", "flux", "qwen_image"}
BATCHED_CFG = {"sd3", "sdxl", "sd"}
PROMPT = "a cat"


def modules(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def run(pipe: DiffusionPipeline, name: str, **kwargs: Any) -> np.ndarray:
    return pipe(prompt=PROMPT, **tiny_call_kwargs(name, **kwargs)).images


@contextmanager
def record_denoiser_calls(pipe: DiffusionPipeline) -> Iterator[list[tuple[str | None, int]]]:
    """Record (cache-context name, batch size) for every denoiser forward call."""
    model = denoiser(pipe)
    calls: list[tuple[str | None, int]] = []
    contexts: list[str] = []
    original = getattr(model, "cache_context", None)  # UNets have none

    @contextmanager
    def spy(name: str) -> Iterator[None]:
        contexts.append(name)
        try:
            with original(name):
                yield
        finally:
            contexts.pop()

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        latents = (
            kwargs["sample"] if "sample" in kwargs else kwargs.get("hidden_states", args[0] if args else None)
        )
        calls.append((contexts[-1] if contexts else None, latents.shape[0]))

    if original is not None:
        model.cache_context = spy
    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()
        if original is not None:
            del model.cache_context


@pytest.fixture(scope="module")
def pipes() -> dict[str, DiffusionPipeline]:
    return {name: TINY_PIPELINES[name].build() for name in NAMES}


def test_registry_keys() -> None:
    assert set(TINY_PIPELINES) == {"flux2_klein", "flux", "sd3", "qwen_image", "sdxl", "sd"}
    assert SEQUENTIAL_CFG | BATCHED_CFG == set(TINY_PIPELINES)


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    build = TINY_PIPELINES[name].build
    torch.manual_seed(1234)
    rng_before = torch.random.get_rng_state()
    first, second = build(), build()
    assert torch.equal(torch.random.get_rng_state(), rng_before)

    first_modules, second_modules = modules(first), modules(second)
    assert first_modules.keys() == second_modules.keys()
    for key, module in first_modules.items():
        assert not any(m.training for m in module.modules()), f"{key} not in eval mode"
        sd1, sd2 = module.state_dict(), second_modules[key].state_dict()
        assert sd1.keys() == sd2.keys()
        for param_name, tensor in sd1.items():
            assert torch.equal(tensor, sd2[param_name]), f"{key}.{param_name} differs between builds"

    other = modules(build(seed=1))
    assert not all(
        torch.equal(t, other[key].state_dict()[p])
        for key, m in first_modules.items()
        for p, t in m.state_dict().items()
    ), "seed has no effect"


@pytest.mark.parametrize("name", NAMES)
def test_dtype_cast(name: str) -> None:
    pipe = TINY_PIPELINES[name].build(dtype=torch.bfloat16)
    for key, module in modules(pipe).items():
        assert not module.training
        for param_name, param in module.named_parameters():
            assert param.dtype == torch.bfloat16, f"{key}.{param_name} is {param.dtype}"


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("name", NAMES)
def test_call_is_deterministic(name: str, cfg: bool, pipes: dict[str, DiffusionPipeline]) -> None:
    pipe = pipes[name]
    with record_denoiser_calls(pipe) as calls:
        first = run(pipe, name, cfg=cfg)
    second = run(pipe, name, cfg=cfg)

    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    assert np.array_equal(first, second)

    if name in SEQUENTIAL_CFG:
        expected = [("cond", 1), ("uncond", 1)] * 2 if cfg else [("cond", 1)] * 2
    else:
        expected = [(None, 2 if cfg else 1)] * 2
    assert calls == expected


@pytest.mark.parametrize("name", NAMES)
def test_cfg_changes_output(name: str, pipes: dict[str, DiffusionPipeline]) -> None:
    assert not np.array_equal(run(pipes[name], name), run(pipes[name], name, cfg=True))


@pytest.mark.parametrize("name", NAMES)
def test_prompt_changes_output(name: str, pipes: dict[str, DiffusionPipeline]) -> None:
    pipe = pipes[name]
    kwargs = tiny_call_kwargs(name, output_type="latent")
    cat = pipe(prompt="a cat", **kwargs).images
    dog = pipe(prompt="a dog", **tiny_call_kwargs(name, output_type="latent")).images
    assert not torch.equal(cat, dog)


def test_flux2_klein_cfg_runs_cond_then_uncond() -> None:
    pipe = build_flux2_klein()
    with record_denoiser_calls(pipe) as calls:
        run(pipe, "flux2_klein", cfg=True)
    assert [context for context, _ in calls] == ["cond", "uncond", "cond", "uncond"]


def test_flux2_klein_distilled_ignores_guidance() -> None:
    pipe = build_flux2_klein(is_distilled=True)
    with record_denoiser_calls(pipe) as calls:
        images = run(pipe, "flux2_klein", cfg=True)
    assert [context for context, _ in calls] == ["cond", "cond"]
    assert images.shape == (1, 64, 64, 3)


def test_call_kwargs() -> None:
    plain = tiny_call_kwargs("flux2_klein")
    cfg = tiny_call_kwargs("flux2_klein", steps=3, size=32, seed=5, cfg=True)
    assert plain["num_inference_steps"] == 2 and plain["height"] == plain["width"] == 64
    assert plain["output_type"] == "np" and plain["guidance_scale"] == 1.0
    assert plain["text_encoder_out_layers"] == (1, 2) and plain["max_sequence_length"] == 32
    assert cfg["num_inference_steps"] == 3 and cfg["height"] == cfg["width"] == 32
    assert cfg["guidance_scale"] == 4.0
    assert torch.equal(cfg["generator"].get_state(), torch.Generator().manual_seed(5).get_state())
    assert plain["generator"] is not tiny_call_kwargs("flux2_klein")["generator"]
    assert tiny_call_kwargs("flux", cfg=True)["negative_prompt"] == ""
    assert tiny_call_kwargs("qwen_image", cfg=True)["true_cfg_scale"] == 4.0
    with pytest.raises(TypeError):
        TINY_PIPELINES["sd"].call_kwargs["guidance_scale"] = 3.0  # type: ignore[index]


def test_qwen_image_template_prefix_is_dropped_whole(pipes: dict[str, DiffusionPipeline]) -> None:
    # Qwen-Image drops the first `prompt_template_encode_start_idx` (34) tokens of its prompt
    # template: with the real tokenizer that is exactly the system prompt.
    pipe = pipes["qwen_image"]
    system = pipe.prompt_template_encode.split("{}")[0]
    ids = pipe.tokenizer(system)["input_ids"]
    assert len(ids) == pipe.prompt_template_encode_start_idx == 34
    assert pipe.tokenizer.convert_ids_to_tokens(ids[-3:]) == ["<|im_start|>", "user", "\u010a"]


def test_tokenizers() -> None:
    qwen = qwen_tokenizer()
    assert len(qwen) <= 512
    chat = qwen.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert chat.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tokens = qwen.convert_ids_to_tokens(qwen(chat)["input_ids"])
    assert tokens[-4:] == ["<think>", "\u010a\u010a", "</think>", "\u010a\u010a"]

    clip = clip_tokenizer()
    assert clip.model_max_length == 77
    assert len(clip(PROMPT, padding="max_length", max_length=77)["input_ids"]) == 77
    assert max(clip(PROMPT)["input_ids"]) < 256

    t5 = t5_tokenizer()
    ids = t5(PROMPT)["input_ids"]
    assert ids[-1] == 1 and max(ids) < 128
