"""A store of computed Template caches, so that a template's model runs once per distinct input.

* :mod:`.keys`: the key, a SHA-256 over the template (name, distribution version, ``cache_version``),
  its validated inputs (arrays, images and files by content), the backbone (adapter, denoiser class,
  config, dtype), the weights the template reads and the CFG branch; equal across processes.
* :mod:`.weights`: the content digest of the pipeline components a template reads (its plugin's
  ``reads``, default all), hashed once per tensor and re-checked per call through torch's
  version counters.
* :mod:`.memory`: an LRU bounded by the bytes of the cache tensors.
* :mod:`.disk`: an optional folder mirror that only serves, replaces and deletes files it wrote,
  verified by digest, never opening a FIFO or following a symlink.
* :mod:`.cache_store`: :class:`TemplateCacheStore`, which ties them together; thread safe, and two
  threads asking for the same missing key compute it once.

Inputs holding an object the store cannot hash by content make the template uncacheable for that call
(it is computed, not stored); a template whose output is not a function of its key (randomness without
a seed, state outside its inputs) sets ``cacheable = False`` on its plugin class.

``TemplatePipeline`` uses one in-memory store per pipeline by default (:data:`DEFAULT_MAX_BYTES`);
``TemplatePipeline(pipe, store=None)`` turns it off and ``store=TemplateCacheStore(disk_dir=...)``
adds the disk folder.
"""

from __future__ import annotations

from .cache_store import DEFAULT_MAX_BYTES, StoreStats, TemplateCacheStore
from .files import file_digest
from .keys import (
    STORE_FORMAT,
    Uncacheable,
    backbone_identity,
    cache_key,
    canonical,
    config_digest,
    inputs_digest,
)
from .memory import caches_nbytes
from .weights import component_identity, forget_weight_digests, module_digest, pipeline_weights

__all__ = [
    "DEFAULT_MAX_BYTES",
    "STORE_FORMAT",
    "StoreStats",
    "TemplateCacheStore",
    "Uncacheable",
    "backbone_identity",
    "cache_key",
    "caches_nbytes",
    "canonical",
    "component_identity",
    "config_digest",
    "file_digest",
    "forget_weight_digests",
    "inputs_digest",
    "module_digest",
    "pipeline_weights",
]
