"""Diffusion Templates: controllable-generation plugins for diffusers pipelines.

Importing this package is cheap: torch and diffusers load only when a runtime name below is used,
so that ``dt list`` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "TemplatePipeline": "pipeline",
    "TemplateCache": "cache",
    "Template": "template",
    "TemplateInputs": "template",
    "TemplateModel": "template",
    "Injection": "injection",
    "Carrier": "carriers.base",
    "BackboneAdapter": "backbones.base",
    "AttentionLayer": "backbones.base",
    "KVCache": "carriers.kv",
    "LoraCache": "carriers.lora",
    "ResidualCache": "carriers.residual",
    "EmbeddingCache": "carriers.embedding",
    "LatentMaskCache": "carriers.latent_mask",
    "InitLatentsCache": "carriers.init_latents",
    "GuidanceCache": "carriers.guidance",
    "EncodeContext": "context",
    "InjectionTarget": "context",
    "CallState": "context",
}

from .errors import (  # noqa: E402  (errors import nothing heavy)
    CacheError,
    CarrierConflictError,
    PluginError,
    TemplateError,
    TemplateInputError,
    UnknownTemplateError,
    UnsupportedError,
)
from .hookspecs import hookimpl  # noqa: E402

__all__ = [
    *_LAZY,
    "hookimpl",
    "CacheError",
    "CarrierConflictError",
    "PluginError",
    "TemplateError",
    "TemplateInputError",
    "UnknownTemplateError",
    "UnsupportedError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
