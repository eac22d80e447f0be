"""The edit template: a picture's reference-image keys/values, optionally its layout and an instruction.

For a spec ``{"template": "edit", "image": ..., ...}`` ``encode`` returns

* a ``kv`` cache: the picture's reference keys and values on every attention layer, computed by the
  host (:mod:`diffusion_templates.reference`) exactly as ``Flux2KleinKVPipeline`` extracts them, times
  the model's gains (1 untrained). The ``kv`` carrier appends them to each layer's keys/values for
  the whole call: this is ``Flux2KleinKVPipeline``'s reference conditioning, up to the order of the
  keys (it puts them between text and image tokens, the carrier after the image tokens);
* with ``strength < 1``, an ``init_latents`` cache: the cropped picture, so that generation starts
  from its noised latents and keeps its layout;
* with ``instruction``, an ``embedding`` cache: the instruction's text-encoder tokens, appended to the
  prompt's.

As a negative template (``negative_templates``) only the ``kv`` cache is produced: it puts the
reference into the unconditional branch of classifier-free guidance, as ``Flux2KleinPipeline(image=...)``
does (both of its branches see the reference tokens). ``Flux2KleinKVPipeline`` itself runs no CFG.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from diffusion_templates import (
    EmbeddingCache,
    EncodeContext,
    InitLatentsCache,
    KVCache,
    Template,
    UnsupportedError,
)

from .inputs import EditInputs
from .model import EditModel


def _demo_inputs(base_image: Any) -> dict[str, Any]:
    # strength 1: no init_latents, so that edit composes with templates that set the start (inpaint).
    return {"image": base_image}


class EditTemplate(Template):
    Inputs = EditInputs
    Model = EditModel
    carriers = ("kv", "init_latents", "embedding")
    # Reference tokens need a position scheme that sets them apart from the generated image (RoPE ids):
    # FLUX.2 and FLUX.1. SD3 (absolute positions added at the input), SDXL (no tokens) and Qwen-Image
    # (its edit model re-encodes the picture with the VL text encoder) are refused; see
    # diffusion_templates.reference.UNSUPPORTED for the reasons.
    backbones = ("flux2", "flux")
    demo_inputs = staticmethod(_demo_inputs)

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], EditModel] = {}
        self._lock = threading.Lock()

    def model(self, inputs: EditInputs, context: EncodeContext) -> EditModel:
        """The gains model for this pipeline's layers (loaded from ``weights``, or all gains 1)."""
        layers = context.adapter.attention_layers()
        layout = tuple((name, layer.heads, layer.head_dim) for name, layer in layers.items())
        key = (inputs.weights, layout, str(context.device))
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = EditModel.from_pretrained(inputs.weights) if inputs.weights else (
                    EditModel.for_attention_layers(layers))
                model = model.to(context.device).eval()
                self._models[key] = model
        return model

    def encode(self, inputs: EditInputs, context: EncodeContext) -> dict[str, Any]:
        from diffusion_templates.reference import reference_picture, unsupported_reason

        reason = unsupported_reason(context.adapter.name)
        if reason:
            raise UnsupportedError(f"template {context.template!r} on {context.adapter.name!r}: {reason}")
        representation: dict[str, Any] = {"kv": self.model(inputs, context).encode(inputs, context)}
        if context.negative:  # the reference only: init latents and instructions belong to the cond side
            return representation
        if inputs.strength < 1.0:
            representation["init"] = reference_picture(context.adapter, inputs.image)
            representation["strength"] = inputs.strength
        if inputs.instruction:
            representation["tokens"] = instruction_tokens(context, inputs.instruction)
        return representation

    def to_cache(self, representation: dict[str, Any], context: EncodeContext) -> list[Any]:
        kv = representation["kv"]
        caches: list[Any] = [KVCache(keys=kv["keys"], values=kv["values"], template=context.template)]
        if "init" in representation:
            caches.append(InitLatentsCache(
                strength=representation["strength"], image=representation["init"], template=context.template
            ))
        if "tokens" in representation:
            caches.append(EmbeddingCache(tokens=representation["tokens"], template=context.template))
        return caches


# --------------------------------------------------------------------------- the instruction


def _flux2_text_layers(pipe: Any) -> tuple[int, ...]:
    """Which text-encoder hidden states FLUX.2 klein stacks: its default (9, 18, 27) when the encoder has
    them and the transformer's width matches, else every layer when their count matches the width."""
    hidden = pipe.text_encoder.config.hidden_size
    width = pipe.transformer.config.joint_attention_dim
    count = width // hidden
    layers = pipe.text_encoder.config.num_hidden_layers
    if count * hidden != width:
        raise UnsupportedError(
            f"edit: the FLUX.2 transformer's text width {width} is not a multiple of the text encoder's "
            f"{hidden}; pass the instruction as the prompt instead"
        )
    if count == 3 and layers >= 27:
        return (9, 18, 27)  # Flux2KleinPipeline's default text_encoder_out_layers
    if count == layers:
        return tuple(range(1, layers + 1))
    raise UnsupportedError(
        f"edit: cannot tell which {count} of the text encoder's {layers} layers this FLUX.2 pipeline stacks; "
        "pass the instruction as the prompt instead"
    )


@torch.no_grad()
def instruction_tokens(context: EncodeContext, instruction: str) -> torch.Tensor:
    """The instruction as the pipeline's text encoder encodes a prompt, without padding: (1, L, D)."""
    pipe = context.pipe
    device = pipe._execution_device
    if context.adapter.name == "flux2":
        tokenizer = pipe.tokenizer
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True,
            enable_thinking=False,
        )
        length = len(tokenizer(text)["input_ids"])
        return pipe._get_qwen3_prompt_embeds(
            text_encoder=pipe.text_encoder, tokenizer=tokenizer, prompt=instruction, device=device,
            max_sequence_length=length, hidden_states_layers=_flux2_text_layers(pipe),
        )
    # FLUX.1: the T5 tokens FluxPipeline encodes its prompt into (no padding).
    length = len(pipe.tokenizer_2(instruction)["input_ids"])
    return pipe._get_t5_prompt_embeds(prompt=instruction, max_sequence_length=length, device=device)
