"""{{ cookiecutter.description }}

A Diffusion Templates plugin: ``pip install`` this package and the template ``{{ cookiecutter.name }}``
is available to ``diffusion_templates.TemplatePipeline`` and listed by ``dt list``.
"""

from .inputs import {{ cookiecutter.class_prefix }}Inputs
from .model import {{ cookiecutter.class_prefix }}Model
from .template import {{ cookiecutter.class_prefix }}Template

__version__ = "{{ cookiecutter.version }}"
__all__ = ["{{ cookiecutter.class_prefix }}Inputs", "{{ cookiecutter.class_prefix }}Model", "{{ cookiecutter.class_prefix }}Template"]
