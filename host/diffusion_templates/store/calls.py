"""The key of one template call on a ``TemplatePipeline``, with the memos that make it cheap.

Everything but the inputs and the weights' per-tensor check is the same from call to call, so the
template's distribution info, the backbone identity and keys of scalar inputs are remembered here
(each memo checks what it depends on at every call; see :mod:`.keys` and :mod:`.weights`).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

from .keys import (
    _KEY_MEMO_SIZE,
    Uncacheable,
    _backbone_items,
    _backbone_memo,
    _key_memo,
    _scalar_signature,
    cache_key,
)
from .weights import pipeline_weights, template_reads


class KeyBuilder:
    """``key_for`` of one :class:`~diffusion_templates.store.TemplateCacheStore` and its memos."""

    def __init__(self) -> None:
        self._info_memo: dict[tuple[int, str], tuple[Any, ...]] = {}
        self._last_backbone: tuple[Any, ...] | None = None

    def key_for(self, pipeline: Any, template: str, inputs: Any, *, negative: bool = False) -> str | None:
        """The key of ``template`` with validated ``inputs`` on ``pipeline`` (a TemplatePipeline);
        ``None`` when this call cannot be cached."""
        plugins = pipeline.plugins
        plugin = plugins.get("template", template)
        if not getattr(plugin, "cacheable", True):
            return None
        info = self._template_info(plugins, template, plugin)
        version = info.version if info is not None else ""
        distribution = info.distribution if info is not None else ""
        cache_version = getattr(plugin, "cache_version", None)
        if cache_version is not None:
            cache_version = str(cache_version)
        if not version:  # registered in code: no distribution version, name the code instead
            klass = plugin if isinstance(plugin, type) else type(plugin)
            distribution = f"{distribution}:{klass.__module__}.{klass.__qualname__}"
        adapter = pipeline.adapter
        backbone = self._backbone(adapter)
        try:
            weights = pipeline_weights(pipeline.pipe, adapter.denoiser, template_reads(plugin, template))
        except Uncacheable:
            return None
        memo_key = None
        if type(version) is str and type(distribution) is str:
            signature = _scalar_signature(inputs)
            if signature is not None:
                memo_key = (template, version, distribution, cache_version, backbone, bool(negative), weights)
                memo_key += signature
                key = _key_memo.get(memo_key)
                if key is not None:
                    return key
        try:
            key = cache_key(
                template=template,
                version=version,
                distribution=distribution,
                cache_version=cache_version,
                inputs=inputs,
                backbone=backbone,
                negative=negative,
                weights=weights,
            )
        except Uncacheable:
            return None
        if memo_key is not None:
            if len(_key_memo) >= _KEY_MEMO_SIZE:
                _key_memo.clear()
            _key_memo[memo_key] = key
        return key

    def _backbone(self, adapter: Any) -> tuple[tuple[str, str], ...]:
        """``_backbone_items(adapter)``, with the last result remembered for as long as the adapter,
        its denoiser, the denoiser's config object and its first parameter's dtype stay the same
        (the same checks ``backbone_identity`` makes, with fewer objects touched per call). Held
        through weak references: a store shared by several pipelines keeps no model alive."""
        denoiser = adapter.denoiser
        last = self._last_backbone
        if last is not None and last[0]() is adapter and last[1]() is denoiser:
            owner = last[3]()
            param = owner._parameters.get(last[4]) if owner is not None else None
            if getattr(denoiser, "config", None) is last[2] and param is not None and param.dtype == last[5]:
                return last[6]
        items = _backbone_items(adapter)
        memo = _backbone_memo.get(denoiser)
        first = memo[3] if memo is not None else None
        param = first[0]._parameters.get(first[1]) if first is not None else None
        if param is not None and str(param.dtype) == items[3][1]:
            with contextlib.suppress(TypeError):  # not weakly referenceable: no memo
                self._last_backbone = (
                    weakref.ref(adapter),
                    weakref.ref(denoiser),
                    memo[0],
                    weakref.ref(first[0]),
                    first[1],
                    param.dtype,
                    items,
                )
        return items

    def _template_info(self, plugins: Any, template: str, plugin: Any) -> Any:
        """``plugins.info("template", template)``, remembered while the host, its list of infos and
        the loaded plugin object stay the same (the info's fields are read at every call: a new
        version there still changes the key)."""
        infos = plugins.infos
        memo = self._info_memo.get((id(plugins), template))
        if (
            memo is not None
            and memo[0]() is plugins
            and memo[1] is plugin
            and memo[2] is infos
            and memo[3] == len(infos)
        ):
            return memo[4]
        info = plugins.info("template", template)
        with contextlib.suppress(TypeError):  # a host that cannot be weakly referenced: no memo
            self._info_memo[(id(plugins), template)] = (weakref.ref(plugins), plugin, infos, len(infos), info)
        return info
