"""biounet: the U-Net of Ronneberger, Fischer and Brox (2015), faithfully.

Valid convolutions, seamless overlap-tile prediction with mirrored borders, and the
paper's training recipe, for bioimage segmentation.

>>> import biounet
>>> model = biounet.load("isbi2012")        # a shipped model, or a model directory
>>> mask = model.predict(image)             # numpy in, numpy out

Everything that needs torch is imported on first use, so ``import biounet`` (and the command
line's ``--help``) stay fast.
"""

from __future__ import annotations

import importlib

from biounet.errors import BiounetError

__version__ = "0.1.0"

# name -> module that defines it; imported when first asked for (PEP 562)
_LAZY = {
    "load": "biounet.api",
    "models": "biounet.api",
    "Model": "biounet.api",
    "train": "biounet.train_api",
    "UNet": "biounet.model",
    "UNetConfig": "biounet.architecture",
}
_SUBMODULES = ("metrics",)

__all__ = ["BiounetError", "__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"biounet.{name}")
    else:
        raise AttributeError(f"module 'biounet' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
