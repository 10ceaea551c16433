"""Tests of the model factories: parameter counts, shapes, wiring, saving, errors.

Parameter counts are pinned to the issue's numbers and to an independent
count of each architecture (`architectures.py`).
"""

import re

import keras
import numpy as np
import pytest
from keras import ops

import architectures as arch
import numpy_reference as ref
import pde_keras
from layer_checks import check_keras_file_round_trip, raises_invalid
from pde_keras import models
from pde_keras.global_layer import GlobalLayer

pytestmark = pytest.mark.multibackend

MODEL_NAMES = ("mnist_conv", "mnist_residual", "mnist_pde", "resnet32", "resnet32_4stage",
               "resnet32_global", "resnet56", "resnet56_global")
EPS = 1e-5


def _np(x):
    return ops.convert_to_numpy(x)


def _images(model, batch=2, seed=0):
    shape = (batch,) + tuple(model.input.shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# -- names and parameter counts -------------------------------------------------


def test_names():
    assert models.names() == MODEL_NAMES


# (name, options, the pinned trainable-parameter count)
PINNED_PARAMS = [
    ("mnist_conv", {"channels": 1}, 522),
    ("mnist_residual", {"channels": 1}, 524),
    ("mnist_pde", {"channels": 1}, 524),
    ("mnist_pde", {"channels": 1, "diffusivity": "perona_malik"}, 524),
    ("mnist_conv", {"channels": 8}, 4596),
    ("mnist_residual", {"channels": 8}, 4612),
    ("mnist_pde", {"channels": 8}, 4612),
    ("mnist_pde", {"channels": 8, "diffusivity": "perona_malik"}, 4612),
    ("resnet32", {}, 466_906),
    ("resnet32_4stage", {}, 841_050),
    ("resnet32_global", {}, 161_402),
]


def _independent_params(name, options):
    if name.startswith("mnist"):
        return arch.mnist_params(name.split("_")[1], options.get("channels", 1),
                                 options.get("num_classes", 10))
    stages, blocks, global_after = arch.RESNETS[name]
    global_options = {k: v for k, v in options.items() if k != "num_classes"}
    return arch.resnet_params(stages, blocks, global_after, options.get("num_classes", 10),
                              **global_options)


@pytest.mark.parametrize("name, options, expected", PINNED_PARAMS,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o, _ in PINNED_PARAMS])
def test_pinned_trainable_params(build, name, options, expected):
    assert _independent_params(name, options) == expected  # the reference agrees with the issue
    assert arch.trainable_params(build(name, **options)) == expected


@pytest.mark.parametrize("name, options", [
    ("resnet56", {}),
    ("resnet56_global", {}),
    ("resnet32", {"num_classes": 100}),
    ("resnet32_global", {"num_classes": 100}),
    ("mnist_pde", {"channels": 3}),
])
def test_other_params_match_independent_count(build, name, options):
    assert arch.trainable_params(build(name, **options)) == _independent_params(name, options)


def test_resnet56_counts_pinned(build):
    assert arch.trainable_params(build("resnet56")) == 855_770
    assert arch.trainable_params(build("resnet56_global")) == 332_602


def test_global_layer_share_of_resnet32_global(build):
    """The lead's check: backbone 156,250 + 46 C per GlobalLayer (C = 16, 32, 64)."""
    model = build("resnet32_global")
    global_layers = [layer for layer in model.layers if isinstance(layer, GlobalLayer)]
    assert [layer.name for layer in global_layers] == [
        "stage1_global", "stage2_global", "stage3_global"]
    assert [arch.trainable_params(layer) for layer in global_layers] == [46 * 16, 46 * 32, 46 * 64]
    assert arch.trainable_params(model) - 46 * (16 + 32 + 64) == 156_250


@pytest.mark.parametrize("name, options, report", [
    ("mnist_conv", {"channels": 1}, 526), ("mnist_residual", {"channels": 1}, 530),
    ("mnist_pde", {"channels": 1}, 530), ("mnist_conv", {"channels": 8}, 4614),
    ("mnist_pde", {"channels": 8, "diffusivity": "perona_malik"}, 4646),
    ("resnet32_4stage", {}, 844), ("resnet32_global", {}, 163),
    ("resnet32_global", {"velocity": "identity", "diffusivity": "constant"}, 158),
    ("resnet32_global", {"velocity": "residual", "diffusivity": "residual"}, 550),
    ("resnet32_global", {"diffusivity": "perona_malik"}, 160),
    ("resnet32_global", {"init": "residual"}, 261),
])
def test_report_counts_include_the_moving_statistics(build, name, options, report):
    """The report's Tables 1 and 2 count all weights (exact for MNIST, truncated K for CIFAR)."""
    count = build(name, **options).count_params()
    assert (count if name.startswith("mnist") else count // 1000) == report


# -- shapes, names, wiring --------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape(build, name):
    model = build(name)
    expected_input = (28, 28, 1) if name.startswith("mnist") else (32, 32, 3)
    assert tuple(model.input.shape) == (None,) + expected_input
    assert tuple(model.output.shape) == (None, 10)
    logits = _np(model(_images(model), training=False))
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("name", ["resnet32", "resnet32_global", "mnist_residual"])
def test_num_classes(name):
    model = models.create(name, num_classes=100)
    assert _np(model(_images(model, batch=1))).shape == (1, 100)


def test_layer_names_read_well(build):
    names = [layer.name for layer in build("resnet32_global").layers]
    assert names[:4] == ["image", "stem_conv", "stem_bn", "stem_relu"]
    for expected in ("stage1_block1_conv1", "stage1_block1_bn2", "stage1_block1_add",
                     "stage2_block1_pad1", "stage2_block1_shortcut_conv", "stage3_global",
                     "stage4_block1_relu", "pool", "logits"):
        assert expected in names
    assert all(re.fullmatch(r"[a-z0-9_]+", name) for name in names)
    mnist = [layer.name for layer in build("mnist_pde").layers]
    assert mnist == ["image", "input_bn", "input_relu", "input_conv", "velocity_bn",
                     "velocity_relu", "velocity_conv", "pde", "output_bn", "output_relu",
                     "pool", "flatten", "logits"]


def test_resnet_stage_shapes(build):
    model = build("resnet32_4stage")
    shapes = {name: tuple(model.get_layer(f"{name}_relu").output.shape[1:])
              for name in ("stage1_block5", "stage2_block5", "stage3_block5", "stage4_block5")}
    assert shapes == {"stage1_block5": (32, 32, 16), "stage2_block5": (16, 16, 32),
                      "stage3_block5": (8, 8, 64), "stage4_block5": (4, 4, 64)}


def test_strided_conv_pads_like_pytorch():
    """A stride-2 3x3 conv samples the pixels that PyTorch's padding=1 does."""
    x = np.random.default_rng(3).normal(size=(1, 8, 8, 2)).astype("float32")
    inputs = keras.Input((8, 8, 2))
    block = models.blocks.conv_bn(inputs, 3, models.blocks.LayerOptions(), "down", strides=2)
    model = keras.Model(inputs, block)
    kernel = _np(model.get_layer("down_conv").kernel)
    expected = ref.conv_same(x, kernel)[:, ::2, ::2] / np.sqrt(1 + EPS)
    np.testing.assert_allclose(_np(model(x, training=False)), expected, rtol=1e-4, atol=1e-5)


def test_every_global_option_passes_through():
    options = {"velocity": "identity", "diffusivity": "constant", "init": "residual",
               "steps": 3, "dt": 0.1, "dx": 2.0, "dy": 0.5, "boundary": "neumann",
               "diffusivity_constant": 0.5, "perona_malik_lambda": 3.0,
               "batchnorm_momentum": 0.99, "batchnorm_epsilon": 1e-3,
               "coefficient_epsilon": 2.0}
    assert set(options) | {"kernel_initializer", "kernel_regularizer"} == set(
        models.options("resnet32_global")) - {"num_classes", "input_shape", "name"}
    model = models.create("resnet32_global", kernel_regularizer="l2", **options)
    for stage in (1, 2, 3):
        config = model.get_layer(f"stage{stage}_global").get_config()
        for key, value in options.items():
            assert config[key] == value, key
        assert config["kernel_regularizer"]["class_name"] == "L2"
    # The layer options reach the backbone too.
    assert model.get_layer("stem_bn").momentum == 0.99
    assert model.get_layer("stem_bn").epsilon == 1e-3
    assert model.get_layer("stage2_block1_conv1").kernel_regularizer is not None


def test_resnet32_global_coefficient_epsilon_is_each_stage_width(build):
    """The authors' BatchNorm2d(planes, planes): epsilon 16, 32, 64 by stage."""
    model = build("resnet32_global")
    for stage, width in ((1, 16), (2, 32), (3, 64)):
        layer = model.get_layer(f"stage{stage}_global")
        assert layer.coefficient_epsilon == "channels"
        assert [layer.branches[name][-1].epsilon for name in ("u", "v", "Dx", "Dy")] == [
            float(width)] * 4
        assert layer.output_bn.epsilon == 1e-5


def test_mnist_pde_options_pass_through():
    model = models.create("mnist_pde", diffusivity="perona_malik", perona_malik_lambda=1.5,
                          steps=2, boundary="dirichlet")
    config = model.get_layer("pde").get_config()
    assert (config["diffusivity"], config["perona_malik_lambda"], config["steps"],
            config["boundary"]) == ("perona_malik", 1.5, 2, "dirichlet")


@pytest.mark.parametrize("diffusivity", ["constant", "perona_malik"])
def test_mnist_pde_feature_layer_matches_numpy(diffusivity):
    """f = conv(ReLU(BN(x))), g = conv(ReLU(BN(f))), H^K with u = v = g, then BN."""
    model = models.create("mnist_pde", channels=2, diffusivity=diffusivity)
    x = _images(model, batch=1)[:, :10, :12]  # a small, non-square crop keeps numpy fast
    inputs = keras.Input((10, 12, 1))

    def apply(h, *names):
        for name in names:
            h = model.get_layer(name)(h)
        return h

    f = apply(inputs, "input_bn", "input_relu", "input_conv")
    g = apply(f, "velocity_bn", "velocity_relu", "velocity_conv")
    solution = model.get_layer("pde")([f, g])
    sub_model = keras.Model(inputs, solution)

    scale = 1 / np.sqrt(1 + EPS)  # fresh BNs at inference
    f_ref = ref.conv_same(np.maximum(x * scale, 0), _np(model.get_layer("input_conv").kernel))
    g_ref = ref.conv_same(np.maximum(f_ref * scale, 0),
                          _np(model.get_layer("velocity_conv").kernel))
    if diffusivity == "perona_malik":
        g_x, g_y = ref.sobel(f_ref, "periodic")
        d = 1 / (1 + (g_x**2 + g_y**2) / 2.0**2)
    else:
        d = 1.0
    expected = ref.solve(f_ref, f_ref, (d, d), (g_ref, g_ref), 5)
    np.testing.assert_allclose(_np(sub_model(x)), expected, rtol=1e-4, atol=1e-4)


def test_mnist_pde_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    model = models.create("mnist_pde", diffusivity="perona_malik")
    logits = model(_images(model))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert np.all(np.isfinite(_np(logits)))


# -- saving -----------------------------------------------------------------------


SAVED = [(name, {}) for name in MODEL_NAMES] + [
    ("mnist_pde", {"channels": 8, "diffusivity": "perona_malik"}),
    ("resnet32_global", {"velocity": "residual", "diffusivity": "perona_malik",
                         "init": "residual", "boundary": "neumann"}),
]


@pytest.mark.parametrize("name, options", SAVED,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in SAVED])
def test_keras_file_round_trip(build, name, options, tmp_path):
    model = build(name, **options)
    check_keras_file_round_trip(model, _images(model), tmp_path)


# -- errors -----------------------------------------------------------------------


def test_unknown_name():
    allowed = ", ".join(repr(name) for name in MODEL_NAMES)
    with raises_invalid("name", f"one of {allowed}", "resnet18"):
        models.create("resnet18")


@pytest.mark.parametrize("name, options, unknown", [
    ("resnet32", {"velocity": "identity"}, {"velocity": "identity"}),
    ("mnist_conv", {"channels": 8, "diffusivity": "constant"}, {"diffusivity": "constant"}),
    ("resnet32_global", {"num_classes": 100, "stpes": 3}, {"stpes": 3}),
])
def test_unknown_option_lists_the_valid_ones(name, options, unknown):
    allowed = ", ".join(repr(option) for option in models.options(name))
    with raises_invalid("options", f"keyword arguments of model {name!r} among {allowed}",
                        unknown):
        models.create(name, **options)


def test_valid_options_are_listed():
    assert models.options("resnet32") == (
        "num_classes", "input_shape", "name", "kernel_initializer", "kernel_regularizer",
        "batchnorm_momentum", "batchnorm_epsilon")
    assert models.options("mnist_pde")[:4] == ("channels", "num_classes", "input_shape", "name")
    assert "diffusivity" in models.options("mnist_pde")
    assert "velocity" in models.options("resnet56_global")


@pytest.mark.parametrize("name, options, argument, expected, value", [
    ("mnist_conv", {"channels": 0}, "channels", "an integer >= 1", 0),
    ("resnet32", {"num_classes": 2.5}, "num_classes", "an integer >= 1", 2.5),
    ("resnet32_global", {"velocity": "bogus"}, "velocity",
     "one of 'depthwise', 'identity', 'residual', 'zero'", "bogus"),
    ("resnet32_global", {"steps": 0}, "steps", "an integer >= 1", 0),
    ("mnist_pde", {"diffusivity": "depthwise"}, "diffusivity",
     "one of 'constant', 'perona_malik'", "depthwise"),
    ("resnet56", {"batchnorm_momentum": 1.0}, "batchnorm_momentum",
     "a finite number >= 0 below 1", 1.0),
])
def test_bad_option_values(name, options, argument, expected, value):
    with raises_invalid(argument, expected, value):
        models.create(name, **options)


def test_factories_check_options_when_called_directly():
    with pytest.raises(ValueError, match=re.escape("Received: options={'channels': 8}")):
        models.resnet.resnet32(channels=8)
    assert arch.trainable_params(pde_keras.models.mnist.mnist_conv(8)) == 4596
