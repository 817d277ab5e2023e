"""biounet: the U-Net of Ronneberger, Fischer and Brox (2015), faithfully.

Valid convolutions, seamless overlap-tile prediction with mirrored borders, and the
paper's training recipe, for bioimage segmentation.
"""

from biounet.errors import BiounetError
from biounet.model import UNet, UNetConfig

__all__ = ["BiounetError", "UNet", "UNetConfig", "__version__"]
__version__ = "0.1.0"
