"""The {{ cookiecutter.name }} template plugin: validated inputs -> Template model -> a ``residual`` cache.

The host finds this class through the ``diffusion_templates.templates`` entry point in
pyproject.toml, instantiates it once, and for every call that uses the template runs:

* ``encode(inputs, context)``: the Template model on the validated inputs (its representation);
* ``to_cache(representation, context)``: that representation typed as a ``ResidualCache`` of
  static residuals, which the host's ``residual`` carrier adds to the denoiser's blocks for the
  duration of the call.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch
from diffusion_templates import EncodeContext, ResidualCache, Template

from .inputs import {{ cookiecutter.class_prefix }}Inputs
from .model import {{ cookiecutter.class_prefix }}Model

# Untrained models are initialised from this seed, so that runs are reproducible.
INIT_SEED = 0


class {{ cookiecutter.class_prefix }}Template(Template):
    Inputs = {{ cookiecutter.class_prefix }}Inputs
    Model = {{ cookiecutter.class_prefix }}Model
    # Keep both in sync with the dt-carrier:/dt-backbone: keywords in pyproject.toml (`dt list`
    # reads those without importing this module; the conformance kit checks that they agree).
    # Backbones whose adapters support the residual carrier with (tokens, dim) residuals (FLUX.2
    # has no ControlNet path).
    carriers = ("residual",)
    backbones = ({% for b in cookiecutter._carrier_backbones.get(cookiecutter.carrier) or cookiecutter._backbones %}"{{ b }}"{{ ", " if not loop.last else ("," if loop.length == 1 else "") }}{% endfor %})

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], {{ cookiecutter.class_prefix }}Model] = {}
        self._lock = threading.Lock()

    def model(
        self, inputs: {{ cookiecutter.class_prefix }}Inputs, context: EncodeContext
    ) -> {{ cookiecutter.class_prefix }}Model:
        """The Template model for this pipeline, built or loaded once and then reused.

        With ``weights`` it is loaded from that folder (safetensors + config.json only). Without,
        it is an untrained model sized for the pipeline's block groups.
        """
        adapter = context.adapter
        slots = {group: [s.blocks, adapter.residual_shape(group, 0, None, None)[-1]]
                 for group, s in adapter.residual_slots().items()}
        key = (inputs.weights, json.dumps(slots), str(context.device))
        with self._lock:
            model = self._models.get(key)
            if model is None:
                if inputs.weights:
                    model = {{ cookiecutter.class_prefix }}Model.from_pretrained(inputs.weights)
                else:
                    with torch.random.fork_rng(devices=[]):
                        torch.default_generator.manual_seed(INIT_SEED)
                        model = {{ cookiecutter.class_prefix }}Model.for_adapter(adapter)
                model = model.to(context.device).eval()
                self._models[key] = model
        return model

    def encode(self, inputs: {{ cookiecutter.class_prefix }}Inputs, context: EncodeContext) -> dict[str, Any]:
        return self.model(inputs, context).encode(inputs, context)

    def to_cache(
        self, representation: dict[str, list[torch.Tensor]], context: EncodeContext
    ) -> ResidualCache:
        # Detached copies: the cache must not share storage with (or hold gradients of) the model.
        return ResidualCache.from_residuals(
            {group: [t.detach().clone() for t in tensors] for group, tensors in representation.items()},
            template=context.template,
        )
