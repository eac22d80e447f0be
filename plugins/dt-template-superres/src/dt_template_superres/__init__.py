"""superres: upscale a picture by 2 or 4 with the base model redrawing detail (a Diffusion Templates plugin).

Also provides the ``tiled_denoise`` carrier (MultiDiffusion-style tiled denoising within one call).
"""

from .inputs import SuperResInputs
from .template import SuperResTemplate, upsample
from .tiling import TiledDenoiseCache, TiledDenoiseCarrier

__version__ = "0.1.0"
__all__ = ["SuperResInputs", "SuperResTemplate", "TiledDenoiseCache", "TiledDenoiseCarrier", "upsample"]
