"""What a template plugin is made of: an input schema, a Template model, the two template hooks.

:class:`Template` is the convenience base most plugins subclass: set ``Inputs`` (a pydantic model),
``carriers`` and ``backbones``, implement :meth:`Template.encode` (inputs -> representation) and
optionally :meth:`Template.to_cache`. A plugin may instead be any object or module with ``Inputs``
and ``encode``/``to_cache`` hookimpls.

:class:`TemplateModel` is the base of trainable Template models, following diffusers' ``ModelMixin``
/ ``ConfigMixin`` conventions (``save_pretrained``/``from_pretrained``, safetensors + config.json).
Its work is split as the paper's two-stage training needs: :meth:`TemplateModel.process_inputs`
(no gradient: preprocessing, calls into the frozen base pipeline) and ``forward`` (differentiable).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import ConfigMixin, ModelMixin
from pydantic import BaseModel, ConfigDict

from .errors import TemplateError
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .cache import TemplateCache
    from .context import EncodeContext


class TemplateInputs(BaseModel):
    """Base for input schemas: unknown fields are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


class Template:
    """Base class of template plugins: binds the ``encode``/``to_cache`` hooks to methods."""

    Inputs: ClassVar[type[BaseModel]] = TemplateInputs
    carriers: ClassVar[tuple[str, ...]] = ()
    backbones: ClassVar[tuple[str, ...]] = ("*",)  # adapter names, or "*" for any adapter with the carriers
    #: Pipeline components whose weights ``encode`` reads (names as in ``pipe.components``;
    #: ``"denoiser"`` is the adapter's denoiser): the cache store keys entries by their content. ``None``
    #: (default): every component; ``()``: none, the caches follow from the inputs alone.
    reads: ClassVar[tuple[str, ...] | None] = None

    @hookimpl(specname="encode")
    def _encode_hook(self, template: str, inputs: BaseModel, context: EncodeContext) -> Any:
        return self.encode(inputs, context)

    @hookimpl(specname="to_cache")
    def _to_cache_hook(self, template: str, representation: Any, context: EncodeContext):
        return self.to_cache(representation, context)

    def encode(self, inputs: BaseModel, context: EncodeContext) -> Any:
        raise NotImplementedError

    def to_cache(self, representation: Any, context: EncodeContext) -> TemplateCache | list[TemplateCache]:
        """Default: ``encode`` already returned cache(s)."""
        return representation


class TemplateModel(ModelMixin, ConfigMixin):
    """Base of Template models. Subclasses use ``@register_to_config`` on ``__init__`` as diffusers does."""

    config_name = "config.json"

    @torch.no_grad()
    def process_inputs(self, inputs: BaseModel, context: EncodeContext | None = None) -> dict[str, Any]:
        """Everything that needs no gradient (stage 1 of split training). Returns ``forward`` kwargs.

        Default: the input fields that ``forward`` takes by name (others, e.g. a weights path, stay out).
        """
        params = inspect.signature(self.forward).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return dict(inputs)
        return {k: v for k, v in dict(inputs).items() if k in params}

    def encode(self, inputs: BaseModel, context: EncodeContext | None = None) -> Any:
        """Inference: ``forward(**process_inputs(...))`` without gradients."""
        with torch.no_grad():
            return self(**self.process_inputs(inputs, context))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load from a local folder or a hub id. Only safetensors and JSON are read, never code.

        A folder holding Python files is refused: unlike the reference implementation, which runs
        the ``model.py`` it downloads, the model class here comes from the installed plugin.
        """
        folder = Path(os.fspath(pretrained_model_name_or_path))
        if not folder.is_dir():
            from huggingface_hub import snapshot_download  # honours HF_HUB_OFFLINE

            folder = Path(
                snapshot_download(
                    str(pretrained_model_name_or_path),
                    allow_patterns=["*.json", "*.safetensors"],
                    revision=kwargs.pop("revision", None),
                    cache_dir=kwargs.pop("cache_dir", None),
                )
            )
        code = sorted(p.name for p in folder.rglob("*.py"))
        if code:
            raise TemplateError(
                f"{folder}: refusing to load a Template model from a folder containing code "
                f"({', '.join(code)}). Diffusion Templates never executes files from a weights folder; the "
                "model class comes from the installed template plugin. Remove the .py files or load the "
                "weights into the class yourself."
            )
        kwargs["use_safetensors"] = True
        return super().from_pretrained(folder, **kwargs)
