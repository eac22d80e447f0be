"""inpaint: repaint the masked part of a picture, keep the rest (a Diffusion Templates plugin).

Also provides the ``feathered_mask`` carrier (latent blending with a soft mask).
"""

from .feathered import FeatheredMaskCache, FeatheredMaskCarrier, feather
from .inputs import InpaintInputs
from .template import InpaintTemplate

__version__ = "0.1.0"
__all__ = ["FeatheredMaskCache", "FeatheredMaskCarrier", "InpaintInputs", "InpaintTemplate", "feather"]
