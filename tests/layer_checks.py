"""Checks every layer and model test shares: the config and `.keras` round trips,
the exact message of a bad argument, and NumPy views of a layer's batch
normalisations and residual blocks."""

import pathlib
import re

import keras
import numpy as np
import pytest
from keras import ops

import numpy_reference as ref


def _outputs(model, inputs):
    """The inference-mode outputs of `model` on `inputs`, as a list of arrays."""
    outputs = model(inputs, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [ops.convert_to_numpy(output) for output in outputs]


def _assert_outputs(model, inputs, expected):
    for got, want in zip(_outputs(model, inputs), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def check_config_round_trip(layer, inputs):
    """`type(layer).from_config(layer.get_config())` has the same config and,
    given `layer`'s weights, the same inference outputs on `inputs`.

    Returns:
        The rebuilt layer.
    """
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    expected = _outputs(layer, inputs)
    _outputs(clone, inputs)  # builds it, before the weights are copied
    clone.set_weights(layer.get_weights())
    _assert_outputs(clone, inputs, expected)
    return clone


def check_keras_file_round_trip(model, inputs, directory):
    """`model` saved with `keras.saving.save_model` and loaded back has the same
    name, layer names, layer configs and inference outputs on `inputs`.

    Returns:
        The loaded model.
    """
    path = pathlib.Path(directory) / f"{model.name}.keras"
    keras.saving.save_model(model, path)
    loaded = keras.saving.load_model(path)
    assert loaded.name == model.name
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    assert [layer.get_config() for layer in loaded.layers] == [
        layer.get_config() for layer in model.layers]
    _assert_outputs(loaded, inputs, _outputs(model, inputs))
    return loaded


def raises_invalid(argument, expected, value):
    """`pytest.raises` for exactly the library's message for a bad argument value."""
    message = (f"Invalid value for argument `{argument}`: expected {expected}. "
               f"Received: {argument}={value!r}")
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


def randomise_batchnorms(layer, seed=1):
    """Gives every BN below `layer` non-trivial statistics, so that wiring
    mistakes show."""
    rng = np.random.default_rng(seed)
    for sub in layer._flatten_layers(include_self=False):
        if isinstance(sub, keras.layers.BatchNormalization):
            c = sub.gamma.shape[0]
            sub.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            sub.beta.assign(rng.uniform(-0.2, 0.2, c).astype("float32"))
            sub.moving_mean.assign(rng.uniform(-0.2, 0.2, c).astype("float32"))
            sub.moving_variance.assign(rng.uniform(0.5, 1.5, c).astype("float32"))


def batchnorm(x, bn):
    """NumPy inference-mode output of the Keras batch normalisation `bn` on `x`."""
    weights = (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
    return ref.batchnorm_inference(x, *(ops.convert_to_numpy(w) for w in weights), bn.epsilon)


def residual_block(x, block):
    """NumPy inference-mode output of a built `BasicResidualBlock` on `x`:
    ReLU(BN2(conv2(ReLU(BN1(conv1(x))))) + x)."""
    h = np.maximum(batchnorm(ref.conv_same(x, ops.convert_to_numpy(block.conv1.kernel)),
                             block.bn1), 0.0)
    h = batchnorm(ref.conv_same(h, ops.convert_to_numpy(block.conv2.kernel)), block.bn2)
    return np.maximum(h + x, 0.0)
