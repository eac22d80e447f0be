"""Every carrier skeleton of `dt new` generates a package that passes its own tests out of the box.

Nothing is installed: each generated package's ``src`` goes on ``PYTHONPATH`` together with a
minimal ``dt-template-<name>-0.1.0.dist-info`` (``METADATA`` with the pyproject's keywords and host
requirement, ``entry_points.txt``), as ``tests/plugins`` does, so that ``importlib.metadata`` finds
its entry point. The packages' test suites (the conformance kit) run in parallel subprocesses.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dt_sdk import new_template

# The skeletons that these tests cover (kv and lora also run, installed, in test_new_package.py).
CARRIERS = ("guidance", "embedding", "latent_mask", "residual")


def fake_dist_info(package: Path) -> None:
    """Write ``<dist>-<version>.dist-info`` next to the package's import folder under ``src``.

    Read from the generated pyproject.toml with regular expressions (tomllib is Python 3.11+).
    """
    text = (package / "pyproject.toml").read_text(encoding="utf-8")

    def field(key: str) -> str:
        return re.search(rf'^{key} = "([^"]*)"', text, re.MULTILINE).group(1)

    name, version = field("name"), field("version")
    keyword_block = text.split("keywords = [", 1)[1].split("]", 1)[0]
    keywords = re.findall(r'^    "([^"]+)",$', keyword_block, re.MULTILINE)
    requires = re.search(r"^dependencies = \[\"([^\"]+)\"\]", text, re.MULTILINE).group(1)
    section = '[project.entry-points."diffusion_templates.templates"]\n'
    entry_point = text.split(section, 1)[1].split("\n", 1)[0].replace('"', "")  # name = module:Class
    info = package / "src" / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             f"Summary: {field('description')}", f"Requires-Dist: {requires}",
             f"Keywords: {','.join(keywords)}"]
    (info / "METADATA").write_text("\n".join(lines) + "\n", encoding="utf-8")
    entry_points = f"[diffusion_templates.templates]\n{entry_point}\n"
    (info / "entry_points.txt").write_text(entry_points, encoding="utf-8")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("skeletons")
    packages = {}
    for carrier in CARRIERS:
        package = new_template(f"my-{carrier.replace('_', '-')}", carrier, output_dir=out)
        fake_dist_info(package)
        packages[carrier] = package
    return packages


def test_generated_skeletons_pass_their_tests(generated, child_env):
    procs = {}
    for carrier, package in generated.items():
        env = {**child_env, "PYTHONPATH": os.pathsep.join(
            [str(package / "src"), *filter(None, [child_env.get("PYTHONPATH")])])}
        procs[carrier] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"], cwd=package, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {carrier: proc.communicate(timeout=300)[0] for carrier, proc in procs.items()}
    for carrier, proc in procs.items():
        out = outputs[carrier]
        assert proc.returncode == 0, f"tests of the generated {carrier} skeleton failed:\n{out}"
        summary = out.strip().splitlines()[-1]
        assert "failed" not in summary and "error" not in summary, summary
        passed = int(summary.split(" passed")[0].split()[-1])
        assert passed >= 10, f"only {passed} tests ran for the {carrier} skeleton:\n{out}"


@pytest.mark.parametrize("carrier", CARRIERS)
def test_skeleton_declares_its_carrier(generated, carrier):
    package = generated[carrier]
    assert f'"dt-carrier:{carrier}"' in (package / "pyproject.toml").read_text()
    template = next((package / "src").glob("dt_template_*/template.py")).read_text()
    assert f'carriers = ("{carrier}",)' in template
    pyproject = (package / "pyproject.toml").read_text()
    if carrier == "residual":  # FLUX.2 has no ControlNet path: the residual skeleton must not claim it
        assert '"dt-backbone:flux2"' not in pyproject and '"flux2"' not in template
        assert '"dt-backbone:flux"' in pyproject and '"dt-backbone:sd3"' in pyproject
    else:
        assert '"dt-backbone:flux2"' in pyproject and '"dt-backbone:flux"' in pyproject


def test_skeletons_are_lint_clean(generated, child_env):
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed next to this Python")
    for package in generated.values():
        proc = subprocess.run([str(ruff), "check", "--no-cache", str(package)], env=child_env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
