"""The README's napari picture: the widget docked beside an ISBI 2012 slice it segmented.

    BIOUNET_DATA=../shared/data xvfb-run -s "-screen 0 1400x900x24" \
        .venv/bin/python docs/napari_screenshot.py docs/pictures/napari_widget.png
"""

import sys
import time

import napari

from biounet.napari.sample import isbi_sample
from biounet.napari.widget import SegmentWidget

viewer = napari.Viewer(show=True)
viewer.window._qt_window.resize(1300, 800)
((image, meta, _),) = isbi_sample()
viewer.add_image(image, **meta)
widget = SegmentWidget(viewer)
viewer.window.add_dock_widget(widget, name="U-Net segmentation", area="right")
widget.model.value, widget.output.value = "isbi2012", "mask"
widget.run_button.clicked.emit()
app = napari.qt.get_qapp()
while widget.worker is None or not widget.status.value.startswith(("added", "failed")):
    app.processEvents()
    time.sleep(0.05)
viewer.layers[-1].opacity = 0.5
for _ in range(20):
    app.processEvents()
    time.sleep(0.05)
viewer.screenshot(sys.argv[1], canvas_only=False)
viewer.close()
