"""Tests of AdvectionDiffusion: its maps against NumPy, saving, errors."""

import re

import keras
import numpy as np
import pytest
from keras import ops

import numpy_reference as ref
import pde_keras
from layer_checks import (check_config_round_trip, check_keras_file_round_trip,
                          raises_invalid)

pytestmark = pytest.mark.multibackend


def _np(x):
    return ops.convert_to_numpy(x)


def _source_and_velocity(shape=(2, 7, 9, 3), seed=3):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype("float32") for _ in range(2)]


def test_advection_diffusion_layer_inputs_and_config():
    layer = pde_keras.AdvectionDiffusion(diffusivity="perona_malik", steps=2, dt=0.1)
    with pytest.raises(ValueError, match=re.escape(
            "AdvectionDiffusion expects a list [source, velocity] of two rank-4 tensors of "
            "the same shape. Received: input_shape=(None, 8, 8, 2)")):
        layer(keras.Input((8, 8, 2)))
    check_config_round_trip(layer, _source_and_velocity())


@pytest.mark.parametrize("diffusivity", ["constant", "perona_malik"])
def test_advection_diffusion_coefficient_maps(diffusivity):
    """The maps are the ones the solver used: u = v = g, D = 1 or Perona-Malik of f."""
    f, g = _source_and_velocity()
    layer = pde_keras.AdvectionDiffusion(diffusivity=diffusivity, steps=3, dx=0.5)
    maps = {name: _np(value) for name, value in layer.coefficient_maps([f, g]).items()}
    assert sorted(maps) == ["Dx", "Dy", "initial", "output", "solution", "u", "ux", "v", "vy"]
    for name, value in maps.items():
        assert value.shape == f.shape and value.dtype == np.float32, name
    if diffusivity == "constant":
        d = 1.0
    else:  # lambda = 2
        d = 1.0 / (1.0 + sum(np.square(s) for s in ref.sobel(f, "periodic")) / 4.0)
    np.testing.assert_allclose(maps["Dx"], np.broadcast_to(d, f.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(maps["Dy"], maps["Dx"])
    np.testing.assert_array_equal(maps["u"], g)
    np.testing.assert_array_equal(maps["v"], g)
    np.testing.assert_allclose(
        maps["ux"], (ref.shift(g, 1, +1, "periodic") - ref.shift(g, 1, -1, "periodic")) / 1.0,
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        maps["vy"], (ref.shift(g, 2, +1, "periodic") - ref.shift(g, 2, -1, "periodic")) / 2.0,
        rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(maps["initial"], f)
    np.testing.assert_allclose(maps["solution"], ref.solve(f, f, (d, d), (g, g), 3, dx=0.5),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(maps["output"], _np(layer([f, g])))
    with pytest.raises(ValueError, match=re.escape(
            "Invalid value for argument `inputs`: expected a list [source, velocity] of two "
            "tensors. Received: inputs='ndarray'")):
        layer.coefficient_maps(f)


@pytest.mark.parametrize("options", [
    {}, {"diffusivity": "perona_malik", "perona_malik_lambda": 1.5, "boundary": "dirichlet"},
    {"diffusivity_constant": 0.5, "steps": 2, "dt": 0.1, "dx": 2.0, "dy": 0.5,
     "boundary": "neumann"},
], ids=lambda options: "-".join(map(str, options.values())) or "defaults")
def test_keras_file_round_trip(options, tmp_path):
    """The MNIST layout: g = conv(f), then the layer on [f, g]."""
    f = keras.Input((7, 9, 3))
    g = keras.layers.Conv2D(3, 3, padding="same")(f)
    model = keras.Model(f, pde_keras.AdvectionDiffusion(name="pde", **options)([f, g]))
    loaded = check_keras_file_round_trip(model, _source_and_velocity()[0], tmp_path)
    config = loaded.get_layer("pde").get_config()
    for key, value in options.items():
        assert config[key] == value


@pytest.mark.parametrize("argument, value, expected", [
    ("diffusivity", "depthwise", "one of 'constant', 'perona_malik'"),
    ("diffusivity_constant", -1.0, "a finite number >= 0"),
    ("perona_malik_lambda", 0.0, "a positive finite number"),
    ("steps", 0, "an integer >= 1"),
    ("dt", -0.1, "a positive finite number"),
    ("boundary", "wrap", "one of 'periodic', 'neumann', 'dirichlet'"),
])
def test_bad_arguments(argument, value, expected):
    with raises_invalid(argument, expected, value):
        pde_keras.AdvectionDiffusion(**{argument: value})
