"""Refuse names that would make an invalid distribution, entry point or import package."""

import os
import re
import sys

NAME = "{{ cookiecutter.name }}"
CARRIER = "{{ cookiecutter.carrier }}"
MODULE = "{{ cookiecutter.module_name }}"
PREFIX = "{{ cookiecutter.class_prefix }}"
TEMPLATE_DIR = "{{ cookiecutter._repo_dir }}"

problems = []
if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", NAME):
    problems.append(f"name {NAME!r}: use lowercase letters, digits and single dashes, starting with a letter "
                    "(e.g. my-glow)")
if not MODULE.isidentifier():
    problems.append(f"module_name {MODULE!r} is not a Python identifier")
if not PREFIX.isidentifier():
    problems.append(f"class_prefix {PREFIX!r} is not a Python identifier")
if TEMPLATE_DIR and not os.path.isdir(os.path.join(TEMPLATE_DIR, "templates", "carriers", CARRIER)):
    problems.append(f"carrier {CARRIER!r} has no snippets under templates/carriers/{CARRIER}/ in the template")
if problems:
    print("dt-sdk template: cannot generate:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
