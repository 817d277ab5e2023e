"""The dock widget: pick an image layer, a model (shipped, or a folder), the output and TTA;
"Segment" runs `Model.predict` in a worker thread with a progress bar and adds the result.

The work itself is `biounet.napari.segment`; this module is only the Qt form around it.
"""

from __future__ import annotations

import threading
import time

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    create_widget,
)

from biounet.napari.segment import (
    OUTPUTS,
    add_result,
    model_choices,
    predict_layer,
    stored_tta,
)

FOLDER = "a model folder..."
POLL_S = 0.1  # how often the worker reports progress to the bar


class SegmentWidget(Container):
    """Segment an image layer with a biounet U-Net (napari's dock widget)."""

    def __init__(self, napari_viewer) -> None:
        self.viewer = napari_viewer
        self.image = create_widget(annotation="napari.layers.Image", label="image")
        choices = [*model_choices(), FOLDER]
        self.model = ComboBox(label="model", choices=choices, value=choices[0])
        self.folder = FileEdit(label="model folder", mode="d", visible=False)
        self.output = ComboBox(label="output", choices=list(OUTPUTS), value="mask")
        self.tta = CheckBox(text="test-time augmentation (8 flips/rotations, 8x slower)")
        self.run_button = PushButton(text="Segment")
        self.progress = ProgressBar(label="progress", min=0, max=1000, value=0)
        self.status = Label(value="")
        super().__init__(
            widgets=[
                self.image,
                self.model,
                self.folder,
                self.output,
                self.tta,
                self.run_button,
                self.progress,
                self.status,
            ]
        )
        self.model.changed.connect(lambda value: setattr(self.folder, "visible", value == FOLDER))
        # the box starts as the chosen model predicts by default (its stored postprocess.tta)
        self.model.changed.connect(self._model_chosen)
        self.folder.changed.connect(self._model_chosen)
        self._model_chosen()
        self.run_button.changed.connect(self.start)
        self.worker = None

    def _model_chosen(self, *_) -> None:
        if self.model.value != FOLDER or str(self.folder.value) not in ("", "."):
            self.tta.value = stored_tta(self.source())

    def source(self) -> str:
        """The model to load: a shipped name or the chosen folder."""
        if self.model.value == FOLDER:
            return str(self.folder.value)
        return str(self.model.value)

    def start(self) -> None:
        """Start a segmentation in a worker thread (the button's action)."""
        from napari.qt.threading import create_worker

        layer = self.image.value
        if layer is None:
            self.status.value = "open an image first"
            return
        self.run_button.enabled = False
        self.status.value = f"segmenting {layer.name}..."
        self.progress.value = 0
        self.worker = create_worker(
            _run,
            layer,
            self.source(),
            self.output.value,
            bool(self.tta.value),
            _start_thread=False,
        )
        self.worker.yielded.connect(self._advance)
        self.worker.returned.connect(self._done)
        self.worker.errored.connect(self._failed)
        self.worker.finished.connect(lambda: setattr(self.run_button, "enabled", True))
        self.worker.start()

    def _advance(self, fraction: float) -> None:
        self.progress.value = int(1000 * fraction)

    def _done(self, result) -> None:
        layers = add_result(self.viewer, result)
        self.progress.value = 1000
        self.status.value = "added " + ", ".join(layer.name for layer in layers)

    def _failed(self, exc: Exception) -> None:
        self.status.value = f"failed: {exc}"


def _run(image, source: str, output: str, tta: bool):
    """The worker: predict in a thread of its own, yield the fraction of tiles done every
    `POLL_S`, return the `Result` (napari's generator workers report yields on the main
    thread, where the bar may be touched)."""
    state: dict = {"fraction": 0.0}

    def progress(done: int, total: int) -> None:
        state["fraction"] = done / max(total, 1)

    def work() -> None:
        try:
            state["result"] = predict_layer(image, source, output, tta, progress)
        except BaseException as exc:  # handed to the main thread below, as the worker's error
            state["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while thread.is_alive():
        yield state["fraction"]
        time.sleep(POLL_S)
    if "error" in state:
        raise state["error"]
    return state["result"]
