"""Tests of the compiled solver kernel against the keras.ops reference solver.

The keras.ops solver (`PDE_KERAS_SOLVER=reference`) is the reference; the
kernel must match it, forward and every gradient, to a relative error of
1e-5, and match the independent NumPy oracle and finite differences of it.
"""

import os
import pathlib
import re
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest

import numpy_reference as ref
import pde_keras
from pde_keras import fused_solver, solver

BACKEND = keras.backend.backend()
BOUNDARIES = ("periodic", "neumann", "dirichlet")
ROOT = pathlib.Path(__file__).resolve().parent.parent

tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow",
                                     reason="the compiled kernel is TensorFlow-only")


def _problem(shape, seed=0, coefficients="full"):
    """(f, H^0, D_x, D_y, u, v) as float32 arrays; coefficients full maps,
    per-channel (1, 1, 1, C) tensors or python scalars."""
    rng = np.random.default_rng(seed)
    f, h0 = (rng.standard_normal(shape).astype("float32") for _ in range(2))
    if coefficients == "scalar":
        return [f, h0, 0.3, 0.7, 0.5, -0.25]
    map_shape = shape if coefficients == "full" else (1, 1, 1, shape[-1])
    return [f, h0] + [rng.uniform(0.0, 1.0, map_shape).astype("float32") for _ in range(4)]


def _solve_with_gradients(path, arrays, steps, boundary, **options):
    """H^K and d(sum(H^K * w))/d(every tensor input) on `path`."""
    import tensorflow as tf

    os.environ[fused_solver.ENVIRONMENT_VARIABLE] = path
    tensors = [tf.constant(a) if isinstance(a, np.ndarray) else a for a in arrays]
    watched = [t for t in tensors if isinstance(t, tf.Tensor)]
    weights = np.random.default_rng(99).standard_normal(arrays[0].shape).astype("float32")
    with tf.GradientTape() as tape:
        tape.watch(watched)
        f, h0, d_x, d_y, u, v = tensors
        out = solver.solve_advection_diffusion(f, h0, (d_x, d_y), (u, v), steps,
                                               boundary=boundary, **options)
        loss = tf.reduce_sum(out * weights)
    return [out.numpy()] + [g.numpy() for g in tape.gradient(loss, watched)]


def _max_relative_error(actual, expected):
    scale = float(np.max(np.abs(expected)))
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))) / max(scale, 1e-30)


@pytest.fixture
def restore_path(monkeypatch):
    monkeypatch.setenv(fused_solver.ENVIRONMENT_VARIABLE, "auto")


@pytest.fixture(params=["8", "16"], ids=["lanes-8", "lanes-16"])
def unit_lanes(request, monkeypatch):
    """Runs a kernel test with 8 and with 16 channels per work unit
    (`PDE_KERAS_LANES`; 16 only where the build has AVX-512, else 8 again),
    every shape at both widths, partial blocks included (on their own the
    kernels take 16 only for channels in whole 16s)."""
    monkeypatch.setenv(fused_solver.LANES_VARIABLE, request.param)


# Every numerical kernel test runs at both unit widths.
both_widths = pytest.mark.usefixtures("unit_lanes")


@tensorflow_only
@both_widths
@pytest.mark.usefixtures("restore_path")
@pytest.mark.parametrize("shape, coefficients", [
    ((2, 7, 9, 3), "full"),      # non-square
    ((1, 5, 1, 2), "full"),      # 1 pixel wide, batch 1
    ((2, 1, 6, 1), "full"),      # 1 pixel high, 1 channel
    ((1, 2, 3, 5), "full"),      # 2 pixels high: two-step sweeps have only edge rows
    ((1, 4, 6, 11), "full"),     # a channel block and a partial one
    ((2, 5, 4, 16), "full"),     # one 16-channel block (AVX-512: one wide unit)
    ((1, 3, 5, 32), "full"),     # two of them
    ((2, 6, 5, 3), "channel"),   # per-channel (broadcast) coefficients
    ((2, 6, 5, 3), "scalar"),    # python scalars
])
# (The kernel runs the steps after the first two per sweep: K = 3 and 5 in
# pairs, 2 and 4 with one step left over.)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_matches_reference_solver_forward_and_every_gradient(boundary, steps, shape,
                                                             coefficients):
    arrays = _problem(shape, seed=steps, coefficients=coefficients)
    compiled = _solve_with_gradients("compiled", arrays, steps, boundary)
    reference = _solve_with_gradients("reference", arrays, steps, boundary)
    names = ["H^K", "f", "H^0", "D_x", "D_y", "u", "v"][:len(reference)]
    for name, actual, expected in zip(names, compiled, reference):
        assert actual.shape == expected.shape, name
        error = _max_relative_error(actual, expected)
        assert error <= 1e-5, f"{name}: max relative error {error:.2e}"


@tensorflow_only
@both_widths
@pytest.mark.usefixtures("restore_path")
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_rectified_coefficients_match_the_reference(boundary, steps):
    """Maps given before their ReLU (half of them negative): the kernel's
    in-pass ReLU and its gradient mask against ops.relu on the reference path."""
    arrays = _problem((2, 6, 5, 3), seed=11)
    arrays[2:] = [2.0 * a - 1.0 for a in arrays[2:]]
    compiled = _solve_with_gradients("compiled", arrays, steps, boundary,
                                     rectify_coefficients=True)
    reference = _solve_with_gradients("reference", arrays, steps, boundary,
                                      rectify_coefficients=True)
    for actual, expected in zip(compiled, reference):
        assert _max_relative_error(actual, expected) <= 1e-5
    unrectified = _solve_with_gradients("reference", arrays, steps, boundary)
    assert _max_relative_error(unrectified[0], reference[0]) > 1e-3


@tensorflow_only
@both_widths
@pytest.mark.usefixtures("restore_path")
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_one_tensor_as_source_and_initial_state(boundary, steps, graph):
    """f and H^0 one tensor (the Global layer's case): the kernel's gradient
    op then writes their sum once; it must equal the reference's sum."""
    import tensorflow as tf

    arrays = _problem((2, 6, 5, 11), seed=12)
    weights = np.random.default_rng(98).standard_normal(arrays[0].shape).astype("float32")
    x, *maps = (tf.constant(a) for a in [arrays[0]] + arrays[2:])

    def run():
        with tf.GradientTape() as tape:
            tape.watch([x] + maps)
            out = solver.solve_advection_diffusion(x, x, maps[:2], maps[2:], steps,
                                                   boundary=boundary)
            loss = tf.reduce_sum(out * weights)
        return [out] + tape.gradient(loss, [x] + maps)

    results = {}
    for path in ("compiled", "reference"):
        os.environ[fused_solver.ENVIRONMENT_VARIABLE] = path
        results[path] = [t.numpy() for t in (tf.function(run)() if graph else run())]
    for name, actual, expected in zip(["H^K", "x", "D_x", "D_y", "u", "v"],
                                      results["compiled"], results["reference"]):
        error = _max_relative_error(actual, expected)
        assert error <= 1e-5, f"{name}: max relative error {error:.2e}"


@tensorflow_only
@both_widths
@pytest.mark.parametrize("shape, maps", [((2, 7, 9, 3), 4), ((1, 5, 1, 2), 2), ((1, 4, 6, 11), 1),
                                         ((2, 5, 6, 32), 4)])
def test_depthwise_maps_match_tensorflows_depthwise_conv(shape, maps):
    """Forward and both gradients against tf.nn.depthwise_conv2d (output
    channel c * maps + k is map k of channel c)."""
    import tensorflow as tf

    rng = np.random.default_rng(10)
    x = tf.constant(rng.standard_normal(shape).astype("float32"))
    kernel = tf.constant(rng.standard_normal((3, 3, shape[-1], maps)).astype("float32"))
    weights = [tf.constant(rng.standard_normal(shape).astype("float32")) for _ in range(maps)]

    def run(compute_maps):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            outputs = compute_maps()
            loss = sum(tf.reduce_sum(o * w) for o, w in zip(outputs, weights))
        return [o.numpy() for o in outputs] + [g.numpy() for g in tape.gradient(loss, [x, kernel])]

    def reference():
        fused = tf.nn.depthwise_conv2d(x, kernel, (1, 1, 1, 1), "SAME")
        return tf.unstack(tf.reshape(fused, shape + (maps,)), axis=-1)

    for actual, expected in zip(run(lambda: fused_solver.depthwise_maps(x, kernel)),
                                run(reference)):
        assert _max_relative_error(actual, expected) <= 1e-5


@tensorflow_only
@both_widths
@pytest.mark.usefixtures("restore_path")
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_matches_numpy_oracle(boundary):
    f, h0, d_x, d_y, u, v = _problem((2, 6, 7, 3), seed=4)
    os.environ[fused_solver.ENVIRONMENT_VARIABLE] = "compiled"
    spacing = dict(dt=0.1, dx=0.5, dy=2.0)
    out = solver.solve_advection_diffusion(f, h0, (d_x, d_y), (u, v), 4, boundary=boundary,
                                           **spacing)
    expected = ref.solve(f, h0, (d_x, d_y), (u, v), 4, boundary=boundary, **spacing)
    assert _max_relative_error(keras.ops.convert_to_numpy(out), expected) <= 1e-5


@tensorflow_only
@both_widths
@pytest.mark.usefixtures("restore_path")
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_gradients_match_finite_differences_of_the_oracle(boundary):
    """Every input's gradient against central differences of the float64 oracle."""
    shape, steps = (1, 3, 4, 2), 2
    arrays = _problem(shape, seed=5)
    arrays[2:] = [a + 0.2 for a in arrays[2:]]  # keep D and v away from ReLU's kink
    weights = np.random.default_rng(99).standard_normal(shape)
    gradients = _solve_with_gradients("compiled", arrays, steps, boundary)[1:]

    def loss(values):
        f, h0, d_x, d_y, u, v = values
        return float(np.sum(ref.solve(f, h0, (d_x, d_y), (u, v), steps,
                                      boundary=boundary) * weights))

    point = [a.astype(np.float64) for a in arrays]
    eps = 1e-5
    for index, gradient in enumerate(gradients):
        numeric = np.zeros(shape)
        for cell in np.ndindex(*shape):
            plus = [a.copy() for a in point]
            minus = [a.copy() for a in point]
            plus[index][cell] += eps
            minus[index][cell] -= eps
            numeric[cell] = (loss(plus) - loss(minus)) / (2 * eps)
        np.testing.assert_allclose(gradient, numeric, rtol=1e-4,
                                   atol=1e-4 * np.max(np.abs(numeric)))


def _trained_weights(path, x, y):
    os.environ[fused_solver.ENVIRONMENT_VARIABLE] = path
    keras.utils.set_random_seed(3)
    inputs = keras.Input(x.shape[1:])
    h = pde_keras.GlobalLayer(steps=2)(inputs)
    h = pde_keras.GlobalLayer(steps=1, boundary="neumann")(h)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    return [w.numpy() for w in model.weights]


@tensorflow_only
@pytest.mark.usefixtures("restore_path")
def test_training_gives_the_same_weights_on_both_paths():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 6, 5, 3)).astype("float32")
    y = rng.integers(0, 2, 8)
    compiled = _trained_weights("compiled", x, y)
    reference = _trained_weights("reference", x, y)
    for actual, expected in zip(compiled, reference):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@tensorflow_only
@pytest.mark.usefixtures("restore_path")
def test_keras_file_is_the_same_whichever_path_saved_it(tmp_path):
    x = np.random.default_rng(7).standard_normal((2, 6, 5, 3)).astype("float32")
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, pde_keras.GlobalLayer(steps=3)(inputs))
    outputs = {}
    for path in ("compiled", "reference"):
        os.environ[fused_solver.ENVIRONMENT_VARIABLE] = path
        model.save(tmp_path / f"{path}.keras")
        outputs[path] = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(outputs["compiled"], outputs["reference"], rtol=1e-5, atol=1e-6)
    configs = [zipfile.ZipFile(tmp_path / f"{path}.keras").read("config.json")
               for path in ("compiled", "reference")]
    assert configs[0] == configs[1]
    for saved_by in ("compiled", "reference"):
        for path in ("compiled", "reference"):
            os.environ[fused_solver.ENVIRONMENT_VARIABLE] = path
            loaded = keras.saving.load_model(tmp_path / f"{saved_by}.keras")
            assert loaded.layers[-1].get_config() == model.layers[-1].get_config()
            np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), outputs[path],
                                       rtol=1e-6, atol=1e-6)


_FALLBACK_SCRIPT = textwrap.dedent("""
    import numpy as np
    from pde_keras import solver
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 2)).astype("float32")
    for _ in range(2):
        out = solver.solve_advection_diffusion(x, x, (0.3, 0.4), (x, x), 2)
    np.save("out.npy", np.asarray(out))
""")


@tensorflow_only
def test_fallback_when_the_kernel_cannot_be_built_logs_once_and_computes(tmp_path):
    """A compiler that fails: one log line, the reference's result; forcing
    the compiled path then is an error."""
    env = dict(os.environ, CXX="false", PDE_KERAS_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop(fused_solver.ENVIRONMENT_VARIABLE, None)
    result = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "pde_keras:" in line]
    assert len(lines) == 1 and "compiled solver kernel is unavailable" in lines[0], lines
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 2)).astype("float32")
    expected = ref.solve(x, x, (0.3, 0.4), (x, x), 2)
    assert _max_relative_error(np.load(tmp_path / "out.npy"), expected) <= 1e-5
    assert not list((tmp_path / "cache").glob("*/*.so*")), "a failed build left a file behind"

    env[fused_solver.ENVIRONMENT_VARIABLE] = "compiled"
    result = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "PDE_KERAS_SOLVER=compiled, but the kernel could not be built" in result.stderr


@pytest.mark.multibackend
def test_requested_path_is_validated(monkeypatch):
    monkeypatch.setenv(fused_solver.ENVIRONMENT_VARIABLE, "fast")
    with pytest.raises(ValueError, match="PDE_KERAS_SOLVER"):
        fused_solver.requested_path()
    monkeypatch.setenv(fused_solver.ENVIRONMENT_VARIABLE, " Reference ")
    assert fused_solver.requested_path() == "reference"
    monkeypatch.delenv(fused_solver.ENVIRONMENT_VARIABLE)
    assert fused_solver.requested_path() == "auto"


@tensorflow_only
@pytest.mark.usefixtures("restore_path")
def test_requested_lanes_are_validated(monkeypatch):
    monkeypatch.setenv(fused_solver.LANES_VARIABLE, "4")
    message = ("Invalid value for argument `PDE_KERAS_LANES`: expected one of 'auto', '8', '16'. "
               "Received: PDE_KERAS_LANES='4'")
    with pytest.raises(ValueError, match=re.escape(message)):
        fused_solver.use_compiled("float32")  # (where a traced layer meets it)
    for value, expected in (("16", "16"), ("", "auto")):
        monkeypatch.setenv(fused_solver.LANES_VARIABLE, value)
        assert fused_solver.requested_lanes() == expected
    monkeypatch.delenv(fused_solver.LANES_VARIABLE)
    assert fused_solver.requested_lanes() == "auto"


@pytest.mark.multibackend
def test_only_float32_tensorflow_problems_use_the_kernel(monkeypatch):
    monkeypatch.setenv(fused_solver.ENVIRONMENT_VARIABLE, "auto")
    assert not fused_solver.use_compiled("float64")
    assert fused_solver.use_compiled("float32") == (BACKEND == "tensorflow")
    if BACKEND != "tensorflow":
        monkeypatch.setenv(fused_solver.ENVIRONMENT_VARIABLE, "compiled")
        with pytest.raises(RuntimeError, match="TensorFlow-only"):
            fused_solver.use_compiled("float32")


@tensorflow_only
@pytest.mark.usefixtures("restore_path")
def test_xla_traces_use_the_reference():
    """The kernel has no XLA lowering: under jit_compile the keras.ops solver runs."""
    import tensorflow as tf

    x = np.random.default_rng(8).standard_normal((1, 4, 5, 2)).astype("float32")
    os.environ[fused_solver.ENVIRONMENT_VARIABLE] = "compiled"
    jitted = tf.function(lambda t: solver.solve_advection_diffusion(t, t, (t, t), (t, t), 2),
                         jit_compile=True)
    plain = solver.solve_advection_diffusion(x, x, (x, x), (x, x), 2)
    np.testing.assert_allclose(jitted(x).numpy(), plain.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two processes compile the kernel (~1 min on 2 cores)
@tensorflow_only
def test_two_processes_building_at_once_share_one_build(tmp_path):
    env = dict(os.environ, PDE_KERAS_CACHE=str(tmp_path / "cache"), TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               **{fused_solver.ENVIRONMENT_VARIABLE: "compiled"})
    processes = [subprocess.Popen([sys.executable, "-c", _FALLBACK_SCRIPT], cwd=tmp_path / str(i),
                                  env=env, stderr=subprocess.PIPE, text=True)
                 for i in range(2) if (tmp_path / str(i)).mkdir() is None]
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read()
    assert [p.name for p in (tmp_path / "cache").glob("*/*.so*")] == ["fused_solver.so"]


# -- the batch norms inside the kernels ---------------------------------------
# The Global layer's coefficient and output batch norms run inside the kernels
# on the compiled path: the depth-wise op and the solver sum the batch
# statistics of what they write, the solver normalises the maps as it reads
# them, and one op normalises and rectifies H^K. Each piece is checked against
# NumPy and TensorFlow's own ops (forward and every gradient).


def _moments(values):
    """NumPy batch mean and biased variance per channel (last axis), in float64."""
    values = np.asarray(values, np.float64).reshape(-1, values.shape[-1])
    return values.mean(axis=0), values.var(axis=0)


def _gradients(compute, inputs, weights):
    """The outputs of `compute(*inputs)` and d(sum_i sum(output_i * weights_i))/d inputs
    (None for an input the outputs do not depend on)."""
    import tensorflow as tf

    inputs = [tf.constant(value) for value in inputs]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = compute(*inputs)
        loss = sum(tf.reduce_sum(o * w) for o, w in zip(outputs, weights))
    grads = tape.gradient(loss, inputs)
    return [o.numpy() for o in outputs] + [None if g is None else g.numpy() for g in grads]


def _weights_like(arrays, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(np.shape(a)).astype("float32") for a in arrays]


@tensorflow_only
@both_widths
@pytest.mark.parametrize("shape, maps", [((2, 7, 9, 3), 4), ((1, 5, 1, 2), 2), ((3, 4, 6, 11), 3),
                                         ((2, 4, 5, 32), 4)])
def test_depthwise_statistics_match_numpy(shape, maps):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) + 0.5).astype("float32")
    kernel = rng.standard_normal((3, 3, shape[-1], maps)).astype("float32")
    outputs, mean, variance, passed = fused_solver.depthwise_maps(x, kernel, statistics=True)
    assert tuple(mean.shape) == tuple(variance.shape) == (maps, shape[-1])
    np.testing.assert_array_equal(passed, x)
    for k, output in enumerate(outputs):
        expected_mean, expected_variance = _moments(output.numpy())
        np.testing.assert_allclose(mean[k], expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(variance[k], expected_variance, rtol=1e-5, atol=1e-6)


@tensorflow_only
@both_widths
@pytest.mark.parametrize("shape, maps", [((2, 7, 9, 3), 4), ((1, 4, 6, 11), 2)])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("through", ["maps_and_statistics", "statistics"])
def test_depthwise_statistics_gradients_match_tensorflow(shape, maps, through, graph):
    """Gradients through the maps, their statistics and the input passed
    through at once, or through the statistics and the input alone (the
    statistics' own gradient path, as when the solver takes the maps'),
    against tf.nn.depthwise_conv2d and tf.nn.moments."""
    import tensorflow as tf

    rng = np.random.default_rng(12)
    x = rng.standard_normal(shape).astype("float32")
    kernel = rng.standard_normal((3, 3, shape[-1], maps)).astype("float32")
    statistics_shape = np.zeros((maps, shape[-1]))
    weights = _weights_like([x] + [statistics_shape] * 2 + [x] * maps, 13)
    with_maps = through == "maps_and_statistics"

    def compiled(x, kernel):
        outputs, mean, variance, passed = fused_solver.depthwise_maps(x, kernel, statistics=True)
        return [passed, mean, variance] + (outputs if with_maps else [])

    def reference(x, kernel):
        fused = tf.nn.depthwise_conv2d(x, kernel, (1, 1, 1, 1), "SAME")
        outputs = tf.unstack(tf.reshape(fused, shape + (maps,)), axis=-1)
        mean, variance = tf.nn.moments(tf.stack(outputs), axes=(1, 2, 3))
        return [x, mean, variance] + (outputs if with_maps else [])

    if graph:
        compiled = tf.function(compiled)
    for actual, expected in zip(_gradients(compiled, [x, kernel], weights),
                                _gradients(reference, [x, kernel], weights)):
        assert _max_relative_error(actual, expected) <= 1e-5


@tensorflow_only
@both_widths
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 1, 6, 9), (3, 6, 1, 5), (3, 1, 1, 2),
                                   (2, 2, 3, 8), (2, 32, 32, 16)])
def test_statistics_gradient_alone_matches_tensorflow(shape):
    """The statistics' share of the gradient alone (computed without any map:
    a 5x5 conv and lag products, edges corrected), odd shapes included."""
    import tensorflow as tf

    maps = 4
    rng = np.random.default_rng(31)
    x = (rng.standard_normal(shape) + 0.3).astype("float32")
    kernel = rng.standard_normal((3, 3, shape[-1], maps)).astype("float32")
    weights = _weights_like([np.zeros((maps, shape[-1]))] * 2, 32)

    @tf.function
    def compiled(x, kernel):
        return fused_solver.depthwise_maps(x, kernel, statistics=True)[1:3]

    def reference(x, kernel):
        fused = tf.nn.depthwise_conv2d(x, kernel, (1, 1, 1, 1), "SAME")
        return tf.nn.moments(tf.reshape(fused, shape + (maps,)), axes=(0, 1, 2, 3)[:3])

    def transposed(x, kernel):  # moments come out (channels, maps)
        return [tf.transpose(m) for m in reference(x, kernel)]

    for actual, expected in zip(_gradients(compiled, [x, kernel], weights),
                                _gradients(transposed, [x, kernel], weights)):
        assert _max_relative_error(actual, expected) <= 1e-5


@tensorflow_only
@both_widths
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 1, 6, 9), (2, 8, 8, 16)])
@pytest.mark.parametrize("steps, boundary", [(1, "periodic"), (2, "neumann"), (5, "dirichlet")])
@pytest.mark.parametrize("rows, shared", [([0, 1, 2, 3], True), ([-1, -1, 1, 0], True),
                                          ([2, -1, 0, -1], False)])
def test_solver_takes_the_depthwise_maps_gradient_through_their_conv(shape, steps, boundary,
                                                                     rows, shared):
    """solve(..., depthwise=(kernel, rows)) against the same maps whose
    gradient goes back through the depth-wise op: the solution, its
    statistics and the gradients of f, H^0, the kernel, the normalisation and
    the other maps (some maps given, a kernel map unused, f separate)."""
    import tensorflow as tf

    rng = np.random.default_rng(41)
    f, h0, *given = _problem(shape, seed=42)
    kernel = (0.4 * rng.standard_normal((3, 3, shape[-1], max(rows) + 1))).astype("float32")
    scale, shift = _normalization(shape[-1], 43)
    options = dict(dt=0.2, dx=1.0, dy=1.0, boundary=boundary)
    weights = _weights_like([f, np.zeros(shape[-1]), np.zeros(shape[-1])], 44)

    def run(through_conv):
        @tf.function
        def compute(f, h0, kernel, scale, shift, *given):
            maps, mean, variance, initial = fused_solver.depthwise_maps(h0, kernel,
                                                                        statistics=True)
            source = initial if shared else f
            d_x, d_y, u, v = (maps[r] if r >= 0 else given[m] for m, r in enumerate(rows))
            # Normalised with the maps' own statistics, as the layer does.
            scale = scale * tf.math.rsqrt(tf.reduce_mean(variance) + 1.0)
            shift = shift - 0.1 * tf.reduce_mean(mean)
            return fused_solver.solve(
                source, initial, (d_x, d_y), (u, v), steps, rectify=True,
                normalization=(scale, shift), statistics=True,
                depthwise=(kernel, rows) if through_conv else None, **options)
        return _gradients(compute, [f, h0, kernel, scale, shift, *given], weights)

    names = ["H^K", "mean", "variance", "f", "H^0", "kernel", "scale", "shift",
             "D_x", "D_y", "u", "v"]
    for name, row, actual, expected in zip(names, [-1] * 8 + rows, run(True), run(False)):
        if name == "f" and shared or row >= 0:  # (not used: f is H^0, or the map is)
            assert actual is None and expected is None
            continue
        error = _max_relative_error(actual, expected)
        assert error <= 1e-5, f"{name}: max relative error {error:.2e}"


def _normalization(channels, seed):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.3, 1.5, (4, channels)).astype("float32"),
            (0.4 * rng.standard_normal((4, channels))).astype("float32"))


@tensorflow_only
@both_widths
@pytest.mark.usefixtures("restore_path")
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 5, 1, 2), (1, 4, 6, 11), (2, 4, 5, 16)])
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_normalised_maps_and_solution_statistics_match_the_reference(boundary, steps, shape):
    """The solver with `normalization` (maps ReLU(map * scale + shift)) and
    H^K's statistics, forward and every gradient (scale and shift included),
    against the keras.ops solver given the normalised maps and tf.nn.moments."""
    import tensorflow as tf

    f, h0, *maps = _problem(shape, seed=14)
    maps = [m - 0.4 for m in maps]  # some below zero: the ReLU clamps them
    scale, shift = _normalization(shape[-1], 15)
    options = dict(dt=0.2, dx=1.0, dy=1.0, boundary=boundary)
    weights = _weights_like([f, np.zeros(shape[-1]), np.zeros(shape[-1])], 16)

    def compiled(f, h0, d_x, d_y, u, v, scale, shift):
        os.environ[fused_solver.ENVIRONMENT_VARIABLE] = "compiled"
        return fused_solver.solve(f, h0, (d_x, d_y), (u, v), steps, rectify=True,
                                  normalization=(scale, shift), statistics=True, **options)

    def reference(f, h0, d_x, d_y, u, v, scale, shift):
        os.environ[fused_solver.ENVIRONMENT_VARIABLE] = "reference"
        d_x, d_y, u, v = (tf.nn.relu(m * scale[i] + shift[i])
                          for i, m in enumerate((d_x, d_y, u, v)))
        solution = solver.solve_advection_diffusion(f, h0, (d_x, d_y), (u, v), steps, **options)
        return [solution, *tf.nn.moments(solution, axes=(0, 1, 2))]

    arrays = [f, h0, *maps, scale, shift]
    names = ["H^K", "mean", "variance", "f", "H^0", "D_x", "D_y", "u", "v", "scale", "shift"]
    for name, actual, expected in zip(names, _gradients(compiled, arrays, weights),
                                      _gradients(reference, arrays, weights)):
        error = _max_relative_error(actual, expected)
        assert error <= 1e-5, f"{name}: max relative error {error:.2e}"


@tensorflow_only
@both_widths
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 4, 6, 11), (2, 3, 4, 16)])
def test_normalize_relu_matches_tensorflow(shape):
    import tensorflow as tf

    rng = np.random.default_rng(17)
    x = rng.standard_normal(shape).astype("float32")
    scale, shift = (a[0] for a in _normalization(shape[-1], 18))
    expected = np.maximum(x * scale + shift, 0.0)
    np.testing.assert_allclose(fused_solver.normalize_relu(x, scale, shift), expected,
                               rtol=1e-6, atol=1e-6)
    weights = _weights_like([x], 19)
    compiled = _gradients(lambda *a: [fused_solver.normalize_relu(*a)], [x, scale, shift], weights)
    reference = _gradients(lambda x, s, b: [tf.nn.relu(x * s + b)], [x, scale, shift], weights)
    for actual, wanted in zip(compiled, reference):
        assert _max_relative_error(actual, wanted) <= 1e-5


@tensorflow_only
@pytest.mark.parametrize("training", [True, False])
def test_normalization_is_what_batch_normalization_computes(training):
    """`normalization` of Keras BatchNormalization layers as (scale, shift):
    the same output as the layers, and in training the same moving averages."""
    import tensorflow as tf

    rng = np.random.default_rng(20)
    x = (2.0 * rng.standard_normal((2, 5, 6, 3)) + 1.0).astype("float32")
    norms, copies = [], []
    for epsilon in (1e-3, 3.0):
        for target in (norms, copies):
            norm = keras.layers.BatchNormalization(epsilon=epsilon, momentum=0.8)
            norm.build(x.shape)
            target.append(norm)
        for weight, value in zip(norms[-1].weights, (1.5, -0.2, 0.3, 2.0)):
            weight.assign(np.full(3, value, "float32") + rng.uniform(0, 0.1, 3).astype("float32"))
        for weight, copy in zip(norms[-1].weights, copies[-1].weights):
            copy.assign(weight)
    mean, variance = tf.nn.moments(tf.constant(x), axes=(0, 1, 2))
    statistics = (tf.stack([mean] * 2), tf.stack([variance] * 2)) if training else None
    scale, shift = fused_solver.normalization(norms, statistics)
    for k, (norm, copy) in enumerate(zip(norms, copies)):
        expected = copy(x, training=training)
        np.testing.assert_allclose(x * scale[k] + shift[k], expected, rtol=1e-5, atol=1e-5)
        for actual, wanted in zip(norm.non_trainable_weights, copy.non_trainable_weights):
            np.testing.assert_allclose(actual, wanted, rtol=1e-6)


@tensorflow_only
def test_kernels_reject_mismatched_shapes():
    import tensorflow as tf

    library = fused_solver.library()
    x = tf.zeros((1, 4, 5, 3))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"input 6 has shape \[4,2\], "
                                                              r"expected \[4,3\]"):
        library.pde_keras_solve(x, x, x, x, x, x, tf.ones((4, 2)), tf.zeros((4, 3)), [],
                                steps=1, dt=0.2, dx=1.0, dy=1.0, boundary="periodic")
    solve = dict(dt=0.2, dx=1.0, dy=1.0, boundary="periodic", steps=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="depthwise names kernel map 0 twice"):
        library.pde_keras_solve(x, x, x, x, x, x, tf.ones((4, 3)), tf.zeros((4, 3)),
                                [tf.zeros((3, 3, 3, 2))], depthwise=[0, 0, -1, -1], **solve)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="depthwise maps need exactly one kernel, other maps none"):
        library.pde_keras_solve(x, x, x, x, x, x, tf.ones((4, 3)), tf.zeros((4, 3)), [],
                                depthwise=[0, 1, -1, -1], **solve)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"depthwise names kernel map 2 of 2"):
        library.pde_keras_solve(x, x, x, x, x, x, tf.ones((4, 3)), tf.zeros((4, 3)),
                                [tf.zeros((3, 3, 3, 2))], depthwise=[0, 2, -1, -1], **solve)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"kernel must be shaped \(3, 3, 3, maps\), got \[3,3,2,2\]"):
        library.pde_keras_solve(x, x, x, x, x, x, tf.ones((4, 3)), tf.zeros((4, 3)),
                                [tf.zeros((3, 3, 2, 2))], depthwise=[0, 1, -1, -1], **solve)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"input 1 has shape \[2\], expected one value per channel of "
                             r"\[1,4,5,3\]"):
        library.pde_keras_normalize_relu(x, tf.ones((2,)), tf.zeros((3,)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="2 epsilons for 1 norms"):
        library.pde_keras_normalization([tf.ones(3)], [tf.ones(3)], [tf.ones(3)], [tf.ones(3)],
                                        epsilon=[1e-3, 1e-3], rows=[0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="statistics and their gradients"):
        library.pde_keras_depthwise_maps_grad(x, tf.zeros((3, 3, 3, 2)), tf.zeros((2, 2)),
                                              [x, x], tf.zeros((2, 3)), tf.zeros((2, 3)), [])
    statistics = tf.zeros((2, 3))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"every map's gradient must be shaped like the input \(or empty"):
        library.pde_keras_depthwise_maps_grad(x, tf.zeros((3, 3, 3, 2)), statistics,
                                              [x, x[:1, :1]], statistics, statistics, [])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="the addend must be shaped like the input"):
        library.pde_keras_depthwise_maps_grad(x, tf.zeros((3, 3, 3, 2)), statistics,
                                              [x, x], statistics, statistics, [x[:1, :1]])


@tensorflow_only
def test_normalization_kernel_gradients_match_tensorflow():
    """d(scale, shift)/d(gamma, beta, mean, variance) of the kernel, identity rows
    and a norm used twice included, against TensorFlow's autodiff of the formula."""
    import tensorflow as tf

    rng = np.random.default_rng(21)
    values = [rng.uniform(0.5, 2.0, (2, 3)).astype("float32") for _ in range(4)]
    epsilon, rows = [1e-3, 3.0], [1, -1, 0, 1]
    weights = _weights_like([np.zeros((4, 3))] * 2, 22)

    def compiled(gamma, beta, mean, variance):
        return fused_solver.library().pde_keras_normalization(
            tf.unstack(gamma), tf.unstack(beta), tf.unstack(mean), tf.unstack(variance),
            epsilon=epsilon, rows=rows)

    def reference(gamma, beta, mean, variance):
        scale = gamma * tf.math.rsqrt(variance + tf.constant(epsilon)[:, None])
        shift = beta - mean * scale
        pick = lambda value, identity: tf.stack(  # noqa: E731
            [value[row] if row >= 0 else tf.fill((3,), identity) for row in rows])
        return [pick(scale, 1.0), pick(shift, 0.0)]

    for actual, expected in zip(_gradients(compiled, values, weights),
                                _gradients(reference, values, weights)):
        assert _max_relative_error(actual, expected) <= 1e-5


@tensorflow_only
@both_widths
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 5, 1, 2), (1, 4, 6, 11), (1, 4, 3, 32)])
@pytest.mark.parametrize("steps, boundary", [(1, "periodic"), (2, "neumann"), (5, "dirichlet")])
@pytest.mark.parametrize("shared", [True, False])
def test_global_inference_is_the_three_op_path(shared, steps, boundary, shape):
    """The one-op inference layer against depthwise_maps -> solve -> normalize_relu,
    forward and every gradient."""
    rng = np.random.default_rng(23)
    channels = shape[-1]
    initial = rng.standard_normal(shape).astype("float32")
    source = initial if shared else rng.standard_normal(shape).astype("float32")
    kernel = (0.5 * rng.standard_normal((3, 3, channels, 4))).astype("float32")
    scale = rng.uniform(0.3, 1.5, (5, channels)).astype("float32")
    shift = (0.3 * rng.standard_normal((5, channels))).astype("float32")
    maps = [2, 0, 3, 1]  # the kernel's maps for D_x, D_y, u, v
    options = dict(steps=steps, dt=0.2, dx=1.0, dy=0.5, boundary=boundary)
    weights = _weights_like([initial], 24)

    def one_op(*arrays):
        source, initial = (arrays[0], arrays[0]) if shared else arrays[:2]
        kernel, scale, shift = arrays[-3:]
        return [fused_solver.global_inference(source, initial, kernel, maps, (scale, shift),
                                              **options)]

    def three_ops(*arrays):
        source, initial = (arrays[0], arrays[0]) if shared else arrays[:2]
        kernel, scale, shift = arrays[-3:]
        computed = fused_solver.depthwise_maps(initial, kernel)
        d_x, d_y, u, v = (computed[k] for k in maps)
        solution = fused_solver.solve(source, initial, (d_x, d_y), (u, v), rectify=True,
                                      normalization=(scale[:4], shift[:4]), **options)
        return [fused_solver.normalize_relu(solution, scale[4], shift[4])]

    arrays = ([] if shared else [source]) + [initial, kernel, scale, shift]
    for actual, expected in zip(_gradients(one_op, arrays, weights),
                                _gradients(three_ops, arrays, weights)):
        assert _max_relative_error(actual, expected) <= 1e-5


@tensorflow_only
@pytest.mark.usefixtures("restore_path")
def test_layer_runs_inference_as_one_op_and_still_shows_its_maps():
    import tensorflow as tf

    os.environ[fused_solver.ENVIRONMENT_VARIABLE] = "compiled"
    x = np.random.default_rng(25).standard_normal((2, 6, 5, 3)).astype("float32")
    layer = pde_keras.GlobalLayer(steps=2)
    layer.build(x.shape)
    for training in (False, True):
        graph = tf.function(lambda x: layer(x, training=training)).get_concrete_function(
            tf.constant(x)).graph
        kernels = {op.type for op in graph.get_operations() if op.type.startswith("PdeKeras")}
        assert ("PdeKerasGlobalInference" in kernels) == (not training), kernels
    maps = layer.coefficient_maps(x)
    np.testing.assert_allclose(maps["output"], layer(x), rtol=1e-6, atol=1e-6)
    os.environ[fused_solver.ENVIRONMENT_VARIABLE] = "reference"
    for name, value in layer.coefficient_maps(x).items():
        np.testing.assert_allclose(maps[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


@tensorflow_only
@pytest.mark.usefixtures("restore_path")
def test_a_frozen_batch_norm_is_honoured_on_the_compiled_path():
    """A coefficient norm set `trainable=False` normalises with its moving
    averages in training and leaves them, as Keras does: the compiled path
    then runs that layer unfused, and both paths agree."""
    x = np.random.default_rng(26).standard_normal((2, 6, 5, 3)).astype("float32")
    results = {}
    for path in ("compiled", "reference"):
        os.environ[fused_solver.ENVIRONMENT_VARIABLE] = path
        keras.utils.set_random_seed(4)
        layer = pde_keras.GlobalLayer(steps=2)
        layer.build(x.shape)
        frozen = layer.branches["u"][0]
        frozen.moving_mean.assign(np.full(3, 0.2, "float32"))
        frozen.trainable = False
        output = layer(x, training=True)
        results[path] = [output] + [w.numpy() for w in layer.non_trainable_weights]
        np.testing.assert_array_equal(frozen.moving_mean, np.full(3, 0.2, "float32"))
    for actual, expected in zip(*results.values()):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
