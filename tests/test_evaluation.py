"""`pde_keras.evaluation`: confusion matrices and predicted classes against NumPy."""

import keras
import numpy as np
import pytest

from pde_keras import evaluation

pytestmark = pytest.mark.multibackend


def test_confusion_matrix_counts_every_pair():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    expected = np.zeros((4, 4), np.int64)
    for label, prediction in zip(labels, predictions):
        expected[label, prediction] += 1
    matrix = evaluation.confusion_matrix(labels, predictions, 4)
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.dtype == np.int64 and matrix.sum() == 200


def test_predict_classes_feeds_float_pixels_in_order():
    """The argmax of the model on the images as floats 0-255, batch by batch."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 4, 4, 1), dtype=np.uint8)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    kernel = rng.normal(size=(16, 3)).astype("float32")
    model.layers[-1].set_weights([kernel, np.zeros(3, "float32")])
    expected = np.argmax(images.reshape(7, 16).astype("float32") @ kernel, axis=-1)
    np.testing.assert_array_equal(evaluation.predict_classes(model, images, batch_size=3),
                                  expected)
