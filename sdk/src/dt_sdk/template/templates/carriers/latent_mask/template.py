"""The {{ cookiecutter.name }} template plugin: validated inputs -> Template model -> a ``latent_mask`` cache.

The host finds this class through the ``diffusion_templates.templates`` entry point in
pyproject.toml, instantiates it once, and for every call that uses the template runs:

* ``encode(inputs, context)``: the Template model on the validated inputs (its representation);
* ``to_cache(representation, context)``: that representation typed as a ``LatentMaskCache``, which
  the host's ``latent_mask`` carrier encodes and re-imposes after every step of the call.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from diffusion_templates import EncodeContext, LatentMaskCache, Template, TemplateInputError

from .inputs import {{ cookiecutter.class_prefix }}Inputs
from .model import {{ cookiecutter.class_prefix }}Model

# Untrained models are initialised from this seed, so that runs are reproducible.
INIT_SEED = 0


class {{ cookiecutter.class_prefix }}Template(Template):
    Inputs = {{ cookiecutter.class_prefix }}Inputs
    Model = {{ cookiecutter.class_prefix }}Model
    # Keep both in sync with the dt-carrier:/dt-backbone: keywords in pyproject.toml (`dt list`
    # reads those without importing this module; the conformance kit checks that they agree).
    carriers = ("latent_mask",)
    backbones = ({% for b in cookiecutter._backbones %}"{{ b }}"{{ ", " if not loop.last else ("," if loop.length == 1 else "") }}{% endfor %})

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], {{ cookiecutter.class_prefix }}Model] = {}
        self._lock = threading.Lock()

    def model(
        self, inputs: {{ cookiecutter.class_prefix }}Inputs, context: EncodeContext
    ) -> {{ cookiecutter.class_prefix }}Model:
        """The Template model, built or loaded once per weights and device and then reused."""
        key = (inputs.weights, str(context.device))
        with self._lock:
            model = self._models.get(key)
            if model is None:
                if inputs.weights:
                    model = {{ cookiecutter.class_prefix }}Model.from_pretrained(inputs.weights)
                else:
                    with torch.random.fork_rng(devices=[]):
                        torch.default_generator.manual_seed(INIT_SEED)
                        model = {{ cookiecutter.class_prefix }}Model()
                model = model.to(context.device).eval()
                self._models[key] = model
        return model

    def encode(
        self, inputs: {{ cookiecutter.class_prefix }}Inputs, context: EncodeContext
    ) -> dict[str, torch.Tensor]:
        height, width = inputs.image.shape[-2:]
        multiple = context.adapter.size_multiple()
        if height % multiple or width % multiple:
            raise TemplateInputError(context.template, [(
                "image", f"{width}x{height} pixels is not a multiple of {multiple} on backbone "
                f"{context.adapter.name!r}; crop or pad image and mask first", f"{width}x{height}")])
        return self.model(inputs, context).encode(inputs, context)

    def to_cache(self, representation: dict[str, torch.Tensor], context: EncodeContext) -> LatentMaskCache:
        # Detached copies: the cache must not share storage with (or hold gradients of) the model.
        return LatentMaskCache(
            mask=representation["mask"].detach().float().clone(),
            image=representation["image"].detach().float().clone(),
            template=context.template,
        )
