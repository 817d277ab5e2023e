"""The napari plugin (``pip install 'biounet[napari]'``): a dock widget that segments an image
layer with a shipped model or a model folder, and a sample image.

`segment` holds what the widget does, with no Qt (it runs against
``napari.components.ViewerModel``); `widget` is the Qt dock widget around it; `sample` the
sample data. The npe2 manifest is ``napari.yaml`` beside this file.
"""
