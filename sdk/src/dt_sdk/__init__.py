"""dt-sdk: the authoring kit for Diffusion Templates.

* ``dt new NAME --carrier kv`` (or ``python -m dt_sdk new ...``) creates a template package from
  the cookiecutter template in ``dt_sdk/template`` (see :func:`new_template`);
* :mod:`dt_sdk.conformance` is a pytest plugin with fixtures and :class:`TemplateConformance`, a
  ready test battery for any template package.

Importing this package is cheap (no torch, diffusers or cookiecutter).
"""

from __future__ import annotations

from .generate import TEMPLATE_DIR, TemplateGenerationError, new_template, template_carriers, validate_name

__version__ = "0.1.0"

__all__ = ["TEMPLATE_DIR", "TemplateGenerationError", "new_template", "template_carriers", "validate_name",
           "__version__"]
