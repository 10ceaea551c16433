"""`pde_keras.inspection`: PDE layers of nested models, their inputs, and their
Courant and diffusion numbers against NumPy."""

import keras
import numpy as np
import pytest

import numpy_reference as ref
import pde_keras
from pde_keras import inspection, training

pytestmark = pytest.mark.multibackend


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _classifier(core, shape):
    """A training classifier around `core` (pixels -> normalise -> core -> logits)."""
    return training.build_classifier(core, shape, [100.0] * shape[-1], [50.0] * shape[-1])


def _identity_velocity_net(dt=0.3, dx=2.0, dy=0.5):
    """conv -> GlobalLayer(u = v = ReLU(BN(H^0)), D = 0.7) -> pooled logits."""
    inputs = keras.Input((6, 5, 3))
    features = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    pde = pde_keras.GlobalLayer(velocity="identity", diffusivity="constant",
                                diffusivity_constant=0.7, dt=dt, dx=dx, dy=dy, name="pde")
    x = keras.layers.GlobalAveragePooling2D()(pde(features))
    return keras.Model(inputs, keras.layers.Dense(2)(x), name="core")


def test_stability_numbers_match_numpy():
    core = _identity_velocity_net()
    model = _classifier(core, (6, 5, 3))
    layer = core.get_layer("pde")
    rng = np.random.default_rng(0)
    for bn in (layer.branches["u"][0], layer.branches["v"][0]):
        bn.moving_mean.assign(rng.uniform(-0.5, 0.5, 4).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, 4).astype("float32"))
        bn.gamma.assign(rng.uniform(0.5, 3.0, 4).astype("float32"))
    pixels = rng.uniform(0, 255, (3, 6, 5, 3)).astype("float32")

    conv = core.get_layer("conv")
    features = ref.conv_same((pixels - 100.0) / 50.0, _np(conv.kernel)) + _np(conv.bias)
    u, v = (np.maximum(ref.batchnorm_inference(
        features, *(_np(w) for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)),
        bn.epsilon), 0.0) for bn in (layer.branches["u"][0], layer.branches["v"][0]))
    expected_courant = np.max(np.abs(u) * 0.3 / 2.0 + np.abs(v) * 0.3 / 0.5)
    expected_diffusion = 0.7 * 0.3 / 4.0 + 0.7 * 0.3 / 0.25

    numbers = inspection.stability_numbers(model, pixels)
    assert list(numbers) == ["pde"]
    assert numbers["pde"]["courant"] == pytest.approx(expected_courant, rel=1e-5)
    assert numbers["pde"]["diffusion_number"] == pytest.approx(expected_diffusion, rel=1e-6)
    assert expected_courant > 0.1  # The velocity is not trivially zero.


def test_pde_layers_of_nested_models_and_their_inputs():
    core = pde_keras.models.create("resnet32_global", steps=1)
    model = _classifier(core, (32, 32, 3))
    layers = inspection.pde_layers(model)
    assert [layer.name for layer in layers] == [f"stage{i}_global" for i in (1, 2, 3)]
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    inputs = inspection.pde_layer_inputs(model, pixels)
    assert [layer for layer, _ in inputs] == layers
    assert [tuple(value.shape) for _, value in inputs] == [
        (2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64)]
    # The input of stage 1's Global layer is its stage's block output.
    block = keras.Model(core.input, core.get_layer("stage1_block1_relu").output)
    np.testing.assert_allclose(_np(inputs[0][1]), _np(block((pixels - 100.0) / 50.0)),
                               rtol=1e-5, atol=1e-5)


def test_mnist_pde_layer_and_models_without_pde_layers():
    model = _classifier(pde_keras.models.create("mnist_pde", channels=2), (28, 28, 1))
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 28, 28, 1)).astype("float32")
    numbers = inspection.stability_numbers(model, pixels)
    assert list(numbers) == ["pde"]
    # D = 1: the diffusion number is dt (1/dx^2 + 1/dy^2) = 0.4 exactly.
    assert numbers["pde"]["diffusion_number"] == pytest.approx(0.4)
    assert numbers["pde"]["courant"] > 0
    conv = _classifier(pde_keras.models.create("mnist_conv", channels=2), (28, 28, 1))
    assert inspection.pde_layers(conv) == []
    assert inspection.stability_numbers(conv, pixels) == {}


def test_layer_maps_are_the_coefficient_maps_of_the_layers_input():
    core = _identity_velocity_net()
    model = _classifier(core, (6, 5, 3))
    pixels = np.random.default_rng(3).uniform(0, 255, (6, 5, 3)).astype("float32")
    (maps,) = inspection.layer_maps(model, pixels)
    assert (maps.index, maps.name, maps.kind) == (0, "pde", "GlobalLayer")
    conv = core.get_layer("conv")
    features = ref.conv_same((pixels[None] - 100.0) / 50.0, _np(conv.kernel)) + _np(conv.bias)
    np.testing.assert_allclose(maps.maps["input"], features[0], rtol=1e-5, atol=1e-5)
    expected = core.get_layer("pde").coefficient_maps(features.astype("float32"))
    assert set(maps.maps) == {"input", *expected}
    for name, value in expected.items():
        np.testing.assert_allclose(maps.maps[name], _np(value)[0], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
        assert maps.maps[name].dtype == np.float32


def test_layer_outputs_of_a_nested_model():
    core = _identity_velocity_net()
    model = _classifier(core, (6, 5, 3))
    pixels = np.random.default_rng(4).uniform(0, 255, (6, 5, 3)).astype("float32")
    (features,) = inspection.layer_outputs(model, pixels, ["conv"])
    conv = core.get_layer("conv")
    expected = ref.conv_same((pixels[None] - 100.0) / 50.0, _np(conv.kernel)) + _np(conv.bias)
    np.testing.assert_allclose(features, expected[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(LookupError, match="^missing$"):
        inspection.layer_outputs(model, pixels, ["conv", "missing"])


def test_trainable_params_leave_out_the_moving_statistics():
    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 3),
                              keras.layers.BatchNormalization()])
    # Conv 3*3*2*3 + 3 biases, BN gamma and beta: 3 + 3; moving mean/variance are not trained.
    assert inspection.trainable_params(model) == 54 + 3 + 6
    assert model.count_params() == 54 + 3 + 12
