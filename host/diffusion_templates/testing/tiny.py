"""Tiny diffusers pipelines with random weights, built offline, for fast deterministic tests.

Every builder makes a complete pipeline (tokenizers, text encoders, denoiser, VAE, scheduler)
small enough that a 2-step 64x64 call takes a few hundredths of a second on a CPU. Nothing is
downloaded: weights are random, tokenizers are made in memory from a byte-level or
character vocabulary.

Builders are seeded with a forked CPU RNG, so two builds with the same seed are bit-identical
and the caller's global RNG state is left untouched. Every ``nn.Module`` component is cast to
the requested dtype and put in ``eval()`` mode (models made from a config start in train mode,
and T5's dropout would otherwise make two equal calls differ). Progress bars are disabled.

``TINY_PIPELINES`` maps a family name to a :class:`TinySpec`; :func:`tiny_call_kwargs` gives
the keyword arguments of a fast deterministic call::

    spec = TINY_PIPELINES["flux2_klein"]
    pipe = spec.build()
    images = pipe(prompt="a cat", **tiny_call_kwargs("flux2_klein", cfg=True)).images
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

__all__ = [
    "TINY_PIPELINES",
    "TinySpec",
    "build_flux",
    "build_flux2_klein",
    "build_qwen_image",
    "build_sd",
    "build_sd3",
    "build_sdxl",
    "clip_tokenizer",
    "qwen_tokenizer",
    "t5_tokenizer",
    "tiny_call_kwargs",
]

# --------------------------------------------------------------------------- tokenizers

_QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Ids of the Qwen special tokens: they follow the 256 byte-level symbols.
_QWEN_ENDOFTEXT_ID = 256
_QWEN_IM_END_ID = 258
# Whole-word BPE tokens, as in the real Qwen vocabulary. Qwen-Image drops the first 34 tokens
# of its prompt template (the system prompt); these words make the tiny tokenizer produce
# exactly those 34 tokens, so the user prompt survives and `max_sequence_length` stays small.
_QWEN_WORDS = (
    "system", "user", "assistant", "\n\n",
    "Describe", " the", " image", " by", " detailing", " color", " shape", " size", " texture", " quantity",
    " text", " spatial", " relationships", " of", " objects", " and", " background",
)  # fmt: skip
# Text-encoder vocabulary for Qwen models: covers the ~370 tokenizer ids, plus room for the
# Qwen2.5-VL vision token ids (500-504).
_QWEN_VOCAB_SIZE = 512

# Flux2Klein renders the prompt with `enable_thinking=False`, Qwen-Image applies its own
# prompt template; this minimal ChatML template accepts both.
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

# CLIP pipelines read `tokenizer.model_max_length` to pad prompts (77 in real checkpoints).
_CLIP_MAX_LENGTH = 77


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer (~370 ids, a few whole words) with a minimal ChatML chat template."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    for token in _QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    merges: dict[tuple[str, str], None] = {}  # ordered set
    for word in _QWEN_WORDS:
        word = word.replace(" ", "\u0120").replace("\n", "\u010a")  # byte-level spellings of space, newline
        for i in range(1, len(word)):  # grow each word left to right, one symbol per merge
            merges[(word[:i], word[i])] = None
            vocab.setdefault(word[: i + 1], len(vocab))
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=list(merges), unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<think>", "</think>"])  # already in the vocabulary; keeps them whole
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


def clip_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer (~190 ids, pad = eos = ``<|endoftext|>``), model_max_length 77."""
    letters = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *letters, *(ch + "</w>" for ch in letters)]:
        vocab.setdefault(token, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = _CLIP_MAX_LENGTH
    return tok


def t5_tokenizer() -> T5TokenizerFast:
    """A character-level Unigram T5 tokenizer (~124 ids, pad 0, eos 1)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(33, 127)]
    pieces += [("\u2581" + chr(c), -1.5) for c in range(97, 123)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


# --------------------------------------------------------------------------- shared parts

# Four 8-channel levels: vae_scale_factor 8, like the real VAEs.
_VAE_LEVELS: dict[str, Any] = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    norm_num_groups=4,
)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG inside a fork, so the caller's RNG state is restored on exit.

    Only the CPU default generator is seeded (``torch.manual_seed`` would also reseed CUDA,
    which ``fork_rng(devices=[])`` would not restore); all tiny models are built on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _finish(pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
    """Cast every module component to ``dtype``, switch it to eval mode, silence progress bars.

    Everything is cast, including T5's ``wo`` layers that ``from_pretrained(torch_dtype=...)``
    would keep in float32 (``_keep_in_fp32_modules``).
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            # Plain `nn.Module.to`: diffusers 0.42 `ModelMixin.to(dtype)` warns about "modules that
            # should be kept in float32: []" on every cast, even with an empty list.
            torch.nn.Module.to(component, dtype=dtype)
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip_text_config(hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=256,
        projection_dim=projection_dim,
        max_position_embeddings=_CLIP_MAX_LENGTH,
    )


def _t5_encoder(d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=128,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def _autoencoder_kl(**kwargs: Any) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, **_VAE_LEVELS, **kwargs
    )


def _flow_vae() -> AutoencoderKL:
    """The KL VAE of Flux and SD3 (no quant convs, shift and scale factors set)."""
    return _autoencoder_kl(
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035
    )


def _sd_scheduler() -> EulerDiscreteScheduler:
    """Euler with the Stable Diffusion 1.x / XL noise schedule."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


# --------------------------------------------------------------------------- builders


def build_flux2_klein(
    is_distilled: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Flux2KleinPipeline:
    """A tiny FLUX.2 [klein] pipeline (Qwen3 text encoder, 2+2 transformer blocks).

    Calls need ``text_encoder_out_layers=(1, 2)`` (the text encoder has 2 layers). With
    ``is_distilled=False`` (the "base" model) ``guidance_scale > 1`` runs real CFG, one
    transformer call per branch under ``cache_context("cond")`` / ``("uncond")``.
    """
    with _seeded(seed):
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=_QWEN_VOCAB_SIZE,
                hidden_size=16,
                intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=512,
                bos_token_id=_QWEN_ENDOFTEXT_ID,
                eos_token_id=_QWEN_IM_END_ID,
            )
        )
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # text hidden size 16 x 2 output layers
            timestep_guidance_channels=256,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        )
        vae = AutoencoderKLFlux2(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            sample_size=64,
            **_VAE_LEVELS,
        )
        pipe = Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=qwen_tokenizer(),
            transformer=transformer,
            is_distilled=is_distilled,
        )
    return _finish(pipe, dtype)


def build_flux(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """A tiny FLUX.1 [dev]-style pipeline (CLIP + T5, guidance embedding, 2+2 transformer blocks).

    Real CFG needs ``true_cfg_scale > 1`` and a ``negative_prompt``; it runs one transformer
    call per branch under ``cache_context("cond")`` / ``("uncond")``.
    """
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 d_model
            pooled_projection_dim=32,  # CLIP hidden size
            axes_dims_rope=(4, 4, 8),
            guidance_embeds=True,
        )
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_flow_vae(),
            text_encoder=CLIPTextModel(_clip_text_config()),
            tokenizer=clip_tokenizer(),
            text_encoder_2=_t5_encoder(32),
            tokenizer_2=t5_tokenizer(),
            transformer=transformer,
        )
    return _finish(pipe, dtype)


def build_sd3(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """A tiny Stable Diffusion 3 pipeline (2 CLIPs + T5, 2 MMDiT blocks).

    CFG (``guidance_scale > 1``) is batched: one transformer call on ``cat([uncond, cond])``.
    """
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=64,  # T5 d_model (CLIP states 32 + 32 are padded to it)
            pooled_projection_dim=64,  # sum of the two CLIP projections
            out_channels=4,
        )
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_flow_vae(),
            transformer=transformer,
            text_encoder=CLIPTextModelWithProjection(_clip_text_config()),
            tokenizer=clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config()),
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=_t5_encoder(64),
            tokenizer_3=t5_tokenizer(),
        )
    return _finish(pipe, dtype)


def build_qwen_image(seed: int = 0, dtype: torch.dtype = torch.float32) -> QwenImagePipeline:
    """A tiny Qwen-Image pipeline (Qwen2.5-VL text encoder, 2 transformer blocks, Wan-style VAE).

    Real CFG needs ``true_cfg_scale > 1`` and a ``negative_prompt``; it runs one transformer
    call per branch under ``cache_context("cond")`` / ``("uncond")``.
    """
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,  # 4 latent channels packed 2x2
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=3,
            joint_attention_dim=16,  # text hidden size
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        )
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        )
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=_QWEN_VOCAB_SIZE,
                hidden_size=16,
                intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                bos_token_id=_QWEN_ENDOFTEXT_ID,
                eos_token_id=_QWEN_IM_END_ID,
            ),
            vision_config=dict(
                depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16
            ),
            # Vision ids must lie inside the vocabulary and away from the tokenizer's ids.
            vision_start_token_id=500,
            vision_end_token_id=501,
            vision_token_id=502,
            image_token_id=503,
            video_token_id=504,
        )
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=Qwen2_5_VLForConditionalGeneration(config),
            tokenizer=qwen_tokenizer(),
            transformer=transformer,
        )
    return _finish(pipe, dtype)


def build_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """A tiny Stable Diffusion XL pipeline (2 CLIPs, 2-level UNet with text-time embedding).

    CFG (``guidance_scale > 1``) is batched: one UNet call on ``cat([uncond, cond])``.
    """
    with _seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,  # CLIP hidden sizes 32 + 32
            norm_num_groups=4,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # pooled 32 + 6 time ids x 8
        )
        pipe = StableDiffusionXLPipeline(
            vae=_autoencoder_kl(),
            text_encoder=CLIPTextModel(_clip_text_config()),
            tokenizer=clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config()),
            tokenizer_2=clip_tokenizer(),
            unet=unet,
            scheduler=_sd_scheduler(),
        )
    return _finish(pipe, dtype)


def build_sd(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A tiny Stable Diffusion 1.x pipeline (CLIP, 2-level UNet, no safety checker).

    CFG (``guidance_scale > 1``) is batched: one UNet call on ``cat([uncond, cond])``.
    """
    with _seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,  # CLIP hidden size
            norm_num_groups=4,
            attention_head_dim=4,
        )
        pipe = StableDiffusionPipeline(
            vae=_autoencoder_kl(),
            text_encoder=CLIPTextModel(_clip_text_config()),
            tokenizer=clip_tokenizer(),
            unet=unet,
            scheduler=_sd_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return _finish(pipe, dtype)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TinySpec:
    """How to build one tiny pipeline family and call it.

    ``build`` accepts ``seed`` and ``dtype`` keywords. ``call_kwargs`` are needed by every call
    (they also switch guidance off where the pipeline's default would run CFG); ``cfg_kwargs``,
    applied on top, turn real classifier-free guidance on.
    """

    build: Callable[..., DiffusionPipeline]
    call_kwargs: Mapping[str, Any]
    cfg_kwargs: Mapping[str, Any]

    def __post_init__(self) -> None:
        # Read-only views: the registry is shared by every test.
        object.__setattr__(self, "call_kwargs", MappingProxyType(dict(self.call_kwargs)))
        object.__setattr__(self, "cfg_kwargs", MappingProxyType(dict(self.cfg_kwargs)))


TINY_PIPELINES: dict[str, TinySpec] = {
    "flux2_klein": TinySpec(
        build=build_flux2_klein,
        call_kwargs={"max_sequence_length": 32, "text_encoder_out_layers": (1, 2), "guidance_scale": 1.0},
        cfg_kwargs={"guidance_scale": 4.0},
    ),
    "flux": TinySpec(
        build=build_flux,
        call_kwargs={"max_sequence_length": 32},
        cfg_kwargs={"true_cfg_scale": 4.0, "negative_prompt": ""},
    ),
    "sd3": TinySpec(
        build=build_sd3,
        call_kwargs={"max_sequence_length": 32, "guidance_scale": 1.0},
        cfg_kwargs={"guidance_scale": 5.0},
    ),
    "qwen_image": TinySpec(
        build=build_qwen_image,
        call_kwargs={"max_sequence_length": 64, "true_cfg_scale": 1.0},
        cfg_kwargs={"true_cfg_scale": 4.0, "negative_prompt": " "},
    ),
    "sdxl": TinySpec(
        build=build_sdxl,
        call_kwargs={"guidance_scale": 1.0},
        cfg_kwargs={"guidance_scale": 5.0},
    ),
    "sd": TinySpec(
        build=build_sd,
        call_kwargs={"guidance_scale": 1.0},
        cfg_kwargs={"guidance_scale": 5.0},
    ),
}


def tiny_call_kwargs(
    name: str,
    *,
    steps: int = 2,
    size: int = 64,
    seed: int = 0,
    cfg: bool = False,
    output_type: str = "np",
) -> dict[str, Any]:
    """Keyword arguments (all but the prompt) for a fast deterministic call of ``TINY_PIPELINES[name]``.

    Each call gets a fresh ``torch.Generator`` seeded with ``seed``; with ``cfg=True`` the
    spec's ``cfg_kwargs`` are applied on top of its ``call_kwargs``.
    """
    spec = TINY_PIPELINES[name]
    kwargs: dict[str, Any] = {
        "num_inference_steps": steps,
        "height": size,
        "width": size,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": output_type,
        **spec.call_kwargs,
    }
    if cfg:
        kwargs.update(spec.cfg_kwargs)
    return kwargs
