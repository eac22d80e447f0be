"""The components of the shapes model, built from configs (seeded; nothing is downloaded).

- tokenizer: a byte-level BPE ``Qwen2Tokenizer`` made here, with one token per caption word and a
  ChatML chat template that accepts ``enable_thinking=False`` (what Flux2KleinPipeline renders);
- text encoder: a tiny random ``Qwen3ForCausalLM`` (frozen, seeded: it is never trained);
- VAE: ``AutoencoderKLFlux2`` with three levels (64x64 pixels -> 16x16x4 latents, 2x2-patched to
  8x8x16 for the transformer), its ``bn`` running statistics set from the data;
- transformer: ``Flux2Transformer2DModel`` (2 double + 3 single blocks, 4 heads of 32: width 128);
- scheduler: ``FlowMatchEulerDiscreteScheduler`` without resolution-dependent shifting.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
ENDOFTEXT_ID, IM_END_ID = 256, 258
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
TEXT_HIDDEN = 32
TEXT_LAYERS = 2
TEXT_ENCODER_OUT_LAYERS = (1, 2)
MAX_SEQUENCE_LENGTH = 32
VOCAB_SIZE = 512  # the tokenizer has ~370 ids


def _caption_merges() -> list[tuple[str, str]]:
    """Byte-level BPE merges learnt (deterministically) from every caption and the chat template words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from .data import all_combinations

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [a.caption for a in all_combinations()] + ["user\n", "assistant\n", "\n\n"]
    tk.train_from_iterator(corpus, trainer)
    return [tuple(m) for m in json.loads(tk.to_str())["model"]["merges"]]


def make_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE (any text works) whose merges make every caption word a single token."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    merges = _caption_merges()
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    assert len(vocab) <= VOCAB_SIZE, len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = MAX_SEQUENCE_LENGTH
    return tok


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG inside a fork: the caller's RNG state is restored on exit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_text_encoder(seed: int = 0) -> Qwen3ForCausalLM:
    with seeded(seed):
        model = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=VOCAB_SIZE,
                hidden_size=TEXT_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=TEXT_LAYERS,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=128,
                bos_token_id=ENDOFTEXT_ID,
                eos_token_id=IM_END_ID,
                pad_token_id=ENDOFTEXT_ID,
                tie_word_embeddings=True,
            )
        )
    return model.eval().requires_grad_(False)


VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels, 2x2-patched
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=TEXT_HIDDEN * len(TEXT_ENCODER_OUT_LAYERS),
    timestep_guidance_channels=128,
    axes_dims_rope=(8, 8, 8, 8),
    guidance_embeds=False,
)

SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def make_vae(seed: int = 0, **overrides: Any) -> AutoencoderKLFlux2:
    with seeded(seed):
        return AutoencoderKLFlux2(**{**VAE_CONFIG, **overrides})


def make_transformer(seed: int = 0, **overrides: Any) -> Flux2Transformer2DModel:
    with seeded(seed):
        return Flux2Transformer2DModel(**{**TRANSFORMER_CONFIG, **overrides})


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
