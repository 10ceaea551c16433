"""Trained runs for the figures: the saved model, its config, its test images.

A run is a `model_dir` (`pde_keras.run_directory`) written by
`pde_keras.training.train_and_evaluate`
(`python -m experiments.mnist` / `experiments.cifar`): `config.json`,
`last.keras` and `best.keras` (classifiers that take raw pixels 0-255 and
normalise them inside), `log.csv`, `results.json`.

The figures feed the model exactly as training evaluated it: the test
images come from `pde_keras.input_pipeline.load_splits` with the run's config
(the same seeded subset), and go through the saved model's own
normalisation layer.

Every problem a person can cause (a directory without a model, a model
without PDE layers, an image index out of range, an unreadable image)
raises `VisualizeError`, a `ValueError` whose message is one line.
"""

import collections
import dataclasses
import functools
import pathlib

import keras
import numpy as np

from pde_keras import config as config_module, inspection, input_pipeline, run_directory
from pde_keras import validation

CHECKPOINTS = tuple(run_directory.CHECKPOINTS)
WRITTEN_BY = "written by pde_keras.training (python -m experiments.mnist / experiments.cifar)"


class VisualizeError(ValueError):
    """A run, image or option the figures cannot use; the message is one line."""


@dataclasses.dataclass(frozen=True)
class TestSplit:
    """The test images a run was evaluated on.

    Attributes:
        images: uint8 NHWC pixels.
        labels: int64 labels.
        class_names: class names, index = label.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple


class TrainedRun:
    """A trained model directory, loaded for figures.

    Args:
        model_dir: the directory `train_and_evaluate` wrote.
        checkpoint: `"last"` (the final model, whose test accuracy is in
            `results.json`) or `"best"` (best per-epoch test accuracy).
        data_dir: where the data is now, if it moved since training
            (default: the config's `data_dir`).

    Raises:
        VisualizeError: no such directory, no model or config in it, or a
            model that does not load.
    """

    def __init__(self, model_dir, checkpoint="last", data_dir=None):
        validation.check_choice("checkpoint", checkpoint, CHECKPOINTS)
        if not str(model_dir).strip():
            raise VisualizeError(str(validation.invalid(
                "model_dir", "a run directory", model_dir)))
        self.model_dir = pathlib.Path(model_dir)
        if not self.model_dir.is_dir():
            raise VisualizeError(f"Model directory {str(self.model_dir)!r} does not exist.")
        self.model_path = self.model_dir / run_directory.CHECKPOINTS[checkpoint]
        if not self.model_path.is_file():
            raise VisualizeError(
                f"No model in {str(self.model_dir)!r}: expected {self.model_path.name}, "
                f"{WRITTEN_BY}.")
        self.saved_config = read_config(self.model_dir)
        self.config = _config(self.saved_config, data_dir)
        try:
            self.model = keras.saving.load_model(str(self.model_path), compile=False)
        except Exception as error:  # Keras raises many types for a bad file.
            raise VisualizeError(
                f"Cannot load the model {str(self.model_path)!r}: "
                f"{type(error).__name__}: {validation.first_line(error)}") from None

    @functools.cached_property
    def test_split(self):
        """The run's `TestSplit` (loaded on first use)."""
        dataset, _, (images, labels) = input_pipeline.load_splits(self.config)
        return TestSplit(images, labels, tuple(dataset.info.class_names))

    @property
    def image_shape(self):
        """`(height, width, channels)` of the model's input."""
        return tuple(self.model.input_shape[1:])

    def image(self, index=0, path=None):
        """One image for the figures: test image `index`, or the file `path`.

        Args:
            index: index into the run's test split (the seeded subset it
                was evaluated on). Ignored when `path` is given.
            path: an image file (PNG, JPEG, ...), converted to the model's
                channels and resized to its input size.

        Returns:
            `(pixels, caption)`: uint8 `(height, width, channels)` pixels
            and a caption such as `"test image 3 (cat)"`.
        """
        if path is not None:
            return read_image(path, self.image_shape), pathlib.Path(path).name
        split = self.test_split
        count = len(split.labels)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise VisualizeError(str(validation.invalid(
                "image_index", f"an integer in [0, {count - 1}] (the {count} test "
                f"image{'s' if count > 1 else ''} of {str(self.model_dir)!r})", index)))
        return split.images[index], test_caption(index, split.labels[index], split.class_names)


def test_caption(index, label, class_names):
    """`"test image 3 (cat)"`."""
    return f"test image {index} ({class_names[int(label)]})"


def read_config(model_dir):
    """The config dict of a run: its `config.json` (else `results.json`'s copy)."""
    try:
        return run_directory.read_config(model_dir)
    except FileNotFoundError:
        raise VisualizeError(
            f"No config.json in {str(model_dir)!r}: expected a run {WRITTEN_BY}.") from None
    except run_directory.UnreadableFileError as error:
        raise VisualizeError(f"Cannot read {str(error.path)!r}: {error.reason}") from None


def describe(config):
    """`"model (option=value, ...)"` of a saved config dict."""
    options = ", ".join(f"{k}={v}" for k, v in sorted(config.get("model_options", {}).items()))
    return f"{config.get('model', '?')}" + (f" ({options})" if options else "")


def labels_for(model_dirs, labels=None):
    """`labels`, or each run's `describe`d config (its directory name if it has none).

    Equal descriptions get the directory name appended, e.g.
    `"mnist_pde (channels=8) [seed1]"`.
    """
    if labels:
        return list(labels)
    names = []
    for model_dir in model_dirs:
        try:
            names.append(describe(read_config(model_dir)))
        except VisualizeError:
            names.append(pathlib.Path(model_dir).name)
    counts = collections.Counter(names)
    return [f"{name} [{pathlib.Path(model_dir).name}]" if counts[name] > 1 else name
            for name, model_dir in zip(names, model_dirs)]


def _config(saved, data_dir):
    """The `pde_keras.config.Config` that loads the run's data here.

    Only data-related fields matter; distribution and mixed precision are
    reset so that a run trained on another backend or devices still loads,
    and nothing is downloaded.
    """
    fields = config_module.defaults()
    options = {key: value for key, value in saved.items() if key in fields}
    options.update(distribution="none", mixed_precision=False, download=False)
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    try:
        return config_module.Config(**options)
    except ValueError as error:
        raise VisualizeError(f"Cannot use the run's config: {validation.first_line(error)}") from None


def read_image(path, shape):
    """Reads an image file as uint8 pixels of `shape` (resized, grey or RGB)."""
    height, width, channels = shape
    try:
        image = keras.utils.load_img(
            str(path), color_mode="grayscale" if channels == 1 else "rgb",
            target_size=(height, width), interpolation="bilinear")
    except (OSError, ValueError) as error:
        raise VisualizeError(
            f"Cannot read image {str(path)!r}: {validation.first_line(error)}") from None
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(height, width, channels)


def require_pde_layers(model, where):
    """`pde_layers(model)`, or a `VisualizeError` naming `where` if there are none."""
    layers = inspection.pde_layers(model)
    if not layers:
        raise VisualizeError(
            f"The model {where} ({model.name}) has no PDE layers (GlobalLayer or "
            "AdvectionDiffusion): no coefficient maps to draw.")
    return layers


def layer_maps(model, image):
    """`pde_keras.inspection.layer_maps`, or a `VisualizeError` without PDE layers."""
    require_pde_layers(model, repr(model.name))
    return inspection.layer_maps(model, image)


def layer_outputs(model, image, names):
    """`pde_keras.inspection.layer_outputs`, or a `VisualizeError` for a missing layer."""
    try:
        return inspection.layer_outputs(model, image, names)
    except LookupError as missing:
        raise VisualizeError(
            f"The model {model.name!r} has no layer {missing.args[0]!r}.") from None


def check_model_dirs(model_dirs, labels=None):
    """Checks a list of model directories and optional labels (as many)."""
    if not model_dirs:
        raise VisualizeError(str(validation.invalid(
            "model_dirs", "one or more model directories", model_dirs)))
    if labels and len(labels) != len(model_dirs):
        raise VisualizeError(str(validation.invalid(
            "labels", f"one label per model directory ({len(model_dirs)})", labels)))

