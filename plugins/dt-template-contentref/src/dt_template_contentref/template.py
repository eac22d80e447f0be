"""The contentref template: a picture's reference keys/values, attenuated by ``scale``, no layout.

For ``{"template": "contentref", "image": ..., "scale": s}`` ``encode`` returns one ``kv`` cache: the
picture's reference keys and values on every attention layer, computed by the host
(:mod:`diffusion_templates.reference`) exactly as ``Flux2KleinKVPipeline`` extracts them, with the
values multiplied by ``scale`` (and the model's gains, 1 untrained). Unlike ``edit`` it never starts
from the picture's latents: the generated image borrows the reference's content through attention,
not its layout. ``scale=0`` gives an empty kv cache (no layers), so the call is bit-identical to one
without the template.

In ``templates`` only, the reference conditions the conditional branch of CFG (CFG then amplifies it
by the guidance scale); listed in ``negative_templates`` too, both branches see it, as
``Flux2KleinPipeline(image=...)`` conditions both.
"""

from __future__ import annotations

import threading
from typing import Any

from diffusion_templates import EncodeContext, KVCache, Template, UnsupportedError

from .inputs import ContentRefInputs
from .model import ContentRefModel


def _demo_inputs(base_image: Any) -> dict[str, Any]:
    return {"image": base_image, "scale": 1.0}


class ContentRefTemplate(Template):
    Inputs = ContentRefInputs
    Model = ContentRefModel
    carriers = ("kv",)
    # Reference tokens need a position scheme that sets them apart from the generated image (RoPE ids):
    # FLUX.2 and FLUX.1. SD3 (absolute positions added at the input), SDXL (no tokens) and Qwen-Image
    # (its edit model re-encodes the picture with the VL text encoder) are refused; see
    # diffusion_templates.reference.UNSUPPORTED for the reasons.
    backbones = ("flux2", "flux")
    demo_inputs = staticmethod(_demo_inputs)

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], ContentRefModel] = {}
        self._lock = threading.Lock()

    def model(self, inputs: ContentRefInputs, context: EncodeContext) -> ContentRefModel:
        """The gains model for this pipeline's layers (loaded from ``weights``, or all gains 1)."""
        layers = context.adapter.attention_layers()
        layout = tuple((name, layer.heads, layer.head_dim) for name, layer in layers.items())
        key = (inputs.weights, layout, str(context.device))
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = ContentRefModel.from_pretrained(inputs.weights) if inputs.weights else (
                    ContentRefModel.for_attention_layers(layers))
                model = model.to(context.device).eval()
                self._models[key] = model
        return model

    def encode(self, inputs: ContentRefInputs, context: EncodeContext) -> dict[str, Any]:
        from diffusion_templates.reference import unsupported_reason

        reason = unsupported_reason(context.adapter.name)
        if reason:
            raise UnsupportedError(f"template {context.template!r} on {context.adapter.name!r}: {reason}")
        if inputs.scale == 0:  # no reference: no keys, no capture
            return {"keys": {}, "values": {}}
        return self.model(inputs, context).encode(inputs, context)

    def to_cache(self, representation: dict[str, Any], context: EncodeContext) -> KVCache:
        return KVCache(
            keys=representation["keys"], values=representation["values"], template=context.template
        )
