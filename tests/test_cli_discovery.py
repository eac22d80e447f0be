"""The ``dt`` command line against fake installed distributions (offline, no pip).

Each fake distribution is a ``<name>-<version>.dist-info`` folder (METADATA, entry_points.txt) next
to its plugin module in a temporary folder put on ``PYTHONPATH``: importlib.metadata finds it there
exactly as it finds an installed package. Every ``dt`` runs in a subprocess. The commands that import
torch (``info``, ``doctor``) cost seconds each, so most of them run in one batch process that calls
``cli.main`` once per command; one real ``dt doctor`` runs beside it, end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

PYTHON = sys.executable
DT = str(Path(sys.executable).with_name("dt"))
HOST = "diffusion-templates"  # the host's own carriers and backbones (more may be added): always loaded

GOOD_MODULE = '''
"""Module docstring (not the description)."""
from pydantic import Field

from diffusion_templates import Template, TemplateInputs


class GoodInputs(TemplateInputs):
    strength: float = Field(0.5, ge=0.0, le=1.0, description="How strongly the template applies.")
    prompt: str = Field(max_length=77, description="What to show.")


class GoodTemplate(Template):
    """A good template for the CLI tests.

    This second paragraph is not part of the description.
    """

    Inputs = GoodInputs
    carriers = ("kv",)
    backbones = ("flux2",)

    def encode(self, inputs, context):
        raise NotImplementedError
'''


def template_module(cls: str, carriers: tuple[str, ...], backbones: tuple[str, ...] = ("*",)) -> str:
    return textwrap.dedent(f'''
        from diffusion_templates import Template, TemplateInputs


        class {cls}(Template):
            """Template {cls}."""

            Inputs = TemplateInputs
            carriers = {carriers!r}
            backbones = {backbones!r}
        ''')


COMMANDS_MODULE = """
def _hello(args):
    print(f"hello {args.who}")
    return 0


def register(subparsers):
    parser = subparsers.add_parser("hello", help="say hello")
    parser.add_argument("--who", default="world")
    parser.set_defaults(func=_hello)
"""


def make_dist(
    site: Path,
    name: str,
    version: str,
    entry_points: dict[str, dict[str, str]],
    modules: dict[str, str] | None = None,
    requires: str | None = None,
    keywords: str | None = None,
) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    if requires:
        meta.append(f"Requires-Dist: {requires}")
    if keywords:
        meta.append(f"Keywords: {keywords}")
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    sections = [
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
        for group, eps in entry_points.items()
    ]
    (info / "entry_points.txt").write_text("\n".join(sections))
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(source)


TEMPLATES = "diffusion_templates.templates"
COMMANDS = "diffusion_templates.commands"


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """``good``: plugins that work; ``bad``: one of each kind of breakage. Returns PYTHONPATH lists."""
    good = tmp_path_factory.mktemp("site_good")
    make_dist(
        good,
        "dt-good",
        "1.2.3",
        {TEMPLATES: {"good": "dt_good:GoodTemplate"}},
        {"dt_good": GOOD_MODULE},
        requires="diffusion-templates>=0.1",
        keywords="dt-carrier:kv,dt-backbone:flux2",
    )
    make_dist(
        good,
        "dt-other",
        "0.2.0",
        {TEMPLATES: {"other": "dt_other:OtherTemplate"}},
        {"dt_other": template_module("OtherTemplate", ("lora",))},
        keywords="dt-carrier:lora",
    )

    bad = tmp_path_factory.mktemp("site_bad")
    make_dist(bad, "dt-badmod", "0.1", {TEMPLATES: {"badmod": "dt_nosuchmodule:Thing"}})
    make_dist(
        bad,
        "dt-badattr",
        "0.1",
        {TEMPLATES: {"badattr": "dt_badattr:Missing"}},
        {"dt_badattr": "PRESENT = 1\n"},
    )
    make_dist(
        bad,
        "dt-incompat",
        "0.1",
        {TEMPLATES: {"incompat": "dt_incompat:T"}},
        {"dt_incompat": "raise RuntimeError('an incompatible plugin must never be imported')\n"},
        requires="diffusion-templates>=9.0",
    )
    make_dist(
        bad,
        "dt-raises",
        "0.1",
        {TEMPLATES: {"raises": "dt_raises:T"}},
        {"dt_raises": "raise RuntimeError('boom at import')\n"},
    )
    for suffix in "ab":
        make_dist(
            bad,
            f"dt-clash-{suffix}",
            "0.1",
            {TEMPLATES: {"clash": f"dt_clash_{suffix}:T"}},
            {f"dt_clash_{suffix}": template_module("T", ("kv",))},
            keywords="dt-carrier:kv",
        )
    make_dist(
        bad,
        "dt-mismatch",
        "0.1",
        {TEMPLATES: {"mismatch": "dt_mismatch:T"}},
        {"dt_mismatch": template_module("T", ("kv",), ("flux2",))},
        keywords="dt-carrier:lora,dt-backbone:flux2",
    )
    make_dist(
        bad,
        "dt-nocarrier",
        "0.1",
        {TEMPLATES: {"nocarrier": "dt_nocarrier:T"}},
        {"dt_nocarrier": template_module("T", ("nosuchcarrier",))},
        keywords="dt-carrier:nosuchcarrier",
    )
    make_dist(bad, "dt-cmds", "0.1", {COMMANDS: {"hello": "dt_cmds:register"}}, {"dt_cmds": COMMANDS_MODULE})
    make_dist(
        bad,
        "dt-cmds-broken",
        "0.1",
        {COMMANDS: {"broken": "dt_cmds_broken:register"}},
        {"dt_cmds_broken": "raise ImportError('dt_cmds_broken needs a missing dependency')\n"},
    )
    return {"good": [str(good)], "all": [str(good), str(bad)]}


def env_for(path: list[str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DT_")}
    # The fake sites first; the caller's PYTHONPATH after them, so that `dt` runs the code under test
    # (a worktree's checkout) rather than whatever copy the environment has installed.
    env["PYTHONPATH"] = os.pathsep.join([*path, *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def run(path: list[str], *args: str, exe: tuple[str, ...] = (DT,), **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*exe, *args], env=env_for(path, **env), capture_output=True, text=True, timeout=120
    )


def statuses(output: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in json.loads(output):
        found.setdefault((row["kind"], row["name"]), []).append(row)
    return found


# -- the commands that import torch: one batch process, one real `dt doctor`, run side by side -------------
RUNNER = """
import contextlib, io, json, os, sys
from diffusion_templates import cli

results = {}
for key, call in json.load(open(sys.argv[1])).items():
    saved_env, saved_path = dict(os.environ), list(sys.path)
    os.environ.update(call.get("env", {}))
    sys.path[:0] = call["path"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(call["argv"])
    os.environ.clear(); os.environ.update(saved_env); sys.path[:] = saved_path
    results[key] = {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def heavy(sites: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    everything, good = sites["all"], sites["good"]
    calls = {
        "doctor_json": {"argv": ["doctor", "--json"], "path": everything},
        "doctor_clean": {"argv": ["doctor"], "path": good},
        "doctor_clean_json": {"argv": ["doctor", "--json"], "path": good},
        "doctor_disabled": {
            "argv": ["doctor", "--json"],
            "path": good,
            "env": {"DT_DISABLE_PLUGINS": "other"},
        },
        "info_good": {"argv": ["info", "good"], "path": everything},
        "info_good_json": {"argv": ["info", "good", "--json"], "path": everything},
        "info_kv": {"argv": ["info", "kv", "--kind", "carrier"], "path": everything},
        "info_flux2_json": {"argv": ["info", "flux2", "--json"], "path": everything},
        "info_raises": {"argv": ["info", "raises"], "path": everything},
        "info_clash": {"argv": ["info", "clash"], "path": everything},
    }
    folder = tmp_path_factory.mktemp("runner")
    (folder / "calls.json").write_text(json.dumps(calls))
    (folder / "runner.py").write_text(RUNNER)
    batch = subprocess.Popen(
        [PYTHON, str(folder / "runner.py"), str(folder / "calls.json")],
        env=env_for([]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    doctor = subprocess.Popen(
        [DT, "doctor"], env=env_for(everything), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    doctor_out, doctor_err = doctor.communicate(timeout=120)
    batch_out, batch_err = batch.communicate(timeout=120)
    assert batch.returncode == 0, batch_err
    results = json.loads(batch_out.strip().splitlines()[-1])
    results["doctor"] = {"rc": doctor.returncode, "out": doctor_out, "err": doctor_err}
    for key, result in results.items():
        assert "Traceback" not in result["out"] + result["err"], (key, result)
    return results


# (a) a good template is listed from metadata ---------------------------------------------------------------
def test_list_shows_good_template(sites: dict[str, list[str]]) -> None:
    result = run(sites["all"], "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["KIND", "NAME", "VERSION", "DISTRIBUTION"]
    good = next(line for line in lines if line.split()[1:2] == ["good"])
    assert good.split()[:7] == ["template", "good", "1.2.3", "dt-good", "kv", "flux2", "not"]
    assert "not loaded" in good
    assert any("incompatible" in line and "incompat" in line for line in lines)


def test_list_json_and_kind_filter(sites: dict[str, list[str]]) -> None:
    result = run(sites["all"], "list", "--json")
    assert result.returncode == 0, result.stderr
    found = statuses(result.stdout)
    [good] = found[("template", "good")]
    assert good == {
        "kind": "template",
        "name": "good",
        "distribution": "dt-good",
        "version": "1.2.3",
        "carriers": ["kv"],
        "backbones": ["flux2"],
        "host_requires": ">=0.1",
        "status": "not loaded",
        "problem": None,
    }
    assert {("carrier", "kv"), ("carrier", "lora"), ("backbone", "flux2")} <= set(found)
    assert found[("carrier", "kv")][0]["distribution"] == HOST
    [incompat] = found[("template", "incompat")]
    assert incompat["status"] == "incompatible" and ">=9.0" in incompat["problem"]

    carriers = run(sites["all"], "list", "--json", "--kind", "carrier")
    assert {row["kind"] for row in json.loads(carriers.stdout)} == {"carrier"}


# (e) dt list imports neither torch, diffusers nor any plugin ----------------------------------------------
def test_list_imports_nothing_heavy(sites: dict[str, list[str]]) -> None:
    script = textwrap.dedent("""
        import json, sys
        from diffusion_templates import cli
        codes = [cli.main(["list"]), cli.main(["list", "--json"]), cli.main(["list", "--kind", "template"])]
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers") or m.startswith("dt_")
                 or m in ("diffusion_templates.template", "diffusion_templates.carriers.kv")]
        print(json.dumps({"codes": codes, "heavy": heavy}))
        """)
    result = run(sites["all"], "-c", script, exe=(PYTHON,))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 0, 0], "heavy": []}


def test_python_m_runs_the_cli(sites: dict[str, list[str]]) -> None:
    result = run(sites["good"], "-m", "diffusion_templates", "list", "--kind", "template", exe=(PYTHON,))
    assert result.returncode == 0, result.stderr
    # Other installed templates (the zoo) may be listed too; the fake ones must be there.
    assert {"good", "other"} <= {line.split()[1] for line in result.stdout.splitlines()[1:]}


# (b) (c) (d) broken plugins are reported by `dt doctor` and skipped --------------------------------------
def test_doctor_reports_each_broken_plugin(heavy: dict[str, dict[str, Any]]) -> None:
    doctor = heavy["doctor"]
    assert doctor["rc"] == 1
    problems = doctor["out"].split("\nproblems:\n", 1)[1].splitlines()

    def line(name: str) -> str:
        [match] = [p for p in problems if p.strip().startswith(f"template {name!r}")]
        return match

    assert "distribution dt-badmod 0.1" in line("badmod")
    assert "bad entry point 'dt_nosuchmodule:Thing'" in line("badmod") and "no module named" in line("badmod")
    assert "distribution dt-badattr 0.1" in line("badattr")
    assert "has no attribute 'Missing'" in line("badattr")
    assert "distribution dt-incompat 0.1" in line("incompat")
    assert "incompatible host" in line("incompat") and ">=9.0" in line("incompat")
    assert "distribution dt-raises 0.1" in line("raises")
    assert "raised at import" in line("raises") and "boom at import" in line("raises")
    # the good plugin was still loaded, and nothing about it is a problem
    table = doctor["out"].split("\n\n", 1)[0]
    assert any(row.split()[1:2] == ["good"] and row.split()[-1] == "loaded" for row in table.splitlines())
    assert not any("'good'" in p for p in problems)


def test_doctor_json_statuses(heavy: dict[str, dict[str, Any]]) -> None:
    doctor = heavy["doctor_json"]
    assert doctor["rc"] == 1
    report = json.loads(doctor["out"])
    assert report["ok"] is False
    status = {(p["kind"], p["name"]): p["status"] for p in report["plugins"]}
    assert status[("template", "good")] == "loaded"
    assert status[("template", "incompat")] == "incompatible"  # never imported: its module raises
    assert {status[("template", n)] for n in ("badmod", "badattr", "raises")} == {"error"}
    categories = {(p["name"], p["distribution"]): p["category"] for p in report["problems"]}
    assert categories[("badmod", "dt-badmod")] == "bad entry point"
    assert categories[("badattr", "dt-badattr")] == "bad entry point"
    assert categories[("raises", "dt-raises")] == "import error"
    assert categories[("incompat", "dt-incompat")] == "incompatible"


def test_doctor_checks_metadata_and_carriers(heavy: dict[str, dict[str, Any]]) -> None:
    problems = json.loads(heavy["doctor_json"]["out"])["problems"]
    mismatch = [p["message"] for p in problems if p["distribution"] == "dt-mismatch"]
    assert any("emits carrier(s) kv" in m and "dt-carrier:kv" in m for m in mismatch)
    assert any("declares carrier(s) lora" in m for m in mismatch)
    [missing] = [p for p in problems if p["distribution"] == "dt-nocarrier"]
    assert missing["category"] == "missing carrier" and "'nosuchcarrier'" in missing["message"]
    [command] = [p for p in problems if p["kind"] == "command" and p["distribution"] == "dt-cmds-broken"]
    assert command["name"] == "broken"
    assert "needs a missing dependency" in command["message"]


def test_doctor_clean_and_disabled(heavy: dict[str, dict[str, Any]]) -> None:
    # Only the good fakes and the host here; other distributions installed in this environment (being
    # developed alongside) may bring problems of their own, which must not fail this test.
    report = json.loads(heavy["doctor_clean_json"]["out"])
    ours = [p for p in report["problems"] if p["distribution"] in (HOST, "dt-good", "dt-other")]
    assert ours == []
    assert {(p["name"], p["status"]) for p in report["plugins"] if p["kind"] == "template"} >= {
        ("good", "loaded"),
        ("other", "loaded"),
    }
    clean = heavy["doctor_clean"]
    assert clean["rc"] == heavy["doctor_clean_json"]["rc"] == (1 if report["problems"] else 0)
    if not report["problems"]:
        assert "no problems found" in clean["out"]
    disabled = heavy["doctor_disabled"]
    disabled_report = json.loads(disabled["out"])
    [note] = disabled_report["notes"]
    assert (note["name"], note["distribution"], note["category"]) == ("other", "dt-other", "disabled")
    assert not any(p["name"] == "other" for p in disabled_report["problems"])  # a note, not a problem
    assert disabled["rc"] == (1 if disabled_report["problems"] else 0)


# (d) (f) `dt info` on the good plugin, next to broken ones --------------------------------------------------
def test_info_text(heavy: dict[str, dict[str, Any]]) -> None:
    info = heavy["info_good"]
    assert info["rc"] == 0, info["err"]
    out = info["out"]
    assert out.splitlines()[0] == "good  (template)"
    assert "A good template for the CLI tests." in out and "second paragraph" not in out
    for expected in ("1.2.3", "dt-good", ">=0.1", "dt_good:GoodTemplate"):
        assert expected in out
    assert any(line.split() == ["carriers", "kv"] for line in out.splitlines())
    assert any(line.split() == ["compatible", "flux2"] for line in out.splitlines())
    assert "strength: float = 0.5  [ge=0.0, le=1.0]" in out
    assert "How strongly the template applies." in out
    assert "prompt: str  (required)  [max_length=77]" in out


def test_info_json_schema(heavy: dict[str, dict[str, Any]]) -> None:
    info = heavy["info_good_json"]
    assert info["rc"] == 0, info["err"]
    data = json.loads(info["out"])
    assert (data["name"], data["kind"]) == ("good", "template")
    assert (data["version"], data["distribution"]) == ("1.2.3", "dt-good")
    assert data["host_requires"] == ">=0.1" and data["status"] == "loaded"
    assert data["carriers"] == ["kv"] and data["backbones"] == ["flux2"]
    assert data["compatible_backbones"] == ["flux2"]
    schema = data["inputs_schema"]
    assert schema["required"] == ["prompt"]
    strength = schema["properties"]["strength"]
    assert (strength["type"], strength["default"]) == ("number", 0.5)
    assert (strength["minimum"], strength["maximum"]) == (0, 1)
    assert strength["description"] == "How strongly the template applies."
    assert schema["properties"]["prompt"]["maxLength"] == 77


def test_info_carrier_and_backbone(heavy: dict[str, dict[str, Any]]) -> None:
    kv = heavy["info_kv"]
    assert kv["rc"] == 0, kv["err"]
    assert "KVCache" in kv["out"] and "keys: dict[str, torch.Tensor]" in kv["out"]
    [backbones] = [
        line.split(None, 1)[1] for line in kv["out"].splitlines() if line.split()[:1] == ["backbones"]
    ]
    assert {"flux", "flux2"} <= set(backbones.split(", "))
    flux2 = json.loads(heavy["info_flux2_json"]["out"])
    assert flux2["describe"]["name"] == "flux2" and "kv" in flux2["describe"]["carriers"]
    assert {"good", "mismatch"} <= set(flux2["templates"])


def test_info_on_broken_plugins_is_a_clean_error(heavy: dict[str, dict[str, Any]]) -> None:
    raises = heavy["info_raises"]
    assert raises["rc"] == 2
    assert raises["err"].startswith("dt: error: plugin 'raises' (distribution 'dt-raises')")
    assert "boom at import" in raises["err"]
    clash = heavy["info_clash"]
    assert clash["rc"] == 2 and "conflict" in clash["err"]


# (g) name conflicts ----------------------------------------------------------------------------------------
def test_name_conflict_marks_both(sites: dict[str, list[str]], heavy: dict[str, dict[str, Any]]) -> None:
    clashes = statuses(run(sites["all"], "list", "--json").stdout)[("template", "clash")]
    assert sorted(c["distribution"] for c in clashes) == ["dt-clash-a", "dt-clash-b"]
    assert {c["status"] for c in clashes} == {"conflict"}
    assert all("dt-clash-a, dt-clash-b" in c["problem"] for c in clashes)
    problems = heavy["doctor"]["out"].split("\nproblems:\n", 1)[1]
    assert "template 'clash' (distribution dt-clash-a 0.1): name conflict" in problems
    assert "template 'clash' (distribution dt-clash-b 0.1): name conflict" in problems


# (h) DT_DISABLE_PLUGINS / DT_LOAD_PLUGINS -----------------------------------------------------------------
def test_disable_and_load_only(sites: dict[str, list[str]]) -> None:
    disabled = statuses(run(sites["all"], "list", "--json", DT_DISABLE_PLUGINS="good").stdout)
    assert disabled[("template", "good")][0]["status"] == "disabled"
    assert disabled[("template", "other")][0]["status"] == "not loaded"

    only = statuses(run(sites["all"], "list", "--json", DT_LOAD_PLUGINS="other").stdout)
    assert only[("template", "other")][0]["status"] == "not loaded"
    for key, rows in only.items():
        for row in rows:
            if row["distribution"] == HOST:
                assert row["status"] == "not loaded", key
            elif key == ("template", "incompat"):
                assert row["status"] == "incompatible"
            elif key != ("template", "other"):
                assert row["status"] == "disabled", key
    assert any(row["distribution"] == HOST for rows in only.values() for row in rows)


# (i) extension commands -------------------------------------------------------------------------------------
def test_extension_command(sites: dict[str, list[str]]) -> None:
    hello = run(sites["all"], "hello", "--who", "templates")
    assert hello.returncode == 0, hello.stderr
    assert hello.stdout == "hello templates\n"
    # the broken command plugin next to it is named, without a traceback
    assert "command plugin 'broken' (distribution dt-cmds-broken" in hello.stderr
    assert "Traceback" not in hello.stderr


def test_broken_extension_command(sites: dict[str, list[str]]) -> None:
    broken = run(sites["all"], "broken")
    assert broken.returncode == 1
    assert "dt: error: command plugin 'broken' (distribution dt-cmds-broken" in broken.stderr
    assert "ImportError: dt_cmds_broken needs a missing dependency" in broken.stderr
    assert "Traceback" not in broken.stderr
    help_text = run(sites["all"], "--help")
    assert help_text.returncode == 0 and "hello" in help_text.stdout


# (j) unknown names ---------------------------------------------------------------------------------------
def test_info_unknown_name(sites: dict[str, list[str]]) -> None:
    result = run(sites["all"], "info", "nosuch")
    assert result.returncode == 2
    assert result.stderr.startswith("dt: error: no plugin named 'nosuch' is installed")
    for name in ("good", "other", "kv", "lora", "flux2"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr
    unknown_template = run(
        sites["good"], "info", "nosuch", "--kind", "template", exe=(PYTHON, "-m", "diffusion_templates")
    )
    assert unknown_template.returncode == 2 and "available templates: " in unknown_template.stderr
    assert "good" in unknown_template.stderr and "other" in unknown_template.stderr


def test_demo_and_generate_dispatch(sites: dict[str, list[str]]) -> None:
    script = textwrap.dedent("""
        import json, sys, types
        from diffusion_templates import cli
        demo = types.ModuleType("diffusion_templates.demo")
        sys.modules["diffusion_templates.demo"] = demo
        seen = []
        demo.main = lambda args: seen.append({k: v for k, v in vars(args).items() if k != "func"}) or 3
        codes = [cli.main(["demo", "--out", "o", "--steps", "4"]), cli.main(["generate"])]
        print(json.dumps({"codes": codes, "seen": seen}))
        """)
    result = run(sites["good"], "-c", script, exe=(PYTHON,))
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["codes"] == [3, 3]
    demo_args, generate_args = got["seen"]
    assert (demo_args["command"], demo_args["out"], demo_args["steps"]) == ("demo", "o", 4)
    assert generate_args["command"] == "generate"
    # out defaults to None in the namespace (out.png is applied after a job file's own out: issue 20,
    # where the parser's default used to override the job's).
    assert (generate_args["out"], generate_args["template"]) == (None, [])


def test_keywords_scoped_to_one_template() -> None:
    """A distribution with several templates scopes keywords with ``@<template>``; others get the rest."""
    from diffusion_templates.plugins import _keywords

    class Dist:
        metadata = {
            "Keywords": "diffusion-templates,dt-carrier:guidance,dt-backbone:flux2,dt-backbone:sd3,"
            "dt-carrier:kv@brightness-kv,dt-backbone:flux2@brightness-kv"
        }

    assert _keywords(Dist, "dt-carrier:", "brightness") == ("guidance",)
    assert _keywords(Dist, "dt-backbone:", "brightness") == ("flux2", "sd3")
    assert _keywords(Dist, "dt-carrier:", "brightness-kv") == ("kv",)
    assert _keywords(Dist, "dt-backbone:", "brightness-kv") == ("flux2",)
    assert _keywords(Dist, "dt-carrier:") == ("guidance",)
