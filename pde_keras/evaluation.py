"""Evaluating trained classifiers: predicted classes and confusion matrices."""

import keras
import numpy as np

from pde_keras import input_pipeline


def confusion_matrix(labels, predictions, num_classes):
    """`counts[i, j]`: how many examples of class `i` were predicted as `j` (NumPy)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def predict_classes(model, images, batch_size=256):
    """The predicted classes of uint8 `images`, fed as training evaluates them."""
    dataset = input_pipeline.make_dataset(images, np.zeros(len(images), np.int64), batch_size)
    return np.argmax(model.predict(dataset, verbose=0), axis=-1)


def checkpoint_confusion(config, checkpoint):
    """The confusion matrix of the `.keras` `checkpoint` on `config`'s test split."""
    dataset, _, (images, labels) = input_pipeline.load_splits(config)
    predictions = predict_classes(keras.saving.load_model(checkpoint), images,
                                  config.eval_batch_size)
    return confusion_matrix(labels, predictions, dataset.info.num_classes)
