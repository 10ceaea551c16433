"""Image classification data: MNIST, CIFAR-10 and CIFAR-100 as NumPy arrays.

`load(name, source, data_dir)` returns a `Dataset`: uint8 NHWC images, int64
labels for the train and test splits, and a `DatasetInfo`. It unpacks into
the four arrays::

    train_images, train_labels, test_images, test_labels = data.load("mnist")

Sources:

- ``"bundled"``: MNIST only; the original IDX files shipped in
  ``pde_keras/datasets/mnist`` (CC BY-SA 3.0, see the README there).
- ``"tfds"``: tensorflow-datasets (`mnist`, `cifar10`, `cifar100`), from
  `data_dir` (tfds' default directory when None). With ``download=False`` a
  dataset that is not prepared there is an error, never a network access.
  Before a download, the dataset's host is probed (`PROBE_TIMEOUT_S`): an
  unreachable one is a `DataError` within seconds, not after minutes of
  tfds' retries; so is a download that fails on the way.
- ``"local"``: the canonical files in `data_dir`: MNIST IDX files
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``), the
  CIFAR python batches (``cifar-10-batches-py/`` or
  ``cifar-10-python.tar.gz``; ``cifar-100-python/`` or
  ``cifar-100-python.tar.gz``), or for any dataset a class-per-folder image
  tree ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (read with
  `keras.utils.image_dataset_from_directory`; class index = sorted folder
  name, which for CIFAR-10's folder names is its label order).
- ``"synthetic"``: deterministic random images whose classes differ in a
  low-frequency template, learnable in a few steps (smoke tests).
- ``"auto"``: ``"local"`` when `data_dir` is given, else ``"bundled"`` for
  MNIST and ``"tfds"`` for CIFAR.

A missing or unreadable file raises one `DataError` (a `ValueError`) whose
message names the path and the formats accepted.
"""

import dataclasses
import gzip
import importlib.resources
import io
import pathlib
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib

import numpy as np

from pde_keras import validation

DATASETS = ("mnist", "cifar10", "cifar100")
SOURCES = ("auto", "bundled", "tfds", "local", "synthetic")
# Keras' image_dataset_from_directory reads these.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# Where tensorflow-datasets downloads each dataset from (its builders' URLs).
TFDS_URLS = {
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
}
PROBE_TIMEOUT_S = 10
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DataError(ValueError):
    """A data source is missing, unreadable or not in an accepted format."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    title: str
    image_shape: tuple
    num_classes: int
    # Formats the local source accepts, for error messages.
    local_formats: str


_TREE_FORMAT = (
    "a class-per-folder image tree train/<class>/*.jpg and test/<class>/*.jpg "
    f"({', '.join(IMAGE_EXTENSIONS)})"
)
_MNIST_FORMAT = (
    "the MNIST IDX files "
    + ", ".join(f"{f}[.gz]" for f in MNIST_FILES.values())
)
_CIFAR10_FORMAT = (
    "the CIFAR-10 python batches (cifar-10-batches-py/ or cifar-10-python.tar.gz)"
)
_CIFAR100_FORMAT = (
    "the CIFAR-100 python batches (cifar-100-python/ or cifar-100-python.tar.gz)"
)
_SPECS = {
    "mnist": _Spec("MNIST", (28, 28, 1), 10, f"{_MNIST_FORMAT}, or {_TREE_FORMAT}"),
    "cifar10": _Spec("CIFAR-10", (32, 32, 3), 10, f"{_CIFAR10_FORMAT}, or {_TREE_FORMAT}"),
    "cifar100": _Spec("CIFAR-100", (32, 32, 3), 100, f"{_CIFAR100_FORMAT}, or {_TREE_FORMAT}"),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What was loaded and from where.

    Attributes:
        name: `"mnist"`, `"cifar10"` or `"cifar100"`.
        source: the source actually used (`"auto"` resolved).
        location: the file, directory or tfds directory read (None for
            synthetic data and tfds' default directory).
        image_shape: `(height, width, channels)`.
        num_classes: number of classes.
        class_names: class names, index = label.
    """

    name: str
    source: str
    location: str | None
    image_shape: tuple
    num_classes: int
    class_names: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test splits (uint8 NHWC images, int64 labels) and their info.

    Iterating yields `(train_images, train_labels, test_images, test_labels)`.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    info: DatasetInfo

    def __iter__(self):
        return iter(
            (self.train_images, self.train_labels, self.test_images, self.test_labels)
        )


def load(name, source="auto", data_dir=None, *, download=True,
         synthetic_sizes=(2048, 512)):
    """Loads `name` from `source` (see the module docstring).

    Args:
        name: `"mnist"`, `"cifar10"` or `"cifar100"`.
        source: `"auto"`, `"bundled"`, `"tfds"`, `"local"` or `"synthetic"`.
        data_dir: the directory of the local files, or tfds' data directory.
        download: tfds only: whether tfds may download and prepare the
            dataset when it is not in `data_dir`.
        synthetic_sizes: synthetic only: `(train, test)` example counts.

    Returns:
        A `Dataset`.

    Raises:
        ValueError: for an invalid argument.
        DataError: when the data is missing or unreadable.

    Example:

    >>> from pde_keras import data
    >>> mnist = data.load("mnist")  # the bundled copy
    >>> mnist.train_images.shape, mnist.train_labels[:5].tolist()
    ((60000, 28, 28, 1), [5, 0, 4, 1, 9])
    """
    validation.check_choice("name", name, DATASETS)
    source = resolve_source(name, source, data_dir)
    spec = _SPECS[name]
    if source == "bundled":
        root = importlib.resources.files("pde_keras").joinpath("datasets", "mnist")
        arrays, location = _read_mnist_idx(pathlib.Path(str(root))), str(root)
        class_names = tuple(str(i) for i in range(10))
    elif source == "tfds":
        arrays, class_names = _load_tfds(name, data_dir, download)
        location = None if data_dir is None else str(data_dir)
    elif source == "local":
        arrays, class_names = _load_local(name, spec, pathlib.Path(data_dir))
        location = str(data_dir)
    else:
        sizes = tuple(
            validation.check_positive_int("synthetic_sizes", s) for s in synthetic_sizes
        )
        arrays = _synthetic(spec, *sizes)
        class_names, location = tuple(str(i) for i in range(spec.num_classes)), None
    info = DatasetInfo(
        name, source, location, spec.image_shape, spec.num_classes, tuple(class_names)
    )
    return Dataset(*_checked(arrays, spec, location), info)


def resolve_source(name, source, data_dir):
    """Returns the concrete source `load` uses for these arguments."""
    validation.check_choice("source", source, SOURCES)
    if source == "auto":
        if data_dir is not None:
            return "local"
        return "bundled" if name == "mnist" else "tfds"
    if source == "bundled" and name != "mnist":
        raise validation.invalid(
            "source", f"one of 'tfds', 'local', 'synthetic' for {name} (only "
            "MNIST is bundled)", source,
        )
    if source == "local" and data_dir is None:
        raise validation.invalid(
            "data_dir", "a directory for source='local'", data_dir
        )
    return source


def _checked(arrays, spec, location):
    """Checks shapes, dtypes and label ranges; returns the arrays."""
    out = []
    for images, labels in (arrays[:2], arrays[2:]):
        images = np.asarray(images)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if images.ndim == 3:
            images = images[..., None]
        if (images.dtype != np.uint8 or images.shape[1:] != spec.image_shape
                or len(images) != len(labels) or len(labels) == 0
                or labels.min() < 0 or labels.max() >= spec.num_classes):
            raise DataError(
                f"The {spec.title} data in {location!r} is not {spec.title}: got "
                f"{len(images)} images of shape {images.shape[1:]} ({images.dtype}) "
                f"and {len(labels)} labels in "
                f"[{labels.min(initial=0)}, {labels.max(initial=0)}]; expected uint8 "
                f"images of shape {spec.image_shape} with labels in "
                f"[0, {spec.num_classes - 1}]."
            )
        out += [images, labels]
    return out


# ---------------------------------------------------------------- MNIST (IDX)


def _find_mnist_files(root):
    """Returns {key: path} of the IDX files in `root`, or {} if there are none."""
    found = {}
    for key, stem in MNIST_FILES.items():
        for candidate in (root / stem, root / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
    if found and len(found) < len(MNIST_FILES):
        missing = [f"{MNIST_FILES[k]}[.gz]" for k in MNIST_FILES if k not in found]
        raise DataError(
            f"MNIST IDX file {str(root / missing[0])!r} is missing (found "
            f"{', '.join(sorted(p.name for p in found.values()))}); "
            f"expected {_MNIST_FORMAT}."
        )
    return found


def _read_mnist_idx(root):
    files = _find_mnist_files(root)
    if not files:
        raise DataError(f"No MNIST IDX files in {str(root)!r}: expected {_MNIST_FORMAT}.")
    return tuple(
        _read_idx(files[key], ndim=1 if key.endswith("labels") else 3)
        for key in ("train_images", "train_labels", "test_images", "test_labels")
    )


def _read_idx(path, ndim):
    """Reads an IDX file of unsigned bytes with `ndim` dimensions."""
    def corrupt(reason):
        return DataError(
            f"Cannot read MNIST IDX file {str(path)!r}: {reason}; expected "
            f"{_MNIST_FORMAT}."
        )

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise corrupt(f"{type(e).__name__}: {e}") from None
    # Magic number: two zero bytes, data type 0x08 (ubyte), number of dims.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise corrupt(
            f"bad magic number {raw[:4].hex() or 'none'} (expected 000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)
    )
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise corrupt(
            f"{len(raw) - header} data bytes for shape {shape} (expected {size})"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


# ------------------------------------------------------ CIFAR (python batches)


_CIFAR_LAYOUT = {
    # folder, archive, train batches, test batch, meta, label key, names key
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test",
                 "meta", b"fine_labels", b"fine_label_names"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and NumPy arrays, nothing that runs code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _find_cifar(name, root):
    """Returns (read(member) -> bytes, description) or None if absent."""
    folder, archive = _CIFAR_LAYOUT[name][:2]
    train_batches = _CIFAR_LAYOUT[name][2]
    for directory in (root / folder, root):
        if (directory / train_batches[0]).is_file():
            return (lambda member, d=directory: (d / member).read_bytes()), directory
    if (root / archive).is_file():
        path = root / archive

        def read(member):
            with tarfile.open(path, "r:gz") as tar:
                extracted = tar.extractfile(f"{folder}/{member}")
                if extracted is None:
                    raise KeyError(member)
                return extracted.read()
        return read, path
    return None


def _read_cifar(name, read, where):
    _, _, train_batches, test_batch, meta, label_key, names_key = _CIFAR_LAYOUT[name]
    title = _SPECS[name].title
    formats = _CIFAR10_FORMAT if name == "cifar10" else _CIFAR100_FORMAT

    def unpickle(member):
        try:
            return _ArrayUnpickler(io.BytesIO(read(member)), encoding="bytes").load()
        except (OSError, EOFError, KeyError, pickle.UnpicklingError, ValueError,
                TypeError, tarfile.TarError, zlib.error) as e:
            raise DataError(
                f"Cannot read {title} batch {member!r} in {str(where)!r}: "
                f"{type(e).__name__}: {e}; expected {formats}."
            ) from None

    def split(members):
        images, labels = [], []
        for member in members:
            batch = unpickle(member)
            try:
                data = np.asarray(batch[b"data"], np.uint8)
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(batch[label_key], np.int64))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(
                    f"Cannot read {title} batch {member!r} in {str(where)!r}: no "
                    f"valid {label_key.decode()}/data entries ({type(e).__name__}: "
                    f"{e}); expected {formats}."
                ) from None
        return np.concatenate(images), np.concatenate(labels)

    arrays = split(train_batches) + split((test_batch,))
    names = unpickle(meta).get(names_key)
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names or ())
    return arrays, class_names


# -------------------------------------------------------------- image tree


def _read_tree(spec, root):
    """Reads `root`/train and `root`/test class-per-folder image trees."""
    import keras  # Deferred: the data module is importable without Keras.
    import tensorflow as tf

    height, width, channels = spec.image_shape
    class_names = None
    arrays = []
    for split in ("train", "test"):
        directory = root / split
        try:
            if not directory.is_dir():
                raise ValueError("no such directory")
            dataset = keras.utils.image_dataset_from_directory(
                str(directory), labels="inferred", label_mode="int",
                class_names=class_names,
                color_mode="grayscale" if channels == 1 else "rgb",
                batch_size=512, image_size=(height, width), shuffle=False,
                verbose=False,
            )
            class_names = class_names or tuple(dataset.class_names)
            if len(class_names) != spec.num_classes:
                raise ValueError(
                    f"found {len(class_names)} class folders, expected "
                    f"{spec.num_classes}"
                )
            images, labels = [], []
            for x, y in dataset.as_numpy_iterator():
                images.append(np.clip(np.round(x), 0, 255).astype(np.uint8))
                labels.append(y)
        except tf.errors.OpError:
            path = _first_undecodable(dataset.file_paths)
            raise DataError(
                f"Cannot decode image {path!r} of the {spec.title} image tree "
                f"{str(directory)!r}; expected {_TREE_FORMAT}."
            ) from None
        except (ValueError, OSError) as e:
            raise DataError(
                f"Cannot read the {spec.title} image tree {str(directory)!r}: "
                f"{str(e).strip().splitlines()[0]}; expected {_TREE_FORMAT}."
            ) from None
        arrays += [np.concatenate(images), np.concatenate(labels)]
    return tuple(arrays), class_names


def _first_undecodable(paths):
    """Returns the first of `paths` TensorFlow cannot decode as an image."""
    import tensorflow as tf

    for path in paths:
        try:
            tf.io.decode_image(tf.io.read_file(path))
        except tf.errors.OpError:
            return path
    return paths[0] if paths else None


# ------------------------------------------------------------------ sources


def _load_local(name, spec, root):
    if not root.is_dir():
        raise DataError(
            f"Data directory {str(root)!r} does not exist: expected a directory "
            f"holding {spec.local_formats}."
        )
    if name == "mnist":
        if _find_mnist_files(root):
            return _read_mnist_idx(root), tuple(str(i) for i in range(10))
    else:
        found = _find_cifar(name, root)
        if found is not None:
            return _read_cifar(name, *found)
    if (root / "train").is_dir() or (root / "test").is_dir():
        return _read_tree(spec, root)
    raise DataError(
        f"No {spec.title} data in {str(root)!r}: expected {spec.local_formats}."
    )


def _load_tfds(name, data_dir, download):
    import tensorflow_datasets as tfds  # Deferred: slow to import.

    from tensorflow_datasets.core import constants

    title, where = _SPECS[name].title, str(data_dir or constants.DATA_DIR)
    ways_on = (
        "use local files instead (data_dir / --data_dir: "
        f"{_SPECS[name].local_formats}), or prepare it with tfds where there is "
        "network and read it with download=False (--nodownload)"
    )
    if download and not _tfds_prepared(tfds, name, data_dir):
        reason = probe(TFDS_URLS[name])
        if reason is not None:
            raise DataError(
                f"Cannot download {title}: tensorflow-datasets has no prepared copy in "
                f"{where!r} and {TFDS_URLS[name]} is unreachable ({reason}); {ways_on}.")
    try:
        splits, info = tfds.load(
            name, split=["train", "test"], as_supervised=True, with_info=True,
            data_dir=data_dir, download=download,
        )
    except AssertionError as e:  # tfds' "could not find data" with download=False
        raise DataError(
            f"tensorflow-datasets has no prepared {title} in {where!r} and "
            f"download=False ({str(e).splitlines()[0]}); prepare it there with tfds, or use "
            "another source."
        ) from None
    except Exception as e:  # noqa: BLE001 - a failed download or preparation, any kind.
        if not download:
            raise
        raise DataError(
            f"tensorflow-datasets could not download and prepare {title} in {where!r} "
            f"({type(e).__name__}: {validation.first_line(e)}); {ways_on}.") from None
    arrays = []
    for split in splits:
        images, labels = [], []
        for x, y in tfds.as_numpy(split.batch(10_000)):
            images.append(x)
            labels.append(y)
        arrays += [np.concatenate(images), np.concatenate(labels)]
    return tuple(arrays), tuple(info.features["label"].names)


def _tfds_prepared(tfds, name, data_dir):
    """Whether tfds has `name` prepared in `data_dir`, without its warning that an
    absent version folder "has no dataset_info.json"."""
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        return tfds.builder(name, data_dir=data_dir).is_prepared()
    finally:
        logging.set_verbosity(verbosity)


def probe(url, timeout=PROBE_TIMEOUT_S):
    """Whether `url`'s server answers: None if it does, else the reason (one line).

    A HEAD request through the environment's proxies; any HTTP answer, an
    error status included, counts as reachable.
    """
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as error:
        return validation.first_line(getattr(error, "reason", error))


def _synthetic(spec, train_size, test_size, seed=0):
    """Images = class template (4x4 blocks, upsampled) + noise; deterministic."""
    rng = np.random.default_rng(seed)
    height, width, channels = spec.image_shape
    coarse = rng.uniform(0, 255, (spec.num_classes, 4, 4, channels))
    templates = coarse.repeat(-(-height // 4), axis=1).repeat(-(-width // 4), axis=2)
    templates = templates[:, :height, :width]

    def draw(n):
        labels = rng.integers(0, spec.num_classes, n)
        noise = rng.normal(0.0, 40.0, (n, height, width, channels))
        return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8), labels

    return draw(train_size) + draw(test_size)
