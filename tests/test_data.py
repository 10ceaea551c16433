"""Data sources: bundled MNIST, local IDX / CIFAR batches / image trees, tfds, synthetic."""

import gzip
import http.server
import pathlib
import pickle
import re
import shutil
import socket
import tarfile
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pde_keras import data
from pde_keras.data import DataError

JPEG_TARBALL = pathlib.Path("/work/shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz")
MNIST_FORMATS = (
    "the MNIST IDX files train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
)
TREE_FORMAT = (
    "a class-per-folder image tree train/<class>/*.jpg and test/<class>/*.jpg "
    "(.bmp, .gif, .jpeg, .jpg, .png)"
)
CIFAR10_FORMAT = (
    "the CIFAR-10 python batches (cifar-10-batches-py/ or cifar-10-python.tar.gz)"
)


def _raises(message):
    return pytest.raises(DataError, match=f"^{re.escape(message)}$")


# -------------------------------------------------------------------- MNIST


def test_bundled_mnist_is_the_original():
    train_x, train_y, test_x, test_y = dataset = data.load("mnist")
    assert dataset.info.source == "bundled"
    assert train_x.shape == (60000, 28, 28, 1) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28, 1) and test_y.dtype == np.int64
    assert train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(test_y).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009
    ]
    assert train_x.max() == 255 and train_x.min() == 0


def _write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def _write_mnist(root, compress=True, train=12, test=5):
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, (train, 28, 28)),
        "train_labels": np.arange(train) % 10,
        "test_images": rng.integers(0, 256, (test, 28, 28)),
        "test_labels": np.arange(test)[::-1] % 10,
    }
    for key, array in arrays.items():
        _write_idx(root / data.MNIST_FILES[key], array, compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_local_mnist_idx(tmp_path, compress):
    arrays = _write_mnist(tmp_path, compress)
    dataset = data.load("mnist", data_dir=str(tmp_path))  # auto -> local
    assert dataset.info.source == "local"
    assert dataset.info.location == str(tmp_path)
    np.testing.assert_array_equal(dataset.train_images[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(dataset.test_labels, arrays["test_labels"])


def test_local_mnist_missing_file(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with _raises(
        f"MNIST IDX file '{tmp_path}/t10k-labels-idx1-ubyte[.gz]' is missing (found "
        "t10k-images-idx3-ubyte.gz, train-images-idx3-ubyte.gz, "
        f"train-labels-idx1-ubyte.gz); expected {MNIST_FORMATS}."
    ):
        data.load("mnist", "local", str(tmp_path))


def test_local_mnist_bad_magic(tmp_path):
    _write_mnist(tmp_path, compress=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])
    with _raises(
        f"Cannot read MNIST IDX file '{path}': bad magic number 00000803 "
        f"(expected 00000801); expected {MNIST_FORMATS}."
    ):
        data.load("mnist", "local", str(tmp_path))


def test_local_mnist_truncated(tmp_path):
    _write_mnist(tmp_path, compress=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with _raises(
        f"Cannot read MNIST IDX file '{path}': 3910 data bytes for shape (5, 28, 28) "
        f"(expected 3920); expected {MNIST_FORMATS}."
    ):
        data.load("mnist", "local", str(tmp_path))


def test_local_mnist_corrupt_gzip(tmp_path):
    _write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip")
    with _raises(
        f"Cannot read MNIST IDX file '{path}': BadGzipFile: Not a gzipped file "
        f"(b'th'); expected {MNIST_FORMATS}."
    ):
        data.load("mnist", "local", str(tmp_path))


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with _raises(
        f"Data directory '{missing}' does not exist: expected a directory holding "
        f"{MNIST_FORMATS}, or {TREE_FORMAT}."
    ):
        data.load("mnist", data_dir=str(missing))


def test_empty_data_dir(tmp_path):
    with _raises(
        f"No CIFAR-10 data in '{tmp_path}': expected {CIFAR10_FORMAT}, or {TREE_FORMAT}."
    ):
        data.load("cifar10", data_dir=str(tmp_path))


# -------------------------------------------------------------------- CIFAR


def _cifar_arrays(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    # The batches store each image as 1024 red, 1024 green, 1024 blue bytes.
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    return images, rows


def _write_cifar10(root, archive=False):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    train, test = [], None
    for i in range(1, 6):
        images, rows = _cifar_arrays(4, seed=i)
        labels = [(i + j) % 10 for j in range(4)]
        train.append((images, labels))
        batch = {b"batch_label": b"x", b"labels": labels, b"data": rows}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    images, rows = _cifar_arrays(3, seed=9)
    test = (images, [7, 8, 9])
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"labels": [7, 8, 9], b"data": rows}, protocol=2)
    )
    names = [n.encode() for n in data.CIFAR10_CLASSES]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    if archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    return train, test


@pytest.mark.parametrize("archive", [False, True])
def test_local_cifar10_batches(tmp_path, archive):
    train, test = _write_cifar10(tmp_path, archive)
    dataset = data.load("cifar10", "local", str(tmp_path))
    np.testing.assert_array_equal(
        dataset.train_images, np.concatenate([images for images, _ in train])
    )
    assert dataset.train_labels.tolist() == sum((labels for _, labels in train), [])
    np.testing.assert_array_equal(dataset.test_images, test[0])
    assert dataset.test_labels.tolist() == [7, 8, 9]
    assert dataset.info.class_names == data.CIFAR10_CLASSES


def test_local_cifar100_batches(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_images, train_rows = _cifar_arrays(6, seed=1)
    test_images, test_rows = _cifar_arrays(2, seed=2)
    for name, rows, labels in (("train", train_rows, [0, 99, 5, 6, 7, 8]),
                               ("test", test_rows, [42, 1])):
        batch = {b"data": rows, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [f"class{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}))
    dataset = data.load("cifar100", data_dir=str(tmp_path))
    np.testing.assert_array_equal(dataset.train_images, train_images)
    np.testing.assert_array_equal(dataset.test_images, test_images)
    assert dataset.train_labels.tolist() == [0, 99, 5, 6, 7, 8]
    assert dataset.info.num_classes == 100 and dataset.info.class_names[99] == "class99"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("member,payload,reason", [
    ("data_batch_3", lambda raw: raw[:100], "EOFError: Ran out of input"),
    ("test_batch", lambda raw: pickle.dumps({b"data": _Evil()}),
     "UnpicklingError: global builtins.print is not allowed"),
    ("test_batch",
     lambda raw: pickle.dumps({b"labels": [1], b"data": np.zeros((1, 100), np.uint8)}),
     "no valid labels/data entries (ValueError: cannot reshape array of size 100 into "
     "shape (3,32,32))"),
], ids=["truncated", "code", "shape"])
def test_local_cifar_bad_batch(tmp_path, member, payload, reason):
    _write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    path = folder / member
    path.write_bytes(payload(path.read_bytes()))
    with _raises(
        f"Cannot read CIFAR-10 batch '{member}' in '{folder}': {reason}; "
        f"expected {CIFAR10_FORMAT}."
    ):
        data.load("cifar10", "local", str(tmp_path))


# --------------------------------------------------------------- image trees


def _write_tree(root, classes, per_class, shape, ext):
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(image.squeeze()).save(root / split / name / f"{i}{ext}")
                written[(split, label, i)] = image
    return written


def test_local_image_tree_png_is_exact(tmp_path):
    written = _write_tree(tmp_path, [str(i) for i in range(10)], 2, (28, 28, 1), ".png")
    dataset = data.load("mnist", "local", str(tmp_path))
    assert dataset.train_images.shape == (20, 28, 28, 1)
    assert dataset.train_labels.tolist() == [i // 2 for i in range(20)]
    # Files are read in sorted order within a class folder.
    np.testing.assert_array_equal(dataset.test_images[3], written[("test", 1, 1)])


def test_local_image_tree_jpeg(tmp_path):
    _write_tree(tmp_path, data.CIFAR10_CLASSES, 1, (32, 32, 3), ".jpg")
    dataset = data.load("cifar10", data_dir=str(tmp_path))
    assert dataset.train_images.shape == (10, 32, 32, 3)
    assert dataset.info.class_names == data.CIFAR10_CLASSES
    assert dataset.test_labels.tolist() == list(range(10))


def test_local_image_tree_wrong_class_count(tmp_path):
    _write_tree(tmp_path, ["a", "b", "c"], 1, (32, 32, 3), ".png")
    with _raises(
        f"Cannot read the CIFAR-10 image tree '{tmp_path / 'train'}': found 3 class "
        f"folders, expected 10; expected {TREE_FORMAT}."
    ):
        data.load("cifar10", "local", str(tmp_path))


def test_local_image_tree_missing_test_split(tmp_path):
    _write_tree(tmp_path, data.CIFAR10_CLASSES, 1, (32, 32, 3), ".png")
    shutil.rmtree(tmp_path / "test")
    with _raises(
        f"Cannot read the CIFAR-10 image tree '{tmp_path / 'test'}': no such "
        f"directory; expected {TREE_FORMAT}."
    ):
        data.load("cifar10", "local", str(tmp_path))


def test_local_image_tree_corrupt_image(tmp_path):
    _write_tree(tmp_path, data.CIFAR10_CLASSES, 1, (32, 32, 3), ".jpg")
    (tmp_path / "train" / "cat" / "0.jpg").write_bytes(b"not a jpeg")
    with _raises(
        f"Cannot decode image '{tmp_path / 'train' / 'cat' / '0.jpg'}' of the CIFAR-10 "
        f"image tree '{tmp_path / 'train'}'; expected {TREE_FORMAT}."
    ):
        data.load("cifar10", "local", str(tmp_path))


@pytest.mark.skipif(not JPEG_TARBALL.exists(), reason="no CIFAR-10 JPEG copy here")
def test_real_cifar10_jpeg_subset(tmp_path):
    """20 train and 5 test images per class of the real JPEG CIFAR-10 copy."""
    wanted = {f"{i:04d}.jpg" for i in range(20)}
    with tarfile.open(JPEG_TARBALL, "r:gz") as tar:
        members = [
            m for m in tar
            if m.isfile() and pathlib.PurePosixPath(m.name).name in wanted
            and (m.name.startswith("train/") or m.name.split("/")[-1] < "0005.jpg")
        ]
        tar.extractall(tmp_path, members=members, filter="data")
    dataset = data.load("cifar10", data_dir=str(tmp_path))
    assert dataset.train_images.shape == (200, 32, 32, 3)
    assert dataset.test_images.shape == (50, 32, 32, 3)
    assert np.bincount(dataset.train_labels).tolist() == [20] * 10
    assert dataset.info.class_names == data.CIFAR10_CLASSES
    # Natural images: per-channel means near CIFAR-10's (125, 123, 114).
    means = dataset.train_images.reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(means - [125, 123, 114]) < 25), means


# --------------------------------------------------------- tfds and synthetic


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mock_data(name, shape):
    with tfds.testing.mock_data(num_examples=6):
        dataset = data.load(name, "tfds", download=False)
    assert dataset.info.source == "tfds"
    assert dataset.train_images.shape == (6, *shape)
    assert dataset.test_images.dtype == np.uint8
    assert len(dataset.info.class_names) == 10


def test_tfds_not_prepared_without_download(tmp_path):
    with _raises(
        "tensorflow-datasets has no prepared CIFAR-100 in "
        f"'{tmp_path}' and download=False (Dataset cifar100: could not find data in "
        f"{tmp_path}. Please make sure to call dataset_builder.download_and_prepare(), "
        "or pass download=True to tfds.load() before trying to access the "
        "tf.data.Dataset object.); prepare it there with tfds, or use another source."
    ):
        data.load("cifar100", "tfds", str(tmp_path), download=False)


@pytest.fixture
def no_proxies(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy",
                 "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def closed_port_url():
    """An http URL on the loopback interface where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz"


def test_probe_tells_a_server_from_no_server(no_proxies, closed_port_url):
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        # Any answer counts, an error status (here 501: no HEAD handler) included.
        assert data.probe(f"http://127.0.0.1:{server.server_port}/x", timeout=5) is None
    finally:
        thread.join(5)
        server.server_close()
    assert data.probe(closed_port_url, timeout=5) == "[Errno 111] Connection refused"


def _fail_if_called(*args, **kwargs):
    raise AssertionError("tfds.load was called")


def test_tfds_download_from_an_unreachable_host_fails_at_once(
        tmp_path, monkeypatch, no_proxies, closed_port_url):
    monkeypatch.setitem(data.TFDS_URLS, "cifar10", closed_port_url)
    monkeypatch.setattr(tfds, "load", _fail_if_called)
    with _raises(
        f"Cannot download CIFAR-10: tensorflow-datasets has no prepared copy in '{tmp_path}' "
        f"and {closed_port_url} is unreachable ([Errno 111] Connection refused); use local "
        "files instead (data_dir / --data_dir: the CIFAR-10 python batches "
        "(cifar-10-batches-py/ or cifar-10-python.tar.gz), or a class-per-folder image tree "
        "train/<class>/*.jpg and test/<class>/*.jpg (.bmp, .gif, .jpeg, .jpg, .png)), or "
        "prepare it with tfds where there is network and read it with download=False "
        "(--nodownload)."
    ):
        data.load("cifar10", "tfds", str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # Nothing written.


def test_tfds_download_that_fails_on_the_way_is_one_data_error(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise ConnectionError("Connection reset by peer\nretries exhausted")

    monkeypatch.setattr(data, "probe", lambda url: None)
    monkeypatch.setattr(tfds, "load", interrupted)
    with pytest.raises(DataError, match=re.escape(
            f"tensorflow-datasets could not download and prepare CIFAR-100 in '{tmp_path}' "
            "(ConnectionError: Connection reset by peer); use local files instead")):
        data.load("cifar100", "tfds", str(tmp_path))


def test_synthetic_is_deterministic_and_structured():
    a = data.load("cifar10", "synthetic", synthetic_sizes=(300, 50))
    b = data.load("cifar10", "synthetic", synthetic_sizes=(300, 50))
    assert a.train_images.shape == (300, 32, 32, 3)
    assert a.test_images.shape == (50, 32, 32, 3)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    # Class structure: nearest class mean classifies test images well.
    x = a.train_images.reshape(300, -1).astype(float)
    means = np.stack([x[a.train_labels == k].mean(0) for k in range(10)])
    test = a.test_images.reshape(50, -1).astype(float)
    predicted = np.argmin(((test[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == a.test_labels).mean() > 0.9


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=re.escape(
        "Invalid value for argument `name`: expected one of 'mnist', 'cifar10', "
        "'cifar100'. Received: name='svhn'"
    )):
        data.load("svhn")
    with pytest.raises(ValueError, match=re.escape(
        "Invalid value for argument `source`: expected one of 'auto', 'bundled', "
        "'tfds', 'local', 'synthetic'. Received: source='web'"
    )):
        data.load("mnist", "web")
    with pytest.raises(ValueError, match=re.escape(
        "Invalid value for argument `source`: expected one of 'tfds', 'local', "
        "'synthetic' for cifar10 (only MNIST is bundled). Received: source='bundled'"
    )):
        data.load("cifar10", "bundled")
    with pytest.raises(ValueError, match=re.escape(
        "Invalid value for argument `data_dir`: expected a directory for "
        "source='local'. Received: data_dir=None"
    )):
        data.load("mnist", "local")
