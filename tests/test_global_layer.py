"""Tests of GlobalLayer: wiring against NumPy, invariances, saving, errors."""

import itertools
import pathlib
import re

import keras
import numpy as np
import pytest
from keras import ops

import numpy_reference as ref
import pde_keras
from layer_checks import (batchnorm, check_config_round_trip, check_keras_file_round_trip,
                          raises_invalid, randomise_batchnorms, residual_block)
from pde_keras.global_layer import DIFFUSIVITIES, INITS, VELOCITIES

pytestmark = [pytest.mark.multibackend, pytest.mark.usefixtures("both_solver_paths")]

EPS = 1e-5  # the layer's default batchnorm_epsilon
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _inputs(shape=(2, 7, 9, 3), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _np(x):
    return ops.convert_to_numpy(x)


def _depthwise_map(layer, name, h0):
    """A depth-wise coefficient map before its ReLU, from the fused conv's weights.

    The layer's shared depth-wise conv has one multiplier per map (map j of
    channel c is output channel c * n + j); each map then has its own BN.
    """
    j = layer.depthwise_maps.index(name)
    kernel = _np(layer.coefficient_conv.kernel)[..., j:j + 1]
    return batchnorm(ref.depthwise_conv_same(h0, kernel), layer.branches[name][0])


# -- numerics against the NumPy reference -----------------------------------


@pytest.mark.parametrize("boundary", ["periodic", "neumann", "dirichlet"])
@pytest.mark.parametrize("steps", [1, 5])
def test_default_layer_matches_numpy(boundary, steps):
    """Depth-wise D and v, identity init: every piece recomputed in NumPy."""
    x = _inputs()
    layer = pde_keras.GlobalLayer(steps=steps, boundary=boundary)
    layer.build(x.shape)
    randomise_batchnorms(layer)
    coefficients = {}
    assert layer.depthwise_maps == ("u", "v", "Dx", "Dy")
    for name in layer.depthwise_maps:
        coefficients[name] = np.maximum(_depthwise_map(layer, name, x), 0.0)
    h = ref.solve(x, x, (coefficients["Dx"], coefficients["Dy"]),
                  (coefficients["u"], coefficients["v"]), steps, boundary=boundary)
    expected = np.maximum(batchnorm(h, layer.output_bn), 0.0)
    actual = _np(layer(x, training=False))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("boundary", ["periodic", "neumann", "dirichlet"])
def test_perona_malik_identity_velocity_matches_numpy(boundary):
    x = _inputs()
    layer = pde_keras.GlobalLayer(steps=3, boundary=boundary, velocity="identity",
                                  diffusivity="perona_malik", perona_malik_lambda=1.5)
    layer.build(x.shape)
    randomise_batchnorms(layer)
    u = np.maximum(batchnorm(x, layer.branches["u"][0]), 0.0)
    v = np.maximum(batchnorm(x, layer.branches["v"][0]), 0.0)
    gx, gy = ref.sobel(x, boundary)
    d = 1.0 / (1.0 + (gx**2 + gy**2) / 1.5**2)
    h = ref.solve(x, x, (d, d), (u, v), 3, boundary=boundary)
    expected = np.maximum(batchnorm(h, layer.output_bn), 0.0)
    np.testing.assert_allclose(_np(layer(x)), expected, rtol=1e-4, atol=1e-4)
    maps = layer.coefficient_maps(x)
    np.testing.assert_allclose(_np(maps["Dx"]), d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(maps["u"]), u, rtol=1e-5, atol=1e-6)


def test_constant_diffusivity_zero_velocity_matches_numpy():
    x = _inputs()
    layer = pde_keras.GlobalLayer(steps=4, dt=0.1, dx=0.5, dy=2.0, velocity="zero",
                                  diffusivity="constant", diffusivity_constant=0.7)
    y = _np(layer(x))
    h = ref.solve(x, x, (0.7, 0.7), (0.0, 0.0), 4, dt=0.1, dx=0.5, dy=2.0)
    np.testing.assert_allclose(y, np.maximum(h / np.sqrt(1 + EPS), 0.0), rtol=1e-4, atol=1e-5)


def test_residual_init_feeds_the_solver_and_the_coefficients():
    """H^0 = block(f) is the initial state and the coefficients' input; f stays the source."""
    x = _inputs()
    layer = pde_keras.GlobalLayer(steps=2, init="residual", velocity="identity",
                                  diffusivity="constant")
    layer.build(x.shape)
    randomise_batchnorms(layer)
    h0 = residual_block(x, layer.init_block)
    u = np.maximum(batchnorm(h0, layer.branches["u"][0]), 0.0)
    v = np.maximum(batchnorm(h0, layer.branches["v"][0]), 0.0)
    solution = ref.solve(x, h0, (1.0, 1.0), (u, v), 2)
    maps = layer.coefficient_maps(x)
    np.testing.assert_allclose(_np(maps["initial"]), h0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(maps["solution"]), solution, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("boundary", ["periodic", "dirichlet"])
def test_coefficient_maps_are_what_the_solver_uses(boundary):
    x = _inputs()
    layer = pde_keras.GlobalLayer(steps=5, boundary=boundary)
    maps = {k: _np(v) for k, v in layer.coefficient_maps(x).items()}
    assert set(maps) == {"initial", "solution", "output", "Dx", "Dy", "u", "v", "ux", "vy",
                         "Dx_pre", "Dy_pre", "u_pre", "v_pre"}
    for name, value in maps.items():
        assert value.shape == x.shape, name
    np.testing.assert_allclose(maps["u"], np.maximum(maps["u_pre"], 0))
    ux = (ref.shift(maps["u"], 1, +1, boundary) - ref.shift(maps["u"], 1, -1, boundary)) / 2
    vy = (ref.shift(maps["v"], 2, +1, boundary) - ref.shift(maps["v"], 2, -1, boundary)) / 2
    np.testing.assert_allclose(maps["ux"], ux, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps["vy"], vy, rtol=1e-5, atol=1e-6)
    solution = ref.solve(x, x, (maps["Dx"], maps["Dy"]), (maps["u"], maps["v"]), 5,
                         boundary=boundary)
    np.testing.assert_allclose(maps["solution"], solution, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(maps["output"], _np(layer(x)), rtol=1e-5, atol=1e-6)


def test_constant_maps_are_filled_in():
    x = _inputs()
    maps = pde_keras.GlobalLayer(velocity="zero", diffusivity="constant",
                                 diffusivity_constant=0.3).coefficient_maps(x)
    np.testing.assert_array_equal(_np(maps["Dx"]), np.full(x.shape, 0.3, "float32"))
    np.testing.assert_array_equal(_np(maps["u"]), np.zeros(x.shape))
    np.testing.assert_array_equal(_np(maps["vy"]), np.zeros(x.shape))
    assert not any(k.endswith("_pre") for k in maps)


# -- invariances --------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {},
    {"diffusivity": "perona_malik", "velocity": "identity"},
    {"diffusivity": "constant", "boundary": "dirichlet"},
])
def test_channels_are_independent(options):
    """Changing one input channel changes only that output channel (inference)."""
    x = _inputs()
    layer = pde_keras.GlobalLayer(**options)
    y = _np(layer(x))
    x2 = x.copy()
    x2[..., 1] += np.random.default_rng(5).normal(size=x2[..., 1].shape).astype("float32")
    y2 = _np(layer(x2))
    np.testing.assert_array_equal(y2[..., [0, 2]], y[..., [0, 2]])
    assert np.abs(y2[..., 1] - y[..., 1]).max() > 1e-3


@pytest.mark.parametrize("options", [
    {"diffusivity": "constant", "velocity": "identity"},
    {"diffusivity": "perona_malik", "velocity": "identity"},
    {"diffusivity": "zero", "velocity": "identity", "steps": 2},
])
def test_periodic_translation_equivariance(options):
    """Without zero-padded convolutions the periodic layer commutes with rolls."""
    x = _inputs()
    layer = pde_keras.GlobalLayer(**options)
    layer.build(x.shape)
    randomise_batchnorms(layer)
    rolled = np.roll(x, (2, 3), axis=(1, 2))
    np.testing.assert_allclose(_np(layer(rolled)), np.roll(_np(layer(x)), (2, 3), axis=(1, 2)),
                               rtol=1e-5, atol=1e-5)


# -- training, saving, precision ----------------------------------------------


def test_fit_updates_every_weight():
    x = _inputs((8, 8, 8, 4))
    y = np.arange(8) % 2
    inputs = keras.Input((8, 8, 4))
    h = pde_keras.GlobalLayer(init="residual")(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [_np(w).copy() for w in model.trainable_weights]
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for w, old in zip(model.trainable_weights, before):
        assert not np.array_equal(_np(w), old), w.path


OPTION_SETS = (
    [{"diffusivity": d} for d in DIFFUSIVITIES]
    + [{"velocity": v} for v in VELOCITIES if v != "depthwise"]
    + [{"init": "residual"}, {"boundary": "neumann", "steps": 2, "dt": 0.1},
       {"boundary": "dirichlet", "dx": 2.0, "dy": 0.5},
       {"diffusivity": "constant", "diffusivity_constant": 0.5, "velocity": "zero"},
       {"diffusivity": "perona_malik", "perona_malik_lambda": 3.0, "velocity": "identity"},
       {"coefficient_epsilon": 1e-3, "velocity": "residual"}]
)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(map(str, o.values())))
def test_keras_file_round_trip(options, tmp_path):
    x = _inputs((2, 8, 8, 4))
    inputs = keras.Input((8, 8, 4))
    model = keras.Model(inputs, pde_keras.GlobalLayer(name="global", **options)(inputs))
    randomise_batchnorms(model.get_layer("global"))
    loaded = check_keras_file_round_trip(model, x, tmp_path)
    config = model.get_layer("global").get_config()
    assert loaded.get_layer("global").get_config() == config
    for key, value in options.items():
        assert config[key] == value


def test_config_round_trip_all_combinations():
    x = _inputs((1, 5, 6, 2))
    for d, v, i in itertools.product(DIFFUSIVITIES, VELOCITIES, INITS):
        layer = pde_keras.GlobalLayer(diffusivity=d, velocity=v, init=i, steps=2)
        layer.build(x.shape)
        randomise_batchnorms(layer)
        check_config_round_trip(layer, x)


@pytest.mark.parametrize("options", [{}, {"diffusivity": "perona_malik"}])
def test_mixed_precision_matches_float32(options):
    x = _inputs((2, 8, 8, 4))
    reference = pde_keras.GlobalLayer(**options)
    reference.build(x.shape)
    randomise_batchnorms(reference)
    mixed = pde_keras.GlobalLayer(dtype="mixed_float16", **options)
    mixed.build(x.shape)
    mixed.set_weights(reference.get_weights())
    y32, y16 = _np(reference(x)), _np(mixed(x))
    assert y16.dtype == np.float16
    assert np.all(np.isfinite(y16))
    np.testing.assert_allclose(y16.astype("float32"), y32, rtol=2e-2, atol=2e-2)
    assert keras.backend.standardize_dtype(mixed.coefficient_maps(x)["solution"].dtype) == "float32"


def test_mixed_precision_training_step_is_finite():
    keras.config.set_dtype_policy("mixed_float16")
    inputs = keras.Input((8, 8, 4))
    h = pde_keras.GlobalLayer()(inputs)
    outputs = keras.layers.Dense(2, dtype="float32")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(_inputs((8, 8, 8, 4)), np.arange(8) % 2, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


# -- the coefficient batch norms' epsilon --------------------------------------


def _batchnorm_epsilons(layer):
    """{sub-layer path below the layer: epsilon} of every BN of a built layer."""
    return {sub.path.split("/", 1)[1]: sub.epsilon
            for sub in layer._flatten_layers(include_self=False)
            if isinstance(sub, keras.layers.BatchNormalization)}


@pytest.mark.parametrize("options, coefficient_bns", [
    ({}, ["u_bn", "v_bn", "Dx_bn", "Dy_bn"]),
    ({"velocity": "identity", "diffusivity": "residual", "init": "residual"},
     ["u_bn", "v_bn", "Dx_bn", "Dy_bn"]),
    ({"velocity": "residual", "diffusivity": "perona_malik"}, ["u_bn", "v_bn"]),
    ({"velocity": "zero", "diffusivity": "constant"}, []),
])
def test_coefficient_batchnorms_take_the_channel_count_as_epsilon(options, coefficient_bns):
    """As the authors' BatchNorm2d(planes, planes); every other BN keeps 1e-5."""
    layer = pde_keras.GlobalLayer(**options)
    layer.build((None, 8, 8, 6))
    epsilons = _batchnorm_epsilons(layer)
    assert sorted(name for name, eps in epsilons.items() if eps == 6.0) == sorted(coefficient_bns)
    assert all(eps == EPS for name, eps in epsilons.items() if name not in coefficient_bns)
    assert "output_bn" in epsilons
    if options.get("init") == "residual":  # The residual blocks' own BNs keep PyTorch's default.
        assert {"init_block/bn1", "init_block/bn2", "Dx_block/bn1"} <= set(epsilons)

    layer = pde_keras.GlobalLayer(coefficient_epsilon=1e-3, **options)
    layer.build((None, 8, 8, 6))
    assert {name: eps for name, eps in _batchnorm_epsilons(layer).items() if eps == 1e-3} == {
        name: 1e-3 for name in coefficient_bns}


@pytest.mark.parametrize("options", [{}, {"velocity": "identity", "diffusivity": "residual"}])
def test_coefficient_epsilon_acts_as_added_moving_variance(options):
    """In inference mode epsilon c equals epsilon 1e-5 with moving variance + c - 1e-5."""
    x = _inputs((2, 8, 8, 4))
    authors = pde_keras.GlobalLayer(**options)  # epsilon 4 in front of the ReLUs
    authors.build(x.shape)
    randomise_batchnorms(authors)
    uniform = pde_keras.GlobalLayer(coefficient_epsilon=EPS, **options)
    uniform.build(x.shape)
    uniform.set_weights(authors.get_weights())
    for branch in uniform.branches.values():
        branch[-1].moving_variance.assign(branch[-1].moving_variance + 4.0 - EPS)
    np.testing.assert_allclose(_np(uniform(x, training=False)), _np(authors(x, training=False)),
                               rtol=1e-5, atol=1e-5)


def test_files_saved_before_coefficient_epsilon_compute_what_they_did():
    """A model of three GlobalLayers saved by pde-keras 0.1.0 (tests/fixtures/README.md)."""
    model = keras.saving.load_model(FIXTURES / "global_layer_v0.1.0.keras")
    saved = np.load(FIXTURES / "global_layer_v0.1.0.npz")
    np.testing.assert_allclose(_np(model(saved["inputs"], training=False)), saved["outputs"],
                               rtol=1e-4, atol=1e-4)
    layers = model.layers[1:]
    assert [layer.coefficient_epsilon for layer in layers] == [EPS] * 3
    assert {eps for layer in layers for eps in _batchnorm_epsilons(layer).values()} == {EPS}
    # The fixture tells the epsilons apart: today's default computes otherwise.
    clone = keras.Model.from_config({
        **model.get_config(),
        "layers": [{**spec, "config": {**spec["config"], "coefficient_epsilon": "channels"}}
                   if spec["class_name"] == "GlobalLayer" else spec
                   for spec in model.get_config()["layers"]]})
    clone.set_weights(model.get_weights())
    assert np.max(np.abs(_np(clone(saved["inputs"], training=False)) - saved["outputs"])) > 0.1


# -- errors --------------------------------------------------------------------


@pytest.mark.parametrize("argument, value, expected", [
    ("steps", 0, "an integer >= 1"),
    ("steps", 2.5, "an integer >= 1"),
    ("steps", True, "an integer >= 1"),
    ("dt", 0.0, "a positive finite number"),
    ("dt", float("inf"), "a positive finite number"),
    ("dx", -1.0, "a positive finite number"),
    ("dy", "1", "a positive finite number"),
    ("boundary", "wrap", "one of 'periodic', 'neumann', 'dirichlet'"),
    ("diffusivity", "bogus",
     "one of 'depthwise', 'constant', 'perona_malik', 'residual', 'zero'"),
    ("velocity", "constant", "one of 'depthwise', 'identity', 'residual', 'zero'"),
    ("init", None, "one of 'identity', 'residual'"),
    ("diffusivity_constant", -0.1, "a finite number >= 0"),
    ("perona_malik_lambda", 0, "a positive finite number"),
    ("batchnorm_momentum", 1.0, "a finite number >= 0 below 1"),
    ("batchnorm_epsilon", 0.0, "a positive finite number"),
    ("coefficient_epsilon", 0.0, "'channels' or a positive finite number"),
    ("coefficient_epsilon", "planes", "'channels' or a positive finite number"),
    ("coefficient_epsilon", None, "'channels' or a positive finite number"),
])
def test_bad_arguments(argument, value, expected):
    with raises_invalid(argument, expected, value):
        pde_keras.GlobalLayer(**{argument: value})


def test_rejects_inputs_that_are_not_rank_4():
    message = ("GlobalLayer expects rank-4 inputs (batch, height, width, channels). "
               "Received: input_shape=(None, 8, 4)")
    with pytest.raises(ValueError, match=re.escape(message)):
        pde_keras.GlobalLayer()(keras.Input((8, 4)))


@pytest.mark.parametrize("options, depthwise_maps", [
    ({"velocity": "zero"}, ("Dx", "Dy")),
    ({"diffusivity": "constant"}, ("u", "v")),
    ({"diffusivity": "residual", "velocity": "depthwise"}, ("u", "v")),
])
def test_shared_depthwise_conv_serves_each_map(options, depthwise_maps):
    x = _inputs()
    layer = pde_keras.GlobalLayer(**options)
    layer.build(x.shape)
    randomise_batchnorms(layer)
    assert layer.depthwise_maps == depthwise_maps
    maps = layer.coefficient_maps(x)
    for name in depthwise_maps:
        np.testing.assert_allclose(_np(maps[f"{name}_pre"]), _depthwise_map(layer, name, x),
                                   rtol=1e-4, atol=1e-5)
