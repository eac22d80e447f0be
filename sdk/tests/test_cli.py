"""`dt new` / `python -m dt_sdk new` and the cookiecutter template, without installing anything."""

from __future__ import annotations

import argparse
import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dt_sdk import TEMPLATE_DIR, TemplateGenerationError, new_template, template_carriers
from dt_sdk.cli import main, register

SNIPPETS = ("inputs.py", "model.py", "template.py", "conformance.py", "tests.py", "README.md")


def test_every_carrier_choice_has_its_snippets():
    choices = json.loads((TEMPLATE_DIR / "cookiecutter.json").read_text())["carrier"]
    assert choices == template_carriers()
    assert choices == ["kv", "lora", "guidance", "embedding", "latent_mask", "residual"]
    for carrier in choices:
        for snippet in SNIPPETS:
            assert (TEMPLATE_DIR / "templates" / "carriers" / carrier / snippet).is_file(), (carrier, snippet)


def test_register_adds_new_to_a_host_style_parser(tmp_path):
    parser = argparse.ArgumentParser(prog="dt")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["new", "my-glow", "--carrier", "lora", "--output-dir", str(tmp_path),
                              "--no-input"])
    assert (args.name, args.carrier, args.output_dir, args.no_input) == ("my-glow", "lora", tmp_path, True)
    assert args.func(args) == 0
    assert (tmp_path / "dt-template-my-glow" / "src" / "dt_template_my_glow" / "template.py").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["new", "my-glow", "--carrier", "telepathy"])


def test_generated_layout_and_metadata(tmp_path):
    package = new_template("neon-sign2", "kv", output_dir=tmp_path, author="Ada")
    assert package == tmp_path / "dt-template-neon-sign2"
    module = package / "src" / "dt_template_neon_sign2"
    assert sorted(p.name for p in module.iterdir()) == ["__init__.py", "inputs.py", "model.py", "template.py"]
    pyproject = (package / "pyproject.toml").read_text()
    for expected in ('name = "dt-template-neon-sign2"', 'version = "0.1.0"', '{ name = "Ada" }',
                     '"dt-carrier:kv"', '"dt-backbone:flux2"', '"dt-backbone:flux"',
                     'dependencies = ["diffusion-templates>=0.1,<0.2"]',
                     '[project.entry-points."diffusion_templates.templates"]',
                     'neon-sign2 = "dt_template_neon_sign2.template:NeonSign2Template"'):
        assert expected in pyproject, expected
    assert "class NeonSign2Template(Template):" in (module / "template.py").read_text()
    assert 'template = TEMPLATE' in (package / "tests" / "test_dt_template_neon_sign2.py").read_text()
    readme = (package / "README.md").read_text()
    assert '{"template": "neon-sign2", "scale": 1.0}' in readme and "{{" not in readme


def test_carrier_choice_selects_the_snippets(tmp_path):
    kv = new_template("glow", "kv", output_dir=tmp_path / "kv")
    lora = new_template("glow", "lora", output_dir=tmp_path / "lora")
    assert "LoraCache" in (lora / "src" / "dt_template_glow" / "template.py").read_text()
    assert "KVCache" in (kv / "src" / "dt_template_glow" / "template.py").read_text()
    assert "tokens" not in (lora / "src" / "dt_template_glow" / "inputs.py").read_text()
    assert "dt-carrier:lora" in (lora / "pyproject.toml").read_text()


@pytest.mark.parametrize("name", ["My-Glow", "my_glow", "-glow", "glow-", "my--glow", "2glow", "glöw", ""])
def test_invalid_names_are_refused(tmp_path, name):
    with pytest.raises(TemplateGenerationError, match="invalid template name"):
        new_template(name, output_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["new", "Bad_Name", "--no-input", "--output-dir", str(tmp_path)]) == 2
    assert "dt new: error: invalid template name 'Bad_Name'" in capsys.readouterr().err
    assert main(["new", "twice", "--no-input", "--output-dir", str(tmp_path)]) == 0
    assert main(["new", "twice", "--no-input", "--output-dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_python_dash_m(tmp_path, child_env):
    out = subprocess.run([sys.executable, "-m", "dt_sdk", "new", "via-m", "--carrier", "lora",
                          "--output-dir", str(tmp_path)], capture_output=True, text=True, env=child_env,
                         stdin=subprocess.DEVNULL, check=True).stdout  # no terminal: nothing is asked
    assert f"created {tmp_path / 'dt-template-via-m'}" in out
    assert "pip install -e" in out


def test_plain_cookiecutter_gives_the_same_package(tmp_path, child_env):
    cookiecutter = Path(sys.executable).parent / "cookiecutter"
    if not cookiecutter.exists():
        pytest.skip("the cookiecutter command is not installed next to this Python")
    subprocess.run([str(cookiecutter), str(TEMPLATE_DIR), "--no-input", "--output-dir", str(tmp_path / "cc"),
                    "name=same-glow", "carrier=lora"], check=True, env=child_env, capture_output=True)
    new_template("same-glow", "lora", output_dir=tmp_path / "dt")
    a, b = tmp_path / "cc" / "dt-template-same-glow", tmp_path / "dt" / "dt-template-same-glow"
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files_a], shallow=False)
    assert not mismatch and not errors
