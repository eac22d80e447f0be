"""Base class for carrier plugins: the two carrier hooks, bound to one carrier name."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..cache import TemplateCache
from ..errors import CacheError
from ..hookspecs import hookimpl

if TYPE_CHECKING:
    from ..backbones.base import BackboneAdapter
    from ..context import InjectionTarget
    from ..injection import Injection


class Carrier:
    """Subclass, set ``name`` and ``cache_class``, implement :meth:`merge_caches` and :meth:`injection`."""

    name: ClassVar[str]
    cache_class: ClassVar[type[TemplateCache]]

    # Values are checked (``TemplateCache.check_values``: finite, within ``limits.py``'s bounds) on the
    # way into both hooks: every cache reaches a carrier through them, whoever made it. Before merging,
    # so the error names the template whose cache is bad; again before injecting, for the merged one.
    @hookimpl(specname="merge")
    def _merge_hook(self, carrier: str, caches: list[TemplateCache]) -> TemplateCache:
        for cache in caches:
            self.check_type(cache)
            cache.check_values()
        return self.merge_caches(caches)

    @hookimpl(specname="inject")
    def _inject_hook(self, carrier: str, cache: TemplateCache, target: InjectionTarget) -> Injection:
        self.check_type(cache)
        cache.check_values()
        return self.injection(cache, target)

    def check_type(self, cache: TemplateCache) -> None:
        if not isinstance(cache, self.cache_class):
            raise CacheError(
                f"carrier {self.name!r} expects a {self.cache_class.__name__}, got {type(cache).__name__}"
            )

    def supports(self, adapter: BackboneAdapter) -> bool:
        """Whether this carrier can drive ``adapter``'s backbone (default: the adapter says so)."""
        return self.name in adapter.carriers

    def merge_caches(self, caches: list[TemplateCache]) -> TemplateCache:
        raise NotImplementedError

    def injection(self, cache: TemplateCache, target: InjectionTarget) -> Injection:
        raise NotImplementedError


def joined_template_names(caches: list[TemplateCache]) -> str | None:
    names = [c.template for c in caches if c.template]
    return "+".join(names) if names else None
