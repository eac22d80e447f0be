"""The ``depth`` template: a depth map drives a diffusers ControlNet through the ``residual`` carrier.

``encode`` is the Template model's forward: it turns the control image into the depth map (running a
local transformers depth-estimation model first when ``depth_model`` is given) and runs the image
processor step of the backbone's diffusers ControlNet pipeline (the adapter's
``preprocess_control_image``). ``to_cache`` types that as a :class:`ResidualCache` entry with
``prepare=True``, the ControlNet, its scale and its step window. The rest of diffusers' preparation
depends on the call (one VAE sample per image, and on SD3 per CFG half), so the residual carrier does
it for each call with the adapter's ``prepare_control_image``; it then runs the ControlNet at every
denoiser call and adds its residuals.

Backbones: FLUX.1, SD3/3.5, Qwen-Image and SDXL, the families whose diffusers denoiser takes ControlNet
residuals. FLUX.2 is refused: diffusers' Flux2Transformer2DModel takes no ControlNet residuals and there
is no FLUX.2 ControlNet or ControlNet pipeline.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from diffusion_templates import EncodeContext, Template, TemplateError, UnsupportedError
from diffusion_templates.carriers.residual import ResidualCache, ResidualEntry

from .inputs import DepthInputs

#: Why a backbone is not in ``DepthTemplate.backbones``.
REFUSED = {
    "flux2": "diffusers' Flux2Transformer2DModel takes no ControlNet residuals and there is no FLUX.2 "
    "ControlNet (or ControlNet pipeline) to drive",
}


def demo_inputs(base_image: Image.Image) -> dict[str, Any]:
    """``dt demo``: the base picture's luminance as a stand-in depth map. The ControlNet comes from
    ``DT_DEPTH_CONTROLNET`` (a folder or hub id fitting the demo's backbone); the default names an SDXL
    depth ControlNet. On the FLUX.2 demo model the template is refused (see ``REFUSED``)."""
    import os

    return {
        "control_image": base_image.convert("L"),
        "controlnet": os.environ.get("DT_DEPTH_CONTROLNET", "diffusers/controlnet-depth-sdxl-1.0"),
    }


class DepthTemplate(Template):
    Inputs = DepthInputs
    # Keep both in sync with the dt-carrier:/dt-backbone: keywords in pyproject.toml.
    carriers = ("residual",)
    backbones = ("flux", "sd3", "qwen_image", "sdxl")
    refused = REFUSED
    demo_inputs = staticmethod(demo_inputs)

    def __init__(self) -> None:
        self._controlnets: dict[tuple[str, ...], torch.nn.Module] = {}
        self._estimators: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    # -- the two models: the ControlNet and, optionally, the depth estimator -------------------------------
    def controlnet(self, source: str, context: EncodeContext) -> torch.nn.Module:
        """The backbone's ControlNet class, loaded once per (source, device, dtype), safetensors only."""
        import diffusers

        adapter = context.adapter
        klass = getattr(diffusers, adapter.controlnet_classes[0])
        key = (source, klass.__name__, str(adapter.device), str(adapter.dtype))
        with self._lock:
            module = self._controlnets.get(key)
            if module is None:
                try:
                    module = klass.from_pretrained(source, torch_dtype=adapter.dtype, use_safetensors=True)
                except Exception as exc:
                    raise TemplateError(
                        f"template {context.template!r}: cannot load {klass.__name__} (the ControlNet "
                        f"class of backbone {adapter.name!r}) from {source!r}: {exc}"
                    ) from exc
                module = module.to(adapter.device).eval()
                self._controlnets[key] = module
        return module

    def estimator(self, folder: str, context: EncodeContext) -> Any:
        """transformers' ``depth-estimation`` pipeline on a local model folder (built once per device)."""
        key = (folder, str(context.device))
        with self._lock:
            estimator = self._estimators.get(key)
            if estimator is None:
                from transformers import pipeline

                try:
                    estimator = pipeline(
                        "depth-estimation",
                        model=folder,
                        device=context.device,
                        trust_remote_code=False,
                        model_kwargs={"use_safetensors": True},
                    )
                except Exception as exc:
                    raise TemplateError(
                        f"template {context.template!r}: cannot load a transformers depth-estimation "
                        f"model from {folder!r}: {exc}"
                    ) from exc
                self._estimators[key] = estimator
        return estimator

    # -- preprocessing ---------------------------------------------------------------------------------
    def depth_map(self, inputs: DepthInputs, context: EncodeContext) -> Image.Image | np.ndarray:
        """The depth map as the ControlNet pipelines take it: a PIL RGB image, or a float (H, W, 3) array."""
        picture = inputs.control_image
        if inputs.depth_model is not None:
            if isinstance(picture, np.ndarray):
                picture = Image.fromarray(np.round(picture * 255).astype(np.uint8))
            with torch.no_grad():
                picture = self.estimator(inputs.depth_model, context)(picture.convert("RGB"))["depth"]
        if inputs.invert:
            picture = 1.0 - picture if isinstance(picture, np.ndarray) else ImageOps.invert(picture)
        if isinstance(picture, np.ndarray):
            return np.repeat(picture[..., None], 3, axis=-1) if picture.ndim == 2 else picture
        return picture.convert("RGB")

    def size(
        self, inputs: DepthInputs, picture: Image.Image | np.ndarray, context: EncodeContext
    ) -> tuple[int, int]:
        if isinstance(picture, np.ndarray):
            height, width = picture.shape[:2]
        else:
            width, height = picture.size
        size_multiple = getattr(context.adapter, "size_multiple", None)
        multiple = size_multiple() if callable(size_multiple) else 8
        height = inputs.height or max(multiple, height // multiple * multiple)
        width = inputs.width or max(multiple, width // multiple * multiple)
        return int(height), int(width)

    # -- the hooks -------------------------------------------------------------------------------------------
    def encode(self, inputs: DepthInputs, context: EncodeContext) -> dict[str, Any]:
        adapter = context.adapter
        name = context.template
        if not hasattr(adapter, "prepare_control_image") or "residual" not in adapter.carriers:
            reason = REFUSED.get(adapter.name, "its adapter does not support the residual carrier")
            raise UnsupportedError(f"template {name!r} cannot drive backbone {adapter.name!r}: {reason}")
        if inputs.cfg_samples and adapter.name != "sd3":
            raise UnsupportedError(
                f"template {name!r}: cfg_samples applies to SD3 only, not {adapter.name!r}"
            )
        for option in ("guess_mode", "control_mode"):
            if getattr(inputs, option) not in (None, False) and option not in adapter.residual_options:
                raise UnsupportedError(
                    f"template {name!r}: {option} does not apply to backbone {adapter.name!r} "
                    f"(it applies to {'SDXL' if option == 'guess_mode' else 'FLUX.1 union ControlNets'})"
                )
        controlnet = self.controlnet(inputs.controlnet, context)
        entry = self._entry(inputs, controlnet)
        try:
            adapter.check_controlnet(controlnet, entry)
        except TemplateError as exc:
            raise TemplateError(f"template {name!r}, controlnet {inputs.controlnet!r}: {exc}") from None
        picture = self.depth_map(inputs, context)
        height, width = self.size(inputs, picture, context)
        if isinstance(picture, np.ndarray):
            picture = picture[None]  # (1, H, W, 3): what diffusers' image processors take
        control = adapter.preprocess_control_image(picture, height=height, width=width)
        return {"control": control, "entry": entry}

    def to_cache(self, representation: dict[str, Any], context: EncodeContext) -> ResidualCache:
        return ResidualCache(
            entries=[representation["entry"]],
            control={"0": representation["control"].detach().clone()},
            template=context.template,
        )

    @staticmethod
    def _entry(inputs: DepthInputs, controlnet: torch.nn.Module) -> ResidualEntry:
        # Both the source (saved with the cache, reloaded by the carrier) and the loaded module (so that the
        # carrier does not load it a second time in this process).
        generator = inputs.generator
        seeded = isinstance(generator, int) and not isinstance(generator, bool)
        return ResidualEntry(
            controlnet=inputs.controlnet,
            module=controlnet,
            conditioning_scale=inputs.conditioning_scale,
            start=inputs.start,
            end=inputs.end,
            guess_mode=inputs.guess_mode,
            control_mode=inputs.control_mode,
            prepare=True,  # per call: one VAE sample per image (and per CFG half on SD3), as diffusers
            seed=generator if seeded else None,
            generator=None if seeded else generator,
        )
