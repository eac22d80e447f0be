"""``color``: a Diffusion Templates plugin that steers a generation's mean colour (the reference's SoftRGB).

``pip install`` this package and the template ``color`` is available to
``diffusion_templates.TemplatePipeline`` and listed by ``dt list``::

    pipe(prompt="...", templates=[{"template": "color", "r": 0.8, "g": 0.5, "b": 0.2}])
"""

from .inputs import ColorInputs
from .template import ColorTemplate

__version__ = "0.1.0"
__all__ = ["ColorInputs", "ColorTemplate"]
