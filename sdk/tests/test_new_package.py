"""`dt new` output installs into a fresh virtual environment, passes its own tests, and shows in `dt list`.

Building a virtual environment with torch from scratch would take minutes, so the fresh environment
is made without pip (``python -m venv --without-pip``) and a ``.pth`` file appends the *parent*
environment's site-packages to its path: torch, diffusers, transformers, pytest, cookiecutter and
pip itself come from there. The host, dt-sdk and the generated packages are then installed into the
fresh environment, offline and editable; its own site-packages come first on ``sys.path`` and
``importlib.metadata`` keeps the first distribution of each name, so these installs take precedence
over the parent's editable host and dt-sdk (checked below).

The host that is installed is a copy of the host's source tree taken when the module starts
(``pyproject.toml``, ``README.md``, ``host/``): other people edit the real tree while tests run,
which would make a before/after hash of it flaky. The copy *is* the host under test (installed
editable, so anything that install, the packages' tests, ``dt list`` or ``dt new`` wrote into the
host would land in it) and must come out byte-identical. Set ``DT_SDK_TEST_REAL_HOST=1`` to
install and check the real tree instead (as CI, where nobody edits it meanwhile, may).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import diffusion_templates
import pytest

from dt_sdk import new_template

HOST_ROOT = Path(diffusion_templates.__file__).resolve().parents[2]  # holds the host's pyproject.toml
HOST_TREE = "host"  # the host's source folder, relative to HOST_ROOT
SDK_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"my-glow": "kv", "my-tint": "lora"}
# Build artefacts that pip's editable install of the host regenerates (both are git-ignored).
IGNORED_PARTS = ("__pycache__",)
IGNORED_SUFFIXES = (".egg-info",)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except bytecode caches and egg-info build metadata."""
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in IGNORED_PARTS or part.endswith(IGNORED_SUFFIXES) for part in rel.parts):
            continue
        if path.is_file():
            digest[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        command = " ".join(map(str, cmd))
        raise AssertionError(f"{command} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


class FreshEnv:
    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        self.python = root / "bin" / "python"

    def run(self, *args: str, cwd: Path | None = None) -> str:
        return run([str(self.python), *args], self.env, cwd=cwd)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, child_env: dict[str, str]):
    """Generated packages installed into a fresh venv; the host tree's digest from before all that."""
    tmp = tmp_path_factory.mktemp("new-package")
    if os.environ.get("DT_SDK_TEST_REAL_HOST") == "1":
        host_root = HOST_ROOT
    else:
        host_root = tmp / "host-root"
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
        shutil.copytree(HOST_ROOT / HOST_TREE, host_root / HOST_TREE, ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(HOST_ROOT / name, host_root / name)
    before = tree_digest(host_root / HOST_TREE)
    packages = {}
    # kv through the command line (`python -m dt_sdk new`), lora through the Python API.
    run([sys.executable, "-m", "dt_sdk", "new", "my-glow", "--carrier", "kv", "--no-input",
         "--output-dir", str(tmp / "pkgs")], child_env)
    packages["my-glow"] = tmp / "pkgs" / "dt-template-my-glow"
    packages["my-tint"] = new_template("my-tint", "lora", output_dir=tmp / "pkgs")

    root = tmp / "env"
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], child_env)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([str(root / "bin" / "python"), "-c", purelib], child_env).strip())
    (site / "_dt_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    fresh = FreshEnv(root, {**child_env, "VIRTUAL_ENV": str(root)})
    editables = [str(host_root), str(SDK_ROOT), *map(str, packages.values())]
    fresh.run("-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
              *(arg for path in editables for arg in ("-e", path)))
    yield {"packages": packages, "env": fresh, "host_root": host_root, "host_before": before, "tmp": tmp}


def test_fresh_env_uses_its_own_installs(workspace):
    fresh: FreshEnv = workspace["env"]
    out = json.loads(fresh.run("-c", (
        "import json, sys; from importlib import metadata\n"
        "names = ['diffusion-templates', 'dt-sdk', 'dt-template-my-glow', 'dt-template-my-tint']\n"
        "print(json.dumps({n: str(metadata.distribution(n)._path) for n in names}))\n")))
    for name, path in out.items():
        assert path.startswith(str(fresh.root)), f"{name} resolves to {path}, not the fresh env's install"
    where = fresh.run("-c", "import diffusion_templates; print(diffusion_templates.__file__)").strip()
    assert where.startswith(str(workspace["host_root"])), f"the fresh env imports the host from {where}"


def test_generated_packages_pass_their_tests(workspace):
    """`pytest` in each generated package passes out of the box (both run at once, in the fresh env)."""
    fresh: FreshEnv = workspace["env"]
    procs = {name: subprocess.Popen([str(fresh.python), "-m", "pytest", "-p", "no:cacheprovider", "-q"],
                                    cwd=path, env=fresh.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
             for name, path in workspace["packages"].items()}
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        out = outputs[name]
        assert proc.returncode == 0, f"tests of generated package {name!r} failed:\n{out}"
        summary = out.strip().splitlines()[-1]
        assert "skipped" not in summary and "failed" not in summary and "error" not in summary, summary
        passed = int(summary.split(" passed")[0].split()[-1])
        assert passed >= 15, f"only {passed} tests ran for {name!r}: the conformance kit did not run?\n{out}"


def test_dt_list_shows_the_templates(workspace):
    fresh: FreshEnv = workspace["env"]
    listed = json.loads(run([str(fresh.root / "bin" / "dt"), "list", "--json"], fresh.env))
    templates = {entry["name"]: entry for entry in listed if entry["kind"] == "template"}
    for name, carrier in PACKAGES.items():
        assert name in templates, f"dt list does not show {name}: {sorted(templates)}"
        entry = templates[name]
        assert entry["version"] == "0.1.0"
        assert entry["distribution"] == f"dt-template-{name}"
        assert entry["carriers"] == [carrier]
        assert sorted(entry["backbones"]) == ["flux", "flux2"]
        assert set(entry["host_requires"].split(",")) == {">=0.1", "<0.2"}
        assert entry["status"] == "not loaded", entry  # listed from metadata, not imported
    table = run([str(fresh.root / "bin" / "dt"), "list", "--kind", "template"], fresh.env)
    assert "my-glow" in table and "0.1.0" in table and "kv" in table


def test_dt_doctor_finds_no_problem_with_them(workspace):
    """The host's own check (imports every plugin, compares metadata with the loaded objects)."""
    fresh: FreshEnv = workspace["env"]
    proc = subprocess.run([str(fresh.root / "bin" / "dt"), "doctor", "--json"], env=fresh.env,
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    ours = {f"dt-template-{name}" for name in PACKAGES}
    assert [p for p in report["problems"] if p["distribution"] in ours] == []
    loaded = {p["name"]: p["status"] for p in report["plugins"] if p["distribution"] in ours}
    assert loaded == {name: "loaded" for name in PACKAGES}


def test_dt_new_through_the_host_cli(workspace):
    """The host CLI finds `new` through the diffusion_templates.commands entry point."""
    fresh: FreshEnv = workspace["env"]
    out_dir = workspace["tmp"] / "via-dt"
    out = run([str(fresh.root / "bin" / "dt"), "new", "my-halo", "--carrier", "lora", "--no-input",
               "--output-dir", str(out_dir)], fresh.env)
    package = out_dir / "dt-template-my-halo"
    assert str(package) in out
    assert (package / "src" / "dt_template_my_halo" / "template.py").is_file()
    help_text = run([str(fresh.root / "bin" / "dt"), "--help"], fresh.env)
    assert "new" in help_text


def test_generated_code_is_lint_clean(workspace):
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed next to this Python")
    for path in workspace["packages"].values():
        run([str(ruff), "check", "--no-cache", str(path)], workspace["env"].env)


def test_host_tree_unchanged(workspace):
    """Generating, installing and testing template packages changed no file of the host (run last)."""
    after = tree_digest(workspace["host_root"] / HOST_TREE)
    before = workspace["host_before"]
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    added, removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
    assert not (changed or added or removed), (
        f"files of the host under {workspace['host_root']} changed: changed {changed}, added {added}, "
        f"removed {removed}")
