"""Shared fixtures: test-only plugins installed through real entry points, tiny pipelines, snapshots."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

PLUGINS_DIR = Path(__file__).parent / "plugins"

# tests/plugins holds the test-only plugin package and its *.dist-info (entry points, metadata):
# on sys.path it is found by importlib.metadata exactly like a pip-installed distribution.
sys.path.insert(0, str(PLUGINS_DIR))
importlib.invalidate_caches()


@pytest.fixture(autouse=True)
def _fresh_plugin_host():
    """Each test starts from freshly discovered plugins (tests may register extra ones in code)."""
    from diffusion_templates.plugins import reset_default_host

    reset_default_host()
    yield
    reset_default_host()


@pytest.fixture(scope="session")
def flux2_pipe():
    """Tiny FLUX.2 klein *base* pipeline (real CFG), warmed up once so diffusers' own lazy state exists."""
    from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs

    pipe = TINY_PIPELINES["flux2_klein"].build()
    pipe(prompt="warm up", **tiny_call_kwargs("flux2_klein", cfg=True))
    return pipe


@pytest.fixture(scope="session")
def flux_pipe():
    from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs

    pipe = TINY_PIPELINES["flux"].build()
    pipe(prompt="warm up", **tiny_call_kwargs("flux", cfg=True))
    return pipe
