"""The ``aesthetic`` template: a bank of LoRA files merged exactly and applied unfused (lora carrier).

``encode`` reads every LoRA file of the spec (diffusers, PEFT or kohya format, see ``lora_files``), turns
each into a :class:`LoraCache` scaled by its weight (``merge="mean"``: weight / n), and merges them with
the lora carrier's own exact merge: a module in one LoRA keeps its factors and scaling; a module in several
gets their ranks concatenated with each scaling folded into its B, so the applied delta is exactly
``sum_i w_i * scaling_i * B_i A_i`` per module, whatever modules the LoRAs target (diffusers'
``set_adapters(weights=...)``). The carrier adds it at run time; weights are never written.

This is the paper's "aesthetic alignment" (a bank of LoRAs merged per call), with the LoRAs as files.
"""

from __future__ import annotations

from typing import Any

from diffusion_templates import EncodeContext, LoraCache, Template
from diffusion_templates.carriers.lora import LoraCarrier

from .inputs import AestheticInputs
from .lora_files import LoraFileError, load_lora


class AestheticTemplate(Template):
    Inputs = AestheticInputs
    # Keep both in sync with the dt-carrier:/dt-backbone: keywords in pyproject.toml.
    carriers = ("lora",)
    backbones = ("flux", "flux2", "qwen_image", "sd3", "sdxl")
    # The LoRA files are the caches (keyed by content through ``LoraSpec.signature``); the denoiser is
    # read for its module names and shapes only, which its config already keys.
    reads = ()
    #: ``dt demo``: the files in DT_AESTHETIC_LORAS (paths separated by os.pathsep) when set; else the
    #: shipped ``shapes-high-key`` LoRA (trained for the dt-base-shapes demo model by ``shapes.py``; on
    #: another base model its modules do not fit and the demo reports it as skipped).
    demo_inputs = staticmethod(lambda base_image: {"loras": _demo_loras()})

    def encode(self, inputs: AestheticInputs, context: EncodeContext) -> dict[str, Any]:
        """Each LoRA as a weighted cache (the representation: one cache per file, and what was skipped)."""
        count = len(inputs.loras)
        caches, skipped = [], {}
        for spec in inputs.loras:
            weight = spec.weight / count if inputs.merge == "mean" else spec.weight
            cache, left_out = load_lora(
                spec.path,
                context.adapter,
                weight=weight,
                alpha=spec.alpha,
                skip_unsupported=inputs.skip_unsupported,
                template=context.template,
            )
            if cache is not None:
                caches.append(cache)
            if left_out:
                skipped[spec.path] = left_out
        if not caches:
            raise LoraFileError(
                f"template {context.template!r}: no LoRA layer applies to the denoiser of backbone "
                f"{context.adapter.name!r} (skipped: {skipped})"
            )
        return {"caches": caches, "skipped": skipped}

    def to_cache(self, representation: dict[str, Any], context: EncodeContext) -> LoraCache:
        caches = representation["caches"]
        merged = caches[0] if len(caches) == 1 else LoraCarrier().merge_caches(caches)
        return merged.model_copy(update={"template": context.template})


def _demo_loras() -> list[str]:
    """DT_AESTHETIC_LORAS' files, else the shipped shapes-high-key LoRA."""
    import os

    from .shapes import SHIPPED  # a constant: importing shapes imports nothing heavy

    value = os.environ.get("DT_AESTHETIC_LORAS", "")
    return [p for p in value.split(os.pathsep) if p] or [str(SHIPPED)]
