"""``brightness``: a Diffusion Templates plugin that steers a generation's mean luminance.

``pip install`` this package and the template ``brightness`` is available to
``diffusion_templates.TemplatePipeline`` and listed by ``dt list``::

    pipe(prompt="...", templates=[{"template": "brightness", "scale": 0.7}])
"""

from .inputs import BrightnessInputs
from .template import BrightnessTemplate

__version__ = "0.1.0"
__all__ = ["BrightnessInputs", "BrightnessTemplate"]
