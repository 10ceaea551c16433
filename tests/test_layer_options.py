"""Tests of pde_keras.layer_options: one source of the layers' construction settings."""

import inspect

import keras
import numpy as np
import pytest

import pde_keras
from layer_checks import raises_invalid
from pde_keras import layer_options, models
from pde_keras.layer_options import LAYER_OPTIONS, LayerOptions
from pde_keras.models.registry import options_of

pytestmark = pytest.mark.multibackend


def test_every_layer_takes_the_four_settings_with_the_same_defaults():
    def defaults(callable_):
        parameters = inspect.signature(callable_).parameters
        return {name: parameters[name].default for name in LAYER_OPTIONS}

    assert options_of(LayerOptions) == LAYER_OPTIONS
    assert options_of(pde_keras.BasicResidualBlock) == LAYER_OPTIONS
    assert set(LAYER_OPTIONS) <= set(options_of(pde_keras.GlobalLayer))
    assert defaults(LayerOptions) == {
        "kernel_initializer": "he_normal", "kernel_regularizer": None,
        "batchnorm_momentum": 0.9, "batchnorm_epsilon": 1e-5}
    assert defaults(pde_keras.BasicResidualBlock) == defaults(LayerOptions)
    assert defaults(pde_keras.GlobalLayer) == defaults(LayerOptions)


def test_models_blocks_reexports_the_options():
    assert models.blocks.LayerOptions is LayerOptions
    assert models.blocks.LAYER_OPTIONS is LAYER_OPTIONS


def test_as_dict_keeps_the_settings_as_given():
    options = LayerOptions(kernel_regularizer="l2", batchnorm_momentum=0.99)
    assert options.as_dict() == {"kernel_initializer": "he_normal", "kernel_regularizer": "l2",
                                 "batchnorm_momentum": 0.99, "batchnorm_epsilon": 1e-5}


def test_resolved_settings_are_keras_objects_serialised_by_get_config():
    options = LayerOptions.resolved("he_normal", "l2", 0.5, 1e-3)
    assert isinstance(options.kernel_initializer, keras.initializers.HeNormal)
    assert isinstance(options.kernel_regularizer, keras.regularizers.L2)
    config = options.get_config()
    assert list(config) == list(LAYER_OPTIONS)
    assert config["kernel_initializer"]["class_name"] == "HeNormal"
    assert config["kernel_regularizer"]["class_name"] == "L2"
    assert (config["batchnorm_momentum"], config["batchnorm_epsilon"]) == (0.5, 1e-3)
    assert LayerOptions.resolved(**config).get_config() == config
    assert LayerOptions.resolved("he_normal", None, 0.9, 1e-5).get_config()[
        "kernel_regularizer"] is None


def test_later_sub_layers_get_their_own_copy_of_the_resolved_initializer():
    """The first kernel takes the layer's initializer object (what a one-convolution
    layer always drew), every later one a new object of the same configuration."""
    options = LayerOptions.resolved("he_normal", None, 0.9, 1e-5)
    conv = options.conv(4, 3, "conv")
    depthwise = options.depthwise_conv(3, 2, "depthwise")
    again = options.conv(4, 3, "again")
    assert conv.kernel_initializer is options.kernel_initializer
    for initializer in (depthwise.depthwise_initializer, again.kernel_initializer):
        assert initializer is not options.kernel_initializer
        assert isinstance(initializer, keras.initializers.HeNormal)
        assert initializer.get_config() == options.kernel_initializer.get_config()
    assert depthwise.depthwise_initializer is not again.kernel_initializer


def test_factories():
    options = LayerOptions(kernel_initializer="glorot_uniform", kernel_regularizer="l2",
                           batchnorm_momentum=0.5, batchnorm_epsilon=1e-3)
    conv = options.conv(8, 1, "shortcut", strides=2, padding="valid")
    assert (conv.name, conv.filters, conv.kernel_size, conv.strides, conv.padding,
            conv.use_bias) == ("shortcut", 8, (1, 1), (2, 2), "valid", False)
    assert isinstance(conv.kernel_initializer, keras.initializers.GlorotUniform)
    assert isinstance(conv.kernel_regularizer, keras.regularizers.L2)
    depthwise = options.depthwise_conv(3, 4, "coefficients", dtype="mixed_float16")
    assert (depthwise.name, depthwise.kernel_size, depthwise.depth_multiplier,
            depthwise.padding, depthwise.use_bias) == ("coefficients", (3, 3), 4, "same", False)
    assert isinstance(depthwise.depthwise_regularizer, keras.regularizers.L2)
    assert depthwise.dtype_policy.name == "mixed_float16"
    norm = options.norm("bn")
    assert (norm.name, norm.momentum, norm.epsilon) == ("bn", 0.5, 1e-3)
    assert norm.dtype_policy.name == keras.config.dtype_policy().name
    assert options.norm("coefficient_bn", epsilon=16.0).epsilon == 16.0


def test_layers_read_their_settings_under_the_argument_names():
    for layer in (pde_keras.GlobalLayer(batchnorm_momentum=0.5, kernel_regularizer="l1"),
                  pde_keras.BasicResidualBlock(batchnorm_momentum=0.5, kernel_regularizer="l1")):
        assert isinstance(layer, layer_options.HasLayerOptions)
        assert layer.batchnorm_momentum == layer.layer_options.batchnorm_momentum == 0.5
        assert layer.batchnorm_epsilon == 1e-5
        assert isinstance(layer.kernel_initializer, keras.initializers.HeNormal)
        assert isinstance(layer.kernel_regularizer, keras.regularizers.L1)


BAD_SETTINGS = [
    ("batchnorm_momentum", 1.0, "a finite number >= 0 below 1"),
    ("batchnorm_momentum", -0.5, "a finite number >= 0 below 1"),
    ("batchnorm_momentum", True, "a finite number >= 0 below 1"),
    ("batchnorm_epsilon", 0.0, "a positive finite number"),
    ("batchnorm_epsilon", float("nan"), "a positive finite number"),
]


@pytest.mark.parametrize("argument, value, expected", BAD_SETTINGS)
@pytest.mark.parametrize("make", [
    LayerOptions, pde_keras.BasicResidualBlock, pde_keras.GlobalLayer,
    lambda **options: models.create("resnet32", **options),
], ids=["LayerOptions", "BasicResidualBlock", "GlobalLayer", "resnet32"])
def test_every_front_door_gives_the_same_message(make, argument, value, expected):
    with raises_invalid(argument, expected, value):
        make(**{argument: value})


def test_every_kernel_gets_its_own_initial_values():
    """Unseeded initializers: no two kernels of a layer start equal (as in PyTorch);
    a Keras initializer object shared by the sub-layers would give them one draw."""
    for initializer in ("he_normal", keras.initializers.HeNormal()):
        layer = pde_keras.GlobalLayer(velocity="residual", diffusivity="residual",
                                      init="residual", kernel_initializer=initializer)
        layer(np.zeros((1, 8, 8, 4), "float32"))
        kernels = [w.numpy() for w in layer.weights if w.path.endswith("kernel")]
        assert len(kernels) == 10
        assert not any(np.array_equal(a, b) for i, a in enumerate(kernels)
                       for b in kernels[i + 1:])
        for kernel in kernels:  # Each still He-normal: std sqrt(2 / (3 * 3 * 4)).
            assert 0.15 < kernel.std() < 0.33
    # A seeded initializer keeps its seed in every copy (Keras' rule).
    block = pde_keras.BasicResidualBlock(kernel_initializer=keras.initializers.HeNormal(seed=3))
    block.build((1, 8, 8, 4))
    np.testing.assert_array_equal(block.conv1.kernel.numpy(), block.conv2.kernel.numpy())
