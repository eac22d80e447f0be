"""Attacks on discovery: one broken distribution never breaks the rest, and the report always comes.

Each fake distribution is a ``*.dist-info`` folder (with its modules beside it) in a temporary folder
put on ``sys.path`` (in process) or first on ``PYTHONPATH`` (for ``dt`` run as a subprocess), where
importlib.metadata finds it exactly as an installed package. The attacks: a METADATA without
``Name`` (an interrupted install), one that is not UTF-8, entry point values that are not
``module:attr``, a malformed ``entry_points.txt`` line, and plugin modules that call ``sys.exit()``,
raise ``KeyboardInterrupt`` or another ``BaseException`` at import (also from a parent package, which
must run once, not again while ``dt doctor`` explains it). A real SIGINT during an import still
stops the program.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusion_templates import PluginError, TemplatePipeline
from diffusion_templates.plugins import PluginHost, default_host
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from helpers import run
from test_cli_discovery import make_dist, template_module

DT = str(Path(sys.executable).with_name("dt"))
TEST_PLUGINS = Path(__file__).parents[1] / "plugins"  # dt-test-templates (test-kv, ...), as conftest adds it
TEMPLATES = "diffusion_templates.templates"
COMMANDS = "diffusion_templates.commands"
PREFIX = "dt_attack_"
NEVER = "raise RuntimeError('a broken distribution must never be imported')\n"


def _dist_info(
    site: Path, folder: str, metadata: bytes | str, entry_points: str, modules: dict[str, str]
) -> None:
    """A dist-info written byte for byte (make_dist always writes a valid Name)."""
    info = site / folder
    info.mkdir()
    (info / "METADATA").write_bytes(metadata if isinstance(metadata, bytes) else metadata.encode())
    (info / "entry_points.txt").write_text(entry_points)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


def build_attacks(site: Path) -> None:
    """One distribution per attack, next to good plugins (dt-test-templates, the zoo, the host)."""
    _dist_info(
        site,
        "dt_attack_noname-0.1.dist-info",
        "Metadata-Version: 2.1\nVersion: 0.1\n",
        f"[{TEMPLATES}]\nattack-noname = dt_attack_noname:T\n",
        {"dt_attack_noname": NEVER},
    )
    _dist_info(
        site,
        "dt_attack_latin1-0.1.dist-info",
        b"Metadata-Version: 2.1\nName: dt-attack-\xe9\xff\n",
        f"[{TEMPLATES}]\nattack-latin1 = dt_attack_latin1:T\n",
        {"dt_attack_latin1": NEVER},
    )
    # Three bad values and one good entry in one distribution: each bad line spoils only itself.
    make_dist(
        site,
        "dt-attack-values",
        "0.1",
        {
            TEMPLATES: {
                "attack-spaces": "not a module path!",
                "attack-colons": "dt_attack_sibling:T:U",
                "attack-digit": "1dt_attack:T",
                "attack-sibling": "dt_attack_sibling:Sibling",
            }
        },
        {"dt_attack_sibling": template_module("Sibling", ("kv",))},
    )
    make_dist(
        site,
        "dt-attack-exit",
        "0.1",
        {TEMPLATES: {"attack-exit": "dt_attack_exit:T"}},
        {"dt_attack_exit": "import sys\nsys.exit(3)\n"},
    )
    make_dist(
        site,
        "dt-attack-kbi",
        "0.1",
        {TEMPLATES: {"attack-kbi": "dt_attack_kbi:T"}},
        {"dt_attack_kbi": "raise KeyboardInterrupt\n"},
    )
    make_dist(
        site,
        "dt-attack-base",
        "0.1",
        {TEMPLATES: {"attack-base": "dt_attack_base:T"}},
        {"dt_attack_base": "class Boom(BaseException):\n    pass\n\n\nraise Boom('not an Exception')\n"},
    )
    # A package that exits at import, named through a submodule: explaining the failure must not
    # import it again (each run of its __init__ adds a line to the counter file).
    package = site / "dt_attack_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import os, sys\n"
        "with open(os.path.join(os.path.dirname(__file__), 'runs.txt'), 'a') as f:\n"
        "    f.write('run\\n')\n"
        "sys.exit(4)\n"
    )
    (package / "sub.py").write_text(template_module("T", ("kv",)))
    make_dist(site, "dt-attack-pkg", "0.1", {TEMPLATES: {"attack-pkg": "dt_attack_pkg.sub:T"}})
    hook_exit = (
        template_module("T", ("kv",))
        + "\n    def encode(self, inputs, context):\n        raise SystemExit(5)\n"
    )
    make_dist(
        site,
        "dt-attack-hook",
        "0.1",
        {TEMPLATES: {"attack-hook": "dt_attack_hook:T"}},
        {"dt_attack_hook": hook_exit},
    )
    make_dist(
        site,
        "dt-attack-cmd",
        "0.1",
        {
            COMMANDS: {
                "attack-cmd-exit": "dt_attack_cmd_exit:register",
                "attack-cmd-kbi": "dt_attack_cmd_kbi:register",
            }
        },
        {
            "dt_attack_cmd_exit": "raise SystemExit('command plugin exits')\n",
            "dt_attack_cmd_kbi": "raise KeyboardInterrupt\n",
        },
    )


BROKEN = {  # template -> (distribution shown, status after loading, words of the problem)
    "attack-noname": ("<unnamed>", "broken", "METADATA has no Name"),
    "attack-latin1": ("<unnamed>", "broken", "metadata cannot be read (UnicodeDecodeError"),
    "attack-spaces": ("dt-attack-values", "broken", "bad entry point value 'not a module path!'"),
    "attack-colons": ("dt-attack-values", "broken", "bad entry point value 'dt_attack_sibling:T:U'"),
    "attack-digit": ("dt-attack-values", "broken", "bad entry point value '1dt_attack:T'"),
    "attack-exit": ("dt-attack-exit", "error", "SystemExit: the plugin called sys.exit(3)"),
    "attack-kbi": ("dt-attack-kbi", "error", "KeyboardInterrupt raised by the plugin itself"),
    "attack-base": ("dt-attack-base", "error", "Boom: not an Exception"),
    "attack-pkg": ("dt-attack-pkg", "error", "SystemExit: the plugin called sys.exit(4)"),
}


@pytest.fixture(scope="module")
def attack_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("attack_site")
    build_attacks(site)
    return site


@pytest.fixture
def on_path(attack_site: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(attack_site))
    monkeypatch.delenv("DT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DT_DISABLE_PLUGINS", raising=False)
    importlib.invalidate_caches()
    yield attack_site
    for name in [m for m in sys.modules if m.startswith(PREFIX)]:
        del sys.modules[name]


def env_with(*sites: Path, **extra: str) -> dict[str, str]:
    """The environment with ``sites`` and the test plugins first on PYTHONPATH (the code under test,
    a worktree's checkout say, stays after them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DT_")}
    paths = [*map(str, sites), str(TEST_PLUGINS), *filter(None, [os.environ.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def dt(*args: str, sites: tuple[Path, ...], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DT, *args], env=env_with(*sites, **env), capture_output=True, text=True, timeout=300
    )


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows if row["kind"] == "template"}


# -- dt list: metadata only -------------------------------------------------------------------------------
def test_dt_list_reports_each_broken_distribution(attack_site: Path, tally) -> None:
    listed = dt("list", "--json", sites=(attack_site,))
    assert listed.returncode == 0, listed.stderr
    rows = by_name(json.loads(listed.stdout))
    for name, (distribution, _, words) in BROKEN.items():
        if name in ("attack-noname", "attack-latin1", "attack-spaces", "attack-colons", "attack-digit"):
            assert (rows[name]["status"], rows[name]["distribution"]) == ("broken", distribution), rows[name]
            assert words in rows[name]["problem"], rows[name]
        else:  # dt list imports nothing: a plugin failing at import is found by dt doctor
            assert rows[name]["status"] == "not loaded", rows[name]
        tally["plugins.failures_isolated"] += 1
    assert str(attack_site) in rows["attack-noname"]["problem"]  # where to look for the bad install
    assert rows["attack-sibling"]["status"] == "not loaded"  # its distribution's bad lines spoil only them
    assert rows["test-kv"]["status"] == rows["brightness"]["status"] == "not loaded"

    table = dt("list", sites=(attack_site,))
    assert table.returncode == 0, table.stderr
    lines = {line.split()[1]: line for line in table.stdout.splitlines()[1:]}
    assert "broken" in lines["attack-noname"] and "<unnamed>" in lines["attack-noname"]
    assert "broken" in lines["attack-spaces"] and "not loaded" in lines["test-kv"]


def test_dt_list_survives_a_malformed_entry_points_line(tmp_path: Path) -> None:
    """importlib.metadata.entry_points() raises for every group on such a line; dt list names it."""
    _dist_info(
        tmp_path,
        "dt_attack_junk-0.1.dist-info",
        "Metadata-Version: 2.1\nName: dt-attack-junk\n",
        f"[{TEMPLATES}]\nattack-before = dt_attack_junk:T\njust some words\n",
        {},
    )
    listed = dt("list", "--json", sites=(tmp_path,))
    assert listed.returncode == 0, listed.stderr
    rows = by_name(json.loads(listed.stdout))
    junk = rows["just some words"]
    assert (junk["status"], junk["distribution"]) == ("broken", "dt-attack-junk")
    assert "line 3 of its entry_points.txt" in junk["problem"]
    assert rows["attack-before"]["status"] == "not loaded"
    assert rows["test-kv"]["status"] == "not loaded" and "brightness" in rows


# -- dt doctor: imports everything, always reports ----------------------------------------------------------
@pytest.fixture(scope="module")
def doctor(attack_site: Path) -> dict[str, subprocess.CompletedProcess]:
    text = dt("doctor", sites=(attack_site,))
    runs = (attack_site / "dt_attack_pkg" / "runs.txt").read_text().splitlines()
    as_json = dt("doctor", "--json", sites=(attack_site,))
    return {"text": text, "json": as_json, "package_runs": runs}


def test_dt_doctor_prints_every_problem(doctor) -> None:
    text = doctor["text"]
    assert text.returncode == 1, text.stdout + text.stderr
    assert "Traceback" not in text.stdout + text.stderr
    table, _, rest = text.stdout.partition("\n\n")
    problems = rest.split("\nproblems:\n", 1)[1].splitlines()

    def problem(name: str) -> str:
        [line] = [p for p in problems if p.strip().startswith(f"template {name!r}")]
        return line

    for name, (distribution, _, words) in BROKEN.items():
        assert f"(distribution {distribution}" in problem(name) and words in problem(name), problem(name)
    assert "bad entry point" in problem("attack-spaces")
    assert "raised at import" in problem("attack-exit") and "raised at import" in problem("attack-pkg")
    status = {row.split()[1]: row.split()[-1] for row in table.splitlines()[1:]}
    assert status["attack-sibling"] == status["test-kv"] == status["kv"] == status["flux2"] == "loaded"
    assert status["attack-noname"] == "broken" and status["attack-exit"] == "error"
    commands = [p for p in problems if p.strip().startswith("command 'attack-cmd")]
    assert any("SystemExit: command plugin exits" in p for p in commands), commands
    assert any("KeyboardInterrupt" in p for p in commands), commands
    # the package ran its failing __init__ once: the diagnosis did not import it again
    assert doctor["package_runs"] == ["run"]


def test_dt_doctor_json(doctor) -> None:
    result = doctor["json"]
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    rows = by_name(report["plugins"])
    for name, (distribution, status, words) in BROKEN.items():
        assert (rows[name]["status"], rows[name]["distribution"]) == (status, distribution)
        assert words in rows[name]["problem"]
    categories = {p["name"]: p["category"] for p in report["problems"] if p["kind"] == "template"}
    assert categories["attack-noname"] == categories["attack-latin1"] == "broken distribution"
    assert categories["attack-spaces"] == categories["attack-digit"] == "bad entry point"
    assert (
        categories["attack-exit"] == categories["attack-kbi"] == categories["attack-base"] == "import error"
    )
    assert rows["attack-sibling"]["status"] == rows["test-kv"]["status"] == "loaded"


# -- TemplatePipeline next to the broken distributions ----------------------------------------------
@pytest.fixture(scope="module")
def reference(flux2_pipe):
    """test-kv's output with no fake distribution installed."""
    return run(
        TemplatePipeline(flux2_pipe, plugins=PluginHost()), "flux2_klein", templates=[{"template": "test-kv"}]
    )


@pytest.mark.parametrize("seed", [0, 3])
def test_template_pipeline_names_each_broken_plugin_and_the_rest_works(
    on_path, flux2_pipe, reference, seed, tally
):
    tp = TemplatePipeline(flux2_pipe)  # the default host: discovery used to crash on the unnamed one
    assert tp.plugins is default_host()
    expected = run(
        TemplatePipeline(flux2_pipe, plugins=tp.plugins),
        "flux2_klein",
        seed=seed,
        templates=[{"template": "test-kv"}],
    )
    before = pipeline_state(flux2_pipe)
    for name, (distribution, status, words) in BROKEN.items():
        with pytest.raises(PluginError) as info:
            run(tp, "flux2_klein", seed=seed, templates=[{"template": "test-kv"}, {"template": name}])
        text = str(info.value)
        assert f"plugin {name!r} (distribution {distribution!r})" in text and words in text, text
        assert tp.plugins.info("template", name).status == status
        assert_pipeline_unchanged(before, flux2_pipe)
        assert torch.equal(run(tp, "flux2_klein", seed=seed, templates=[{"template": "test-kv"}]), expected)
        tally["plugins.failures_isolated"] += 1
    if seed == 0:
        assert torch.equal(expected, reference)
    assert tp.plugins.get("template", "attack-sibling").Inputs is not None
    assert "dt_attack_noname" not in sys.modules and "dt_attack_latin1" not in sys.modules


def test_a_plugin_calling_sys_exit_in_a_hook_fails_only_its_call(on_path, flux2_pipe, reference):
    tp = TemplatePipeline(flux2_pipe, plugins=PluginHost())
    before = pipeline_state(flux2_pipe)
    for _ in range(2):
        with pytest.raises(
            PluginError,
            match=r"plugin 'attack-hook' \(distribution 'dt-attack-hook'\): hook "
            r"'encode' raised SystemExit: 5",
        ):
            run(tp, "flux2_klein", templates=[{"template": "test-kv"}, {"template": "attack-hook"}])
        assert_pipeline_unchanged(before, flux2_pipe)
    assert torch.equal(run(tp, "flux2_klein", templates=[{"template": "test-kv"}]), reference)


def test_a_plugins_keyboard_interrupt_in_another_thread_is_its_failure(on_path):
    """Signals reach the main thread only: a KeyboardInterrupt elsewhere is never a Ctrl-C."""
    host, caught = PluginHost(), []

    def load() -> None:
        try:
            host.get("template", "attack-kbi")
        except BaseException as exc:  # noqa: BLE001 - the test records whatever comes out
            caught.append(exc)

    worker = threading.Thread(target=load)
    worker.start()
    worker.join()
    [exc] = caught
    assert isinstance(exc, PluginError) and "KeyboardInterrupt raised by the plugin itself" in str(exc)


# -- a real Ctrl-C still stops the program --------------------------------------------------------
CTRL_C = """
import signal
signal.raise_signal(signal.SIGINT)  # a real SIGINT, as the terminal sends on Ctrl-C
for _ in range(10_000_000):  # the handler runs at the next bytecode; never reached in practice
    pass
"""
CTRL_C_SWALLOWED = """
import signal
try:
    signal.raise_signal(signal.SIGINT)
    for _ in range(10_000_000):
        pass
except KeyboardInterrupt:
    raise ImportError("a plugin that turns the user's Ctrl-C into an ImportError")
"""


@pytest.fixture
def ctrl_c_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    make_dist(
        tmp_path,
        "dt-attack-ctrlc",
        "0.1",
        {TEMPLATES: {"attack-ctrlc": "dt_attack_ctrlc:T", "attack-swallow": "dt_attack_swallow:T"}},
        {"dt_attack_ctrlc": CTRL_C, "dt_attack_swallow": CTRL_C_SWALLOWED},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(PREFIX)]:
        del sys.modules[name]


@pytest.mark.parametrize("name", ["attack-ctrlc", "attack-swallow"])
def test_a_real_ctrl_c_during_a_plugin_import_propagates(ctrl_c_site, name):
    handler = signal.getsignal(signal.SIGINT)
    host = PluginHost()
    with pytest.raises(KeyboardInterrupt):
        host.get("template", name)
    assert signal.getsignal(signal.SIGINT) is handler  # the temporary handler is gone
    assert host.info("template", name).status == "not loaded"  # the user stopped it; nothing is its fault
    assert host.get("template", "test-kv").Inputs is not None  # and the host goes on


def test_dt_doctor_stops_on_a_real_ctrl_c(ctrl_c_site):
    result = dt("doctor", sites=(ctrl_c_site,), DT_LOAD_PLUGINS="attack-ctrlc")
    assert result.returncode == 130, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
