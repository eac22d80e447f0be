"""`dt new NAME` refuses a name an installed distribution already provides (unless --force).

A package generated as `brightness` would, once installed, replace the zoo's `brightness` entry point
in discovery (and its sibling `brightness-kv` with it): the name clash is caught before any file is written.
"""

from __future__ import annotations

import pytest

from dt_sdk import TemplateGenerationError, new_template
from dt_sdk.cli import main
from dt_sdk.generate import installed_provider


@pytest.mark.parametrize("name", ["brightness", "brightness-kv", "color-kv", "superres"])
def test_installed_template_names_are_refused(tmp_path, name):
    with pytest.raises(TemplateGenerationError, match=f"{name!r} is already provided by.*--force"):
        new_template(name, output_dir=tmp_path)
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused name"


def test_the_refusal_names_the_distribution():
    assert installed_provider("brightness-kv").startswith("dt-template-brightness")
    assert installed_provider("depth") is not None  # the distribution name dt-template-depth itself
    assert installed_provider("surely-not-installed-xyz") is None


def test_force_creates_the_package_anyway(tmp_path):
    path = new_template("brightness", output_dir=tmp_path, force=True)
    assert (path / "pyproject.toml").is_file()


def test_cli_reports_the_clash_and_accepts_force(tmp_path, capsys):
    assert main(["new", "color", "--output-dir", str(tmp_path), "--no-input"]) == 2
    assert "already provided by the installed distribution dt-template-color" in capsys.readouterr().err
    assert main(["new", "color", "--output-dir", str(tmp_path), "--no-input", "--force"]) == 0
    assert (tmp_path / "dt-template-color" / "pyproject.toml").is_file()
