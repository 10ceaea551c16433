"""Trained runs for the figures: the saved model, its config, its test images.

A run is a `model_dir` written by `pde_keras.training.train_and_evaluate`
(`python -m experiments.mnist` / `experiments.cifar`): `config.json`,
`last.keras` and `best.keras` (classifiers that take raw pixels 0-255 and
normalise them inside), `log.csv`, `results.json`.

The figures feed the model exactly as training evaluated it: the test
images come from `pde_keras.training.load_splits` with the run's config
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

from pde_keras import inspection, training, validation
from pde_keras.advection_diffusion import AdvectionDiffusion
from pde_keras.inspection import pde_layers

CHECKPOINTS = ("last", "best")
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


@dataclasses.dataclass(frozen=True)
class LayerMaps:
    """The maps of one PDE layer for one image.

    Attributes:
        index: position among the model's PDE layers (0 = nearest the input).
        name: the Keras layer name, e.g. `"stage1_global"` or `"pde"`.
        kind: the layer's class name (`"GlobalLayer"`, `"AdvectionDiffusion"`).
        maps: `{name: (height, width, channels) float32 array}`: every entry
            of the layer's `coefficient_maps` for the image, plus `"input"`,
            the layer's input (for `AdvectionDiffusion`: its source f).
    """

    index: int
    name: str
    kind: str
    maps: dict


class Run:
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
        self.model_path = self.model_dir / f"{checkpoint}.keras"
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
        dataset, _, (images, labels) = training.load_splits(self.config)
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
    model_dir = pathlib.Path(model_dir)
    for name, key in (("config.json", None), ("results.json", "config")):
        path = model_dir / name
        if path.is_file():
            try:
                saved = training.read_json(path)
            except training.UnreadableFileError as error:
                raise VisualizeError(f"Cannot read {str(path)!r}: {error.reason}") from None
            if key and not isinstance(saved.get(key), dict):
                raise VisualizeError(f"Cannot read {str(path)!r}: it has no {key!r} object")
            return saved[key] if key else saved
    raise VisualizeError(f"No config.json in {str(model_dir)!r}: expected a run {WRITTEN_BY}.")


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
    """The `pde_keras.training.Config` that loads the run's data here.

    Only data-related fields matter; distribution and mixed precision are
    reset so that a run trained on another backend or devices still loads,
    and nothing is downloaded.
    """
    fields = {field.name for field in dataclasses.fields(training.Config)}
    options = {key: value for key, value in saved.items() if key in fields}
    options.update(distribution="none", mixed_precision=False, download=False)
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    try:
        return training.Config(**options)
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
    layers = pde_layers(model)
    if not layers:
        raise VisualizeError(
            f"The model {where} ({model.name}) has no PDE layers (GlobalLayer or "
            "AdvectionDiffusion): no coefficient maps to draw.")
    return layers


def layer_maps(model, image):
    """The maps of every PDE layer of `model` for one image.

    Args:
        model: a model with PDE layers (e.g. a run's classifier).
        image: `(height, width, channels)` pixels as the model takes them
            (0-255 for a training classifier).

    Returns:
        A list of `LayerMaps`, input side first. Each layer's maps are
        exactly its `coefficient_maps` of the input it gets in the model.
    """
    require_pde_layers(model, repr(model.name))
    result = []
    batch = np.asarray(image)[None]
    for index, (layer, layer_input) in enumerate(inspection.pde_layer_inputs(model, batch)):
        maps = layer.coefficient_maps(layer_input)
        maps = {name: _numpy(value) for name, value in maps.items()}
        source = layer_input[0] if isinstance(layer, AdvectionDiffusion) else layer_input
        maps["input"] = _numpy(source)
        result.append(LayerMaps(index, layer.name, type(layer).__name__, maps))
    return result


def layer_outputs(model, image, names):
    """The outputs of the layers `names` (of the model or its core) for one image.

    Returns:
        A list of `(height, width, channels)` float32 arrays, one per name.
    """
    names = list(names)
    try:
        preprocess, inner = inspection.locate(model, lambda layer: layer.name in names)
    except LookupError:
        inner = None
    missing = [name for name in names
               if inner is None or name not in [layer.name for layer in inner.layers]]
    if missing:
        raise VisualizeError(f"The model {model.name!r} has no layer {missing[0]!r}.")
    outputs = inspection.run_to(inner, preprocess, np.asarray(image)[None],
                                [inner.get_layer(name).output for name in names])
    return [_numpy(output) for output in outputs]


def _numpy(tensor):
    """One example of a batch as a float32 NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(tensor), dtype=np.float32)[0]


def check_model_dirs(model_dirs, labels=None):
    """Checks a list of model directories and optional labels (as many)."""
    if not model_dirs:
        raise VisualizeError(str(validation.invalid(
            "model_dirs", "one or more model directories", model_dirs)))
    if labels and len(labels) != len(model_dirs):
        raise VisualizeError(str(validation.invalid(
            "labels", f"one label per model directory ({len(model_dirs)})", labels)))

