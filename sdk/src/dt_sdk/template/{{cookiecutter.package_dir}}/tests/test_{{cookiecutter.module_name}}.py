"""The dt-sdk conformance kit run against this package's installed template, plus its own tests.

``TemplateConformance`` checks that the template is installed and loads through the host, that its
input schema accepts ``valid_inputs`` and rejects every entry of ``invalid_inputs`` (each one
overrides the first valid inputs), that its caches fit every declared backbone, save and load
bit-exactly, change a tiny pipeline's output and leave the pipeline bit-identical, that it composes
with another template, and that its model loads only safetensors.
"""

from __future__ import annotations

{% include "carriers/" ~ cookiecutter.carrier ~ "/test_imports.py" ignore missing %}from diffusion_templates import TemplatePipeline
from dt_sdk.conformance import TemplateConformance, caches_equal

TEMPLATE = "{{ cookiecutter.name }}"


class Test{{ cookiecutter.class_prefix }}(TemplateConformance):
    template = TEMPLATE
{% include "carriers/" ~ cookiecutter.carrier ~ "/conformance.py" %}

{% include "carriers/" ~ cookiecutter.carrier ~ "/tests.py" %}