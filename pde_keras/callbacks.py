"""The callbacks of a training run: what it logs and which files it keeps.

`EpochTimer` and `StabilityMonitor` add measurements to each epoch's logs;
`run_callbacks` are the Keras callbacks that write a run directory's
`log.csv`, `last.keras`, `best.keras` and `tensorboard/`.
"""

import pathlib
import time

import keras
import numpy as np

from pde_keras import inspection, run_directory

# Test images on which the PDE layers' Courant and diffusion numbers are
# measured after every epoch (the first of the test split, always the same).
STABILITY_IMAGES = 64


class EpochTimer(keras.callbacks.Callback):
    """Logs each epoch's training time (before its evaluation) as `train_time_s`.

    Placed before `CSVLogger` and `TensorBoard` in the callback list, so
    that they record it with the epoch's other metrics.
    """

    KEY = "train_time_s"

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._train_time = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        # Within `fit`, evaluation follows the epoch's training steps.
        if self._train_time is None:
            self._train_time = time.perf_counter() - self._start

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            elapsed = self._train_time or time.perf_counter() - self._start
            logs[self.KEY] = round(elapsed, 3)


class StabilityMonitor(keras.callbacks.Callback):
    """Logs each PDE layer's largest Courant and diffusion numbers per epoch.

    Measured on a fixed batch of test images in inference mode
    (`pde_keras.inspection.stability_numbers`) and added to the epoch's logs
    as `<layer>_courant` and `<layer>_diffusion_number`, so that `CSVLogger`
    and `TensorBoard` placed after it record them. The scheme's leapfrog
    advection needs a Courant number below 1. Nothing is logged for models
    without PDE layers.

    Args:
        images: the batch, as the trained model takes it (raw pixels).
    """

    NUMBERS = ("courant", "diffusion_number")

    def __init__(self, images):
        super().__init__()
        self.images = np.asarray(images, dtype="float32")

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for layer, measured in inspection.stability_numbers(self.model, self.images).items():
            for number in self.NUMBERS:
                logs[f"{layer}_{number}"] = measured[number]


def run_callbacks(workdir, resuming):
    """Stop on NaN, then the callbacks that write `workdir`'s log, checkpoints
    and TensorBoard events (appending to them when `resuming`)."""
    workdir = pathlib.Path(workdir)
    best_accuracy = None
    if resuming:
        best_accuracy, _ = run_directory.best_epoch(workdir / run_directory.LOG_FILE)
    checkpoints = run_directory.CHECKPOINTS
    return [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(str(workdir / run_directory.LOG_FILE), append=resuming),
        keras.callbacks.ModelCheckpoint(str(workdir / checkpoints["last"])),
        keras.callbacks.ModelCheckpoint(
            str(workdir / checkpoints["best"]), monitor="val_accuracy", mode="max",
            save_best_only=True, initial_value_threshold=best_accuracy),
        keras.callbacks.TensorBoard(str(workdir / run_directory.TENSORBOARD_DIR),
                                    write_graph=False),
    ]
