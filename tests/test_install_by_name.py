"""Installing a capability by name: ``pip install --no-index --find-links DIR dt-template-superres``.

The host and the plugin are built as wheels from copies of their sources (``pip wheel``, no build
isolation: nothing is downloaded) into a temporary folder, and installed by name into a fresh
virtual environment: the host comes in as the plugin's dependency, resolved from that folder. The
third-party dependencies (torch, diffusers...) are not rebuilt: the fresh environment sees them
through a ``.pth`` file naming a folder of links to this environment's site-packages, without any
of this project's distributions (the test checks that both come from the fresh environment).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OURS = re.compile(r"^(__editable__|diffusion_templates|dt_|distutils-precedence|_virtualenv)", re.I)


def _run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _copy_sources(tmp: Path) -> tuple[Path, Path]:
    """The host's and superres' sources, copied so that building writes nothing into the checkout."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    host = tmp / "src" / "host-dist"
    host.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, host / name)
    shutil.copytree(ROOT / "host", host / "host", ignore=skip)
    plugin = shutil.copytree(ROOT / "plugins" / "dt-template-superres", tmp / "src" / "superres", ignore=skip)
    return host, plugin


def _overlay(tmp: Path) -> Path:
    """Links to this environment's third-party packages, none of this project's distributions."""
    overlay = tmp / "overlay"
    overlay.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if not OURS.match(entry.name):
            (overlay / entry.name).symlink_to(entry)
    return overlay


@pytest.mark.skipif(sys.platform != "linux", reason="the fresh environment's layout is the Linux one")
def test_superres_installs_by_name_with_the_host_as_its_dependency(tmp_path: Path) -> None:
    host_src, plugin_src = _copy_sources(tmp_path)
    wheels = tmp_path / "dist"
    for src in (host_src, plugin_src):
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "-w", wheels, src)  # fmt: skip
    assert sorted(p.name.split("-")[0] for p in wheels.glob("*.whl")) == [
        "diffusion_templates",
        "dt_template_superres",
    ]

    fresh = tmp_path / "fresh"
    base_python = getattr(sys, "_base_executable", sys.executable)
    _run(base_python, "-m", "venv", "--without-pip", fresh)  # pip and setuptools: the overlay's
    python = fresh / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (Path(purelib) / "dt_test_overlay.pth").write_text(f"{_overlay(tmp_path)}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1", DT_THREADS="1")
    _run(
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        wheels,
        "dt-template-superres",
        env=env,
    )

    where = _run(
        python, "-c", "import diffusion_templates, dt_template_superres as s; "
        "print(diffusion_templates.__file__); print(s.__file__)", env=env,
    ).split()  # fmt: skip
    assert all(path.startswith(str(fresh)) for path in where), where  # installed here, not the checkout's

    listed = _run(fresh / "bin" / "dt", "list", env=env, cwd=tmp_path)
    rows = [line.split() for line in listed.splitlines()]
    assert ["template", "superres", "0.1.0", "dt-template-superres"] in [r[:4] for r in rows]
    assert ["carrier", "tiled_denoise", "0.1.0", "dt-template-superres"] in [r[:4] for r in rows]

    Image.new("RGB", (32, 32), (200, 60, 30)).save(tmp_path / "low.png")
    argv = ["generate", "--template", "superres", "image=low.png", "factor=2", "--size", "64", "--steps", "2"]
    for seed in ("0", "1"):
        out = f"big{seed}.png"
        _run(fresh / "bin" / "dt", *argv, "--seed", seed, "--out", out, env=env, cwd=tmp_path)
        assert Image.open(tmp_path / out).size == (64, 64)
