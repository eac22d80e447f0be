"""The {{ cookiecutter.name }} template plugin: validated inputs -> Template model -> a ``guidance`` cache.

The host finds this class through the ``diffusion_templates.templates`` entry point in
pyproject.toml, instantiates it once, and for every call that uses the template runs:

* ``encode(inputs, context)``: the Template model on the validated inputs (its representation);
* ``to_cache(representation, context)``: that representation typed as a ``GuidanceCache``, which
  the host's ``guidance`` carrier turns into a per-step correction for the duration of the call.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from diffusion_templates import EncodeContext, GuidanceCache, Template

from .inputs import {{ cookiecutter.class_prefix }}Inputs
from .model import {{ cookiecutter.class_prefix }}Model

# Untrained models are initialised from this seed, so that runs are reproducible.
INIT_SEED = 0


class {{ cookiecutter.class_prefix }}Template(Template):
    Inputs = {{ cookiecutter.class_prefix }}Inputs
    Model = {{ cookiecutter.class_prefix }}Model
    # Keep both in sync with the dt-carrier:/dt-backbone: keywords in pyproject.toml (`dt list`
    # reads those without importing this module; the conformance kit checks that they agree).
    carriers = ("guidance",)
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

    def encode(self, inputs: {{ cookiecutter.class_prefix }}Inputs, context: EncodeContext) -> dict[str, Any]:
        return self.model(inputs, context).encode(inputs, context)

    def to_cache(self, representation: dict[str, Any], context: EncodeContext) -> GuidanceCache:
        return GuidanceCache.single(
            kind=representation["kind"],
            target=float(representation["target"][0]),
            strength=float(representation["strength"][0]),
            template=context.template,
        )
