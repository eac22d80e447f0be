"""Shared fixtures: test-only plugins installed through real entry points, tiny pipelines, snapshots."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent
PLUGINS_DIR = TESTS_DIR / "plugins"

# tests/plugins holds the test-only plugin package and its *.dist-info (entry points, metadata):
# on sys.path it is found by importlib.metadata exactly like a pip-installed distribution.
sys.path.insert(0, str(PLUGINS_DIR))
# pytest runs in importlib mode (several packages have a tests/ folder): make `import helpers` work.
sys.path.insert(0, str(TESTS_DIR))
importlib.invalidate_caches()


@pytest.fixture(autouse=True)
def _fresh_plugin_host():
    """Each test starts from freshly discovered plugins (tests may register extra ones in code)."""
    from diffusion_templates.plugins import reset_default_host

    reset_default_host()
    yield
    reset_default_host()


@pytest.fixture(scope="session")
def tiny_pipes():
    """family -> a tiny pipeline with CFG-capable settings, built once and warmed up once (so that
    diffusers' and transformers' own lazily created state exists before any before/after snapshot)."""
    from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs

    cache = {}

    def get(family: str):
        if family not in cache:
            pipe = TINY_PIPELINES[family].build()
            pipe(prompt="warm up", **tiny_call_kwargs(family, cfg=True))
            cache[family] = pipe
        return cache[family]

    return get


@pytest.fixture(scope="session")
def flux2_pipe(tiny_pipes):
    """Tiny FLUX.2 klein *base* pipeline (real CFG)."""
    return tiny_pipes("flux2_klein")


@pytest.fixture(scope="session")
def flux_pipe(tiny_pipes):
    return tiny_pipes("flux")
