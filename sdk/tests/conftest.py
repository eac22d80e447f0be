"""Shared fixtures of the dt-sdk tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SDK_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _cookiecutter_config(tmp_path_factory: pytest.TempPathFactory):
    """Keep cookiecutter's replay files (and any clone folder) out of the user's home."""
    folder = tmp_path_factory.mktemp("cookiecutter")
    config = folder / "config.yaml"
    config.write_text(f"replay_dir: {folder / 'replay'}\ncookiecutters_dir: {folder / 'cookiecutters'}\n")
    previous = os.environ.get("COOKIECUTTER_CONFIG")
    os.environ["COOKIECUTTER_CONFIG"] = str(config)
    yield config
    if previous is None:
        os.environ.pop("COOKIECUTTER_CONFIG", None)
    else:
        os.environ["COOKIECUTTER_CONFIG"] = previous


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    """Environment for child Pythons: no bytecode written into source trees, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DT_LOAD", "DT_DISABLE"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env
