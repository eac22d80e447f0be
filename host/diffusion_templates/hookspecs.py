"""The four hooks through which the host reaches templates and carriers.

A *template* plugin implements ``encode`` (its Template model's forward: validated inputs to a
capability representation) and ``to_cache`` (representation to typed Template caches). A *carrier*
plugin implements ``merge`` (several caches of its carrier to one) and ``inject`` (a cache to an
:class:`~diffusion_templates.injection.Injection` that patches the running base model and undoes
itself on exit).

Every hook is ``firstresult``. The host calls a hook only on the plugin that owns the template or
carrier name (see :mod:`diffusion_templates.plugins`), so an implementation may ignore the name
argument; it is passed so that one object may serve several names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .cache import TemplateCache
    from .context import EncodeContext, InjectionTarget
    from .injection import Injection

PROJECT_NAME = "diffusion_templates"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def encode(template: str, inputs: BaseModel, context: EncodeContext) -> Any:
    """Run the Template model on validated ``inputs``; return its capability representation."""


@hookspec(firstresult=True)
def to_cache(
    template: str, representation: Any, context: EncodeContext
) -> TemplateCache | list[TemplateCache]:
    """Turn a representation into one or more typed Template caches (one per carrier)."""


@hookspec(firstresult=True)
def merge(carrier: str, caches: list[TemplateCache]) -> TemplateCache:
    """Merge two or more caches of ``carrier`` into one; raise ``CarrierConflictError`` if impossible."""


@hookspec(firstresult=True)
def inject(carrier: str, cache: TemplateCache, target: InjectionTarget) -> Injection:
    """Validate ``cache`` against ``target`` and return an un-applied Injection.

    All validation happens here, before anything is changed: the pipeline applies the returned
    injections only once every template of the call has been encoded, merged and checked.
    """
