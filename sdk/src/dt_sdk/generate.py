"""Generating a template package from the cookiecutter template that ships in ``dt_sdk/template``.

The same template works with plain ``cookiecutter path/to/dt_sdk/template``. Carrier-specific code
lives in ``template/templates/carriers/<carrier>/`` (cookiecutter's include folder); the package
files include the snippets of the chosen carrier, so a new carrier choice is one new folder plus
its name in ``cookiecutter.json``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).resolve().parent / "template"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


class TemplateGenerationError(Exception):
    """A template package could not be generated (bad name, unknown carrier, folder exists)."""


def _context() -> dict[str, Any]:
    return json.loads((TEMPLATE_DIR / "cookiecutter.json").read_text(encoding="utf-8"))


def template_carriers() -> list[str]:
    """The carrier choices of the cookiecutter template (those that have snippets)."""
    return [c for c in _context()["carrier"] if (TEMPLATE_DIR / "templates" / "carriers" / c).is_dir()]


def validate_name(name: str) -> str:
    """``name`` if it is a valid template name (lowercase letters, digits, single dashes)."""
    if not NAME_PATTERN.fullmatch(name):
        raise TemplateGenerationError(
            f"invalid template name {name!r}: use lowercase letters, digits and single dashes, starting "
            "with a letter (e.g. my-glow); it becomes the entry point name, dt-template-<name> and "
            "dt_template_<name_with_underscores>")
    return name


def installed_provider(name: str) -> str | None:
    """The installed distribution that already provides template ``name`` or ``dt-template-<name>``.

    Reads metadata only (no plugin is imported). A new package with the same entry-point name would
    silently replace the installed template in discovery (and its sibling templates with it), so
    ``dt new`` refuses such a name unless forced.
    """
    from importlib import metadata

    wanted = f"dt-template-{name}"
    for dist in metadata.distributions():
        dist_name = dist.metadata.get("Name") or ""
        if dist_name.lower().replace("_", "-") == wanted:
            return dist_name
        for ep in dist.entry_points:
            if ep.group == "diffusion_templates.templates" and ep.name == name:
                return f"{dist_name or '<unnamed distribution>'} (template {name!r})"
    return None


def new_template(name: str, carrier: str | None = None, *, output_dir: str | os.PathLike = ".",
                 author: str | None = None, version: str | None = None, no_input: bool = True,
                 overwrite: bool = False, force: bool = False) -> Path:
    """Generate ``dt-template-<name>/`` under ``output_dir``; returns its path.

    With ``no_input`` (the default) nothing is asked: values not given come from the template's
    defaults (carrier: the first choice, ``kv``). Otherwise cookiecutter prompts for each value,
    offering the given ones as defaults. A name an installed distribution already provides is
    refused unless ``force`` (the new package would replace it once installed).
    """
    validate_name(name)
    provider = None if force else installed_provider(name)
    if provider is not None:
        raise TemplateGenerationError(
            f"template name {name!r} is already provided by the installed distribution {provider}; "
            "installing the new package would replace it. Choose another name, or pass --force")
    choices = template_carriers()
    if carrier is not None and carrier not in choices:
        raise TemplateGenerationError(f"unknown carrier {carrier!r}; the template offers {choices}")
    extra: dict[str, Any] = {"name": name}
    for key, value in (("carrier", carrier), ("author", author), ("version", version)):
        if value is not None:
            extra[key] = value
    output_dir = Path(output_dir)
    target = output_dir / f"dt-template-{name}"
    if target.exists() and not overwrite:
        raise TemplateGenerationError(f"{target} already exists: remove it or choose another output folder")

    from cookiecutter.exceptions import CookiecutterException
    from cookiecutter.main import cookiecutter

    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = cookiecutter(str(TEMPLATE_DIR), no_input=no_input, extra_context=extra,
                              output_dir=str(output_dir), overwrite_if_exists=overwrite)
    except CookiecutterException as exc:
        raise TemplateGenerationError(f"cookiecutter failed: {exc}") from exc
    return Path(result)
