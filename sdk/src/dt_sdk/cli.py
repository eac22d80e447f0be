"""``dt new`` and ``dt train``: the host CLI loads :func:`register` from the ``diffusion_templates.commands``
group.

``python -m dt_sdk new ...`` (and ``python -m dt_sdk train ...``) run the same commands without the host CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .generate import TemplateGenerationError, new_template, template_carriers


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``new`` and ``train`` to the host CLI's sub-commands (their ``func`` returns an exit code)."""
    parser = subparsers.add_parser(
        "new", help="create a template package (dt-template-NAME/) ready to pip install and test",
        description="Create dt-template-NAME/: a template plugin package with an input schema, a Template "
                    "model, the plugin class, pyproject metadata for `dt list` and conformance tests.")
    parser.add_argument("name", help="template name: lowercase letters, digits and dashes (e.g. my-glow)")
    parser.add_argument("--carrier", choices=template_carriers(), default=None,
                        help="how the template reaches the model (default: kv)")
    parser.add_argument("--output-dir", type=Path, default=Path("."),
                        help="folder in which dt-template-NAME/ is created (default: the current folder)")
    parser.add_argument("--author", default=None, help="author name for pyproject.toml")
    parser.add_argument("--no-input", action="store_true",
                        help="ask nothing: use the template's defaults for values not given "
                             "(also the case when standard input is not a terminal)")
    parser.add_argument("--force", action="store_true",
                        help="create the package even if an installed distribution already provides "
                             "this template name (the new one would replace it once installed)")
    parser.set_defaults(func=run_new)
    from .train.cli import register as register_train  # `dt train`: light, imports no torch

    register_train(subparsers)


def run_new(args: argparse.Namespace) -> int:
    no_input = args.no_input or not sys.stdin.isatty()
    try:
        path = new_template(args.name, args.carrier, output_dir=args.output_dir, author=args.author,
                            no_input=no_input, force=args.force)
    except TemplateGenerationError as exc:
        print(f"dt new: error: {exc}", file=sys.stderr)
        return 2
    print(f"created {path}\n\nnext:\n  cd {path}\n  pip install -e \".[test]\"\n  pytest\n  dt list")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dt_sdk",
                                     description="dt-sdk commands (also `dt new`, `dt train`).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)
