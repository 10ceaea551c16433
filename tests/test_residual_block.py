"""Tests of BasicResidualBlock: wiring against NumPy, settings, saving, errors."""


import keras
import numpy as np
import pytest
from keras import ops

import pde_keras
from layer_checks import (check_config_round_trip, check_keras_file_round_trip,
                          raises_invalid, randomise_batchnorms, residual_block)

pytestmark = pytest.mark.multibackend


def _inputs(shape=(2, 7, 9, 3), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_matches_numpy():
    """ReLU(BN2(conv2(ReLU(BN1(conv1(x))))) + x), in inference mode."""
    x = _inputs()
    block = pde_keras.BasicResidualBlock()
    block.build(x.shape)
    randomise_batchnorms(block)
    np.testing.assert_allclose(ops.convert_to_numpy(block(x, training=False)),
                               residual_block(x, block), rtol=1e-4, atol=1e-4)


def test_sub_layers_take_the_settings():
    block = pde_keras.BasicResidualBlock(kernel_regularizer="l2", batchnorm_momentum=0.5,
                                         batchnorm_epsilon=1e-3, dtype="mixed_float16",
                                         name="block")
    block.build((None, 8, 8, 4))
    assert [w.path for w in block.trainable_weights] == [
        "block/conv1/kernel", "block/bn1/gamma", "block/bn1/beta", "block/conv2/kernel",
        "block/bn2/gamma", "block/bn2/beta"]
    assert block.count_params() == 2 * (3 * 3 * 4 * 4) + 2 * 4 * 4
    for conv in (block.conv1, block.conv2):
        assert (conv.filters, conv.kernel_size, conv.use_bias) == (4, (3, 3), False)
        assert isinstance(conv.kernel_regularizer, keras.regularizers.L2)
        assert conv.kernel_initializer.get_config() == block.kernel_initializer.get_config()
    # conv2 has its own copy: one unseeded initializer object would give both the same draw.
    assert block.conv1.kernel_initializer is block.kernel_initializer
    assert block.conv2.kernel_initializer is not block.kernel_initializer
    for bn in (block.bn1, block.bn2):
        assert (bn.momentum, bn.epsilon) == (0.5, 1e-3)
    for layer in (block.conv1, block.bn1, block.conv2, block.bn2):
        assert layer.dtype_policy.name == "mixed_float16"
    assert keras.backend.standardize_dtype(block(_inputs((1, 8, 8, 4))).dtype) == "float16"


@pytest.mark.parametrize("options", [
    {}, {"kernel_initializer": "glorot_uniform", "kernel_regularizer": "l2",
         "batchnorm_momentum": 0.99, "batchnorm_epsilon": 1e-3},
], ids=["defaults", "every-setting"])
def test_config_and_keras_file_round_trips(options, tmp_path):
    x = _inputs((2, 8, 8, 4))
    inputs = keras.Input((8, 8, 4))
    model = keras.Model(inputs, pde_keras.BasicResidualBlock(name="block", **options)(inputs))
    randomise_batchnorms(model)
    check_config_round_trip(model.get_layer("block"), x)
    check_keras_file_round_trip(model, x, tmp_path)
    config = model.get_layer("block").get_config()
    assert config["batchnorm_epsilon"] == options.get("batchnorm_epsilon", 1e-5)


@pytest.mark.parametrize("argument, value, expected", [
    ("batchnorm_momentum", 1.0, "a finite number >= 0 below 1"),
    ("batchnorm_momentum", -0.1, "a finite number >= 0 below 1"),
    ("batchnorm_epsilon", 0.0, "a positive finite number"),
    ("batchnorm_epsilon", "1e-5", "a positive finite number"),
])
def test_bad_arguments(argument, value, expected):
    with raises_invalid(argument, expected, value):
        pde_keras.BasicResidualBlock(**{argument: value})
