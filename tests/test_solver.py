"""Tests of the discretised advection-diffusion solver of the Global layer.

The reference below is written from the equation only (not from the solver):
a float64, cell-by-cell loop whose ghost cells come from explicit index rules,
and, for the neighbour helpers, explicit ghost-cell padding with ``np.pad``.

    L H^{k+1} = M H^{k-1} - 2 (u_x + v_y) dt H^k + 2 dt f
                + (-A_x + 2B_x) H^k_{x+1} + (A_x + 2B_x) H^k_{x-1}
                + (-A_y + 2B_y) H^k_{y+1} + (A_y + 2B_y) H^k_{y-1}

with L = 1 + 2B_x + 2B_y, M = 1 - 2B_x - 2B_y, A_x = u dt/dx, A_y = v dt/dy,
B_x = D_x dt/dx^2, B_y = D_y dt/dy^2, u_x = (u_{x+1} - u_{x-1}) / (2 dx),
v_y = (v_{y+1} - v_{y-1}) / (2 dy), H^{-1} = f, H^0 = initial.
NHWC: x is axis 1 (height), y is axis 2 (width).
"""

import math
import re

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
pytestmark = [pytest.mark.multibackend, pytest.mark.usefixtures("both_solver_paths")]

import numpy_reference as ref  # noqa: E402
import pde_keras  # noqa: E402
from pde_keras import solver  # noqa: E402


@pytest.fixture(autouse=True)
def _float64_under_jax():
    """float64 tensors need x64 mode under JAX (dtype and gradient tests);
    scoped to this module's tests so other modules keep JAX's defaults."""
    if BACKEND != "jax":
        yield
        return
    import jax

    with jax.enable_x64(True):
        yield

solve = solver.solve_advection_diffusion

BOUNDARIES = ("periodic", "neumann", "dirichlet")
SHAPE = (2, 7, 9, 3)  # non-square on purpose: catches x/y mix-ups


# ---------------------------------------------------------------------------
# Independent NumPy reference
# ---------------------------------------------------------------------------


reference_solve = ref.solve


def reference_neighbours(field, axis, boundary):
    """(next, previous) along `axis` from an explicitly ghost-padded copy."""
    return ref.shift(field, axis, +1, boundary), ref.shift(field, axis, -1, boundary)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def random_problem(seed, shape=SHAPE, dtype=np.float32):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal(shape).astype(dtype)
    h0 = rng.standard_normal(shape).astype(dtype)
    d_x, d_y, u, v = (rng.uniform(0.0, 1.0, shape).astype(dtype) for _ in range(4))
    return f, h0, (d_x, d_y), (u, v)


def assert_matches_reference(actual, expected, rtol=1e-4):
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual))
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    max_rel = float(np.max(np.abs(actual - expected))) / scale
    assert max_rel <= rtol, f"max relative error {max_rel:.3e} > {rtol:g}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-5 * scale)


def test_reference_sanity():
    """The reference itself: a zero-coefficient step is H^1 = H^{-1} + 2 dt f."""
    f, h0, _, _ = random_problem(0, shape=(1, 3, 4, 1))
    zeros = np.zeros_like(f)
    out = reference_solve(f, h0, (zeros, zeros), (zeros, zeros), 1, dt=0.2)
    np.testing.assert_allclose(out, f + 0.4 * f)
    # Pure diffusion of a constant field, f = H^{-1} = 0, H^0 = 1.
    ones = np.ones((1, 3, 4, 1))
    out = reference_solve(0 * ones, ones, (0.5 * ones, 0.5 * ones),
                          (0 * ones, 0 * ones), 1, dt=0.2)
    # B = 0.1 each way: L H1 = M * 0 + 4 * (2B) * 1  ->  H1 = 0.8 / 1.4
    np.testing.assert_allclose(out, 0.8 / 1.4 * ones)


def test_top_level_export():
    assert pde_keras.solve_advection_diffusion is solver.solve_advection_diffusion


# ---------------------------------------------------------------------------
# 1. Reference vs solver
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_matches_reference(boundary, steps):
    f, h0, diffusivity, velocity = random_problem(1)
    out = solve(f, h0, diffusivity, velocity, steps, boundary=boundary)
    expected = reference_solve(f, h0, diffusivity, velocity, steps,
                               boundary=boundary)
    assert_matches_reference(to_numpy(out), expected)


# ---------------------------------------------------------------------------
# 2. Scalar and broadcast coefficients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_python_scalar_coefficients(boundary):
    f, h0, _, _ = random_problem(2)
    values = dict(d_x=0.3, d_y=0.7, u=0.5, v=-0.25)
    full = {k: np.full(SHAPE, val, np.float32) for k, val in values.items()}
    scalar_out = solve(f, h0, (values["d_x"], values["d_y"]),
                       (values["u"], values["v"]), 3, boundary=boundary)
    full_out = solve(f, h0, (full["d_x"], full["d_y"]),
                     (full["u"], full["v"]), 3, boundary=boundary)
    np.testing.assert_allclose(to_numpy(scalar_out), to_numpy(full_out),
                               rtol=1e-5, atol=1e-6)
    expected = reference_solve(f, h0, (full["d_x"], full["d_y"]),
                               (full["u"], full["v"]), 3, boundary=boundary)
    assert_matches_reference(to_numpy(scalar_out), expected)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_per_channel_broadcast_coefficients(boundary):
    f, h0, _, _ = random_problem(3)
    rng = np.random.default_rng(33)
    channels = SHAPE[-1]
    small = [rng.uniform(0.1, 1.0, (1, 1, 1, channels)).astype(np.float32)
             for _ in range(4)]
    full = [np.broadcast_to(a, SHAPE).copy() for a in small]
    broadcast_out = solve(f, h0, (small[0], small[1]), (small[2], small[3]), 3,
                          boundary=boundary)
    full_out = solve(f, h0, (full[0], full[1]), (full[2], full[3]), 3,
                     boundary=boundary)
    np.testing.assert_allclose(to_numpy(broadcast_out), to_numpy(full_out),
                               rtol=1e-5, atol=1e-6)
    expected = reference_solve(f, h0, (full[0], full[1]), (full[2], full[3]), 3,
                               boundary=boundary)
    assert_matches_reference(to_numpy(broadcast_out), expected)


def test_dirichlet_constant_velocity_has_edge_divergence():
    """A constant non-zero u under dirichlet has u_x != 0 at the x edges."""
    shape = (1, 5, 4, 1)
    f = np.zeros(shape, np.float32)
    h0 = np.ones(shape, np.float32)
    out = to_numpy(solve(f, h0, (0.0, 0.0), (1.0, 0.0), 1, boundary="dirichlet"))
    expected = reference_solve(f, h0, (0.0, 0.0), (1.0, 0.0), 1,
                               boundary="dirichlet")
    assert_matches_reference(out, expected)
    periodic = to_numpy(solve(f, h0, (0.0, 0.0), (1.0, 0.0), 1,
                              boundary="periodic"))
    # Interior rows agree with periodic; the edge rows do not.
    np.testing.assert_allclose(out[:, 1:-1], periodic[:, 1:-1], rtol=1e-6)
    assert not np.allclose(out[:, 0], periodic[:, 0])
    assert not np.allclose(out[:, -1], periodic[:, -1])


# ---------------------------------------------------------------------------
# 3. Non-default dt, dx, dy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_non_default_spacing(boundary):
    f, h0, diffusivity, velocity = random_problem(4)
    kwargs = dict(dt=0.1, dx=0.5, dy=2.0, boundary=boundary)
    out = solve(f, h0, diffusivity, velocity, 4, **kwargs)
    expected = reference_solve(f, h0, diffusivity, velocity, 4, **kwargs)
    assert_matches_reference(to_numpy(out), expected)
    # The spacings matter (guards against them being silently ignored).
    default = to_numpy(solve(f, h0, diffusivity, velocity, 4, boundary=boundary))
    assert not np.allclose(default, expected, rtol=1e-3)


# ---------------------------------------------------------------------------
# 4. Channel independence
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_channels_are_independent(boundary):
    f, h0, (d_x, d_y), (u, v) = random_problem(5)
    together = to_numpy(solve(f, h0, (d_x, d_y), (u, v), 3, boundary=boundary))
    alone = []
    for c in range(SHAPE[-1]):
        s = slice(c, c + 1)
        alone.append(to_numpy(solve(
            f[..., s], h0[..., s], (d_x[..., s], d_y[..., s]),
            (u[..., s], v[..., s]), 3, boundary=boundary)))
    np.testing.assert_allclose(together, np.concatenate(alone, axis=-1),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# 5. Translation equivariance
# ---------------------------------------------------------------------------


def _roll(a):
    return np.roll(a, shift=(2, 3), axis=(1, 2))


def _solve_rolled(boundary, seed=6):
    f, h0, (d_x, d_y), (u, v) = random_problem(seed)
    out = to_numpy(solve(f, h0, (d_x, d_y), (u, v), 4, boundary=boundary))
    rolled = to_numpy(solve(_roll(f), _roll(h0), (_roll(d_x), _roll(d_y)),
                            (_roll(u), _roll(v)), 4, boundary=boundary))
    return out, rolled


def test_periodic_translation_equivariance():
    out, rolled = _solve_rolled("periodic")
    np.testing.assert_allclose(rolled, _roll(out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("boundary", ["neumann", "dirichlet"])
def test_non_periodic_is_not_translation_equivariant(boundary):
    out, rolled = _solve_rolled(boundary)
    assert np.max(np.abs(rolled - _roll(out))) > 1e-2


# ---------------------------------------------------------------------------
# 6. Axis sanity: transposing the problem transposes the answer
# ---------------------------------------------------------------------------


def _transpose(a):
    return np.ascontiguousarray(np.transpose(a, (0, 2, 1, 3)))


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_transposed_pure_advection(boundary):
    """u != 0, v = 0, D = 0: swapping H/W and u/v transposes the output."""
    f, h0, _, (u, _) = random_problem(7)
    zeros = np.zeros_like(f)
    out = to_numpy(solve(f, h0, (zeros, zeros), (u, zeros), 4,
                         boundary=boundary))
    expected = reference_solve(f, h0, (zeros, zeros), (u, zeros), 4,
                               boundary=boundary)
    assert_matches_reference(out, expected)
    zeros_t = _transpose(zeros)
    out_t = to_numpy(solve(_transpose(f), _transpose(h0), (zeros_t, zeros_t),
                           (zeros_t, _transpose(u)), 4, boundary=boundary))
    np.testing.assert_allclose(out_t, _transpose(out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_transposed_general_problem(boundary):
    """All coefficients, anisotropic spacing: swap everything x <-> y."""
    f, h0, (d_x, d_y), (u, v) = random_problem(8)
    out = to_numpy(solve(f, h0, (d_x, d_y), (u, v), 3, dx=0.7, dy=1.3,
                         boundary=boundary))
    t = _transpose
    out_t = to_numpy(solve(t(f), t(h0), (t(d_y), t(d_x)), (t(v), t(u)), 3,
                           dx=1.3, dy=0.7, boundary=boundary))
    np.testing.assert_allclose(out_t, t(out), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# 7. neighbours() and central_difference()
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_neighbours(boundary, axis):
    field = np.random.default_rng(9).standard_normal(SHAPE).astype(np.float32)
    following, preceding = solver.neighbours(field, axis, boundary)
    expected_next, expected_previous = reference_neighbours(field, axis, boundary)
    np.testing.assert_array_equal(to_numpy(following), expected_next)
    np.testing.assert_array_equal(to_numpy(preceding), expected_previous)
    if boundary == "periodic":
        np.testing.assert_array_equal(to_numpy(following),
                                      np.roll(field, -1, axis=axis))
        np.testing.assert_array_equal(to_numpy(preceding),
                                      np.roll(field, 1, axis=axis))


def test_neighbours_explicit_small_case():
    field = np.arange(1.0, 4.0, dtype=np.float32).reshape(1, 3, 1, 1)
    cases = {
        "periodic": ([2, 3, 1], [3, 1, 2]),
        "neumann": ([2, 3, 3], [1, 1, 2]),
        "dirichlet": ([2, 3, 0], [0, 1, 2]),
    }
    for boundary, (nxt, prv) in cases.items():
        following, preceding = solver.neighbours(field, 1, boundary)
        np.testing.assert_array_equal(to_numpy(following).ravel(), nxt)
        np.testing.assert_array_equal(to_numpy(preceding).ravel(), prv)


@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_central_difference(boundary, axis):
    field = np.random.default_rng(10).standard_normal(SHAPE).astype(np.float32)
    spacing = 0.5
    out = to_numpy(solver.central_difference(field, axis, spacing, boundary))
    forward, backward = reference_neighbours(field, axis, boundary)
    expected = (forward - backward) / (2 * spacing)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_broadcast_like_fills_in_scalars_and_per_channel_values():
    like = keras.ops.convert_to_tensor(np.ones(SHAPE, np.float32))
    np.testing.assert_array_equal(to_numpy(solver.broadcast_like(0.3, like)),
                                  np.full(SHAPE, 0.3, np.float32))
    per_channel = np.arange(SHAPE[-1], dtype=np.float64)
    full = solver.broadcast_like(per_channel, like)
    assert keras.backend.standardize_dtype(full.dtype) == "float32"
    np.testing.assert_array_equal(to_numpy(full),
                                  np.broadcast_to(per_channel, SHAPE).astype(np.float32))
    field = keras.ops.convert_to_tensor(np.random.default_rng(12).standard_normal(SHAPE),
                                        "float32")
    np.testing.assert_array_equal(to_numpy(solver.broadcast_like(field, like)), to_numpy(field))


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_perona_malik_diffusivity_matches_sobel_reference(boundary):
    import numpy_reference as ref

    field = np.random.default_rng(11).standard_normal(SHAPE).astype(np.float32)
    g_x, g_y = ref.sobel(field, boundary)
    expected = 1.0 / (1.0 + (g_x**2 + g_y**2) / 1.5**2)
    out = to_numpy(solver.perona_malik_diffusivity(field, 1.5, boundary))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=re.escape(
            "Invalid value for argument `perona_malik_lambda`: expected a positive "
            "finite number. Received: perona_malik_lambda=0")):
        solver.perona_malik_diffusivity(field, 0, boundary)


# ---------------------------------------------------------------------------
# 8. Autodiff vs finite differences (float64)
# ---------------------------------------------------------------------------


def _autodiff_gradient(loss_of):
    """Gradient of `loss_of(x)` (x a float64 numpy array) by the backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def grad(x):
            x = tf.constant(x, dtype=tf.float64)
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = loss_of(x)
            return tape.gradient(loss, x).numpy()

        return grad
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        return lambda x: np.asarray(jax.grad(loss_of)(jnp.asarray(x, jnp.float64)))
    pytest.skip(f"no autodiff check for backend {BACKEND!r}")


@pytest.mark.parametrize("wrt", ["u", "d_x"])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_gradient_matches_finite_differences(boundary, wrt):
    shape = (1, 4, 5, 1)
    rng = np.random.default_rng(11)
    f = rng.standard_normal(shape)
    h0 = rng.standard_normal(shape)
    coeffs = {k: rng.uniform(0.1, 1.0, shape) for k in ("d_x", "d_y", "u", "v")}
    weights = rng.standard_normal(shape)

    def loss_of(x):
        c = dict(coeffs)
        c[wrt] = x
        out = solve(f, h0, (c["d_x"], c["d_y"]), (c["u"], c["v"]), 2,
                    boundary=boundary)
        return keras.ops.sum(out * weights)

    point = coeffs[wrt]
    grad = _autodiff_gradient(loss_of)(point)
    assert grad.shape == shape

    eps = 1e-6
    numeric = np.zeros(shape)
    for idx in np.ndindex(*shape):
        plus, minus = point.copy(), point.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (float(to_numpy(loss_of(plus)))
                        - float(to_numpy(loss_of(minus)))) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5,
                               atol=1e-7 * np.max(np.abs(numeric)))


# ---------------------------------------------------------------------------
# 9. Bad arguments
# ---------------------------------------------------------------------------


def _valid_args():
    f, h0, diffusivity, velocity = random_problem(12, shape=(1, 4, 5, 2))
    return dict(source=f, initial=h0, diffusivity=diffusivity,
                velocity=velocity, steps=2)


def _full_match(message):
    return "^" + re.escape(message) + "$"


def test_bad_boundary():
    with pytest.raises(ValueError, match=_full_match(
            "Invalid value for argument `boundary`: expected one of "
            "'periodic', 'neumann', 'dirichlet'. Received: boundary='bogus'")):
        solve(**_valid_args(), boundary="bogus")


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps(steps):
    args = _valid_args()
    args["steps"] = steps
    with pytest.raises(ValueError, match=_full_match(
            "Invalid value for argument `steps`: expected an integer >= 1. "
            f"Received: steps={steps!r}")):
        solve(**args)


@pytest.mark.parametrize("value", [-1.0, 0, 0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["dt", "dx", "dy"])
def test_bad_spacing(name, value):
    with pytest.raises(ValueError, match=_full_match(
            f"Invalid value for argument `{name}`: expected a positive finite "
            f"number. Received: {name}={value!r}")):
        solve(**_valid_args(), **{name: value})


def test_bad_spacing_exact_message():
    with pytest.raises(ValueError) as info:
        solve(**_valid_args(), dt=-1.0)
    assert str(info.value) == (
        "Invalid value for argument `dt`: expected a positive finite number. "
        "Received: dt=-1.0")


@pytest.mark.parametrize("value, type_name", [
    (1.0, "float"),
    (None, "NoneType"),
    ((0.1, 0.2, 0.3), "tuple"),
])
@pytest.mark.parametrize("name", ["diffusivity", "velocity"])
def test_bad_pair(name, value, type_name):
    args = _valid_args()
    args[name] = value
    with pytest.raises(ValueError, match=_full_match(
            f"Invalid value for argument `{name}`: expected a pair of tensors "
            f"or scalars. Received: {name}='{type_name}'")):
        solve(**args)


def test_bad_source_rank():
    args = _valid_args()
    args["source"] = args["source"][0]
    args["initial"] = args["initial"][0]
    with pytest.raises(ValueError, match="^" + re.escape(
            "Invalid value for argument `source`: expected a rank-4 tensor "
            "(batch, height, width, channels).")):
        solve(**args)


def test_bad_initial_shape():
    args = _valid_args()
    args["initial"] = args["initial"][:, :, :-1]
    with pytest.raises(ValueError, match="^" + re.escape(
            "Invalid value for argument `initial`: expected a tensor shaped "
            "like `source`")):
        solve(**args)


# ---------------------------------------------------------------------------
# 10. Output dtype
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_output_dtype(dtype):
    f, h0, diffusivity, velocity = random_problem(13, shape=(1, 4, 5, 2),
                                                  dtype=np.dtype(dtype))
    out = solve(f, h0, diffusivity, velocity, 2)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    assert to_numpy(out).dtype == np.dtype(dtype)
    # Scalar coefficients must not promote or demote the result either.
    out = solve(f, h0, (0.3, 0.4), (0.5, 0.6), 2)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    if dtype == "float64":
        expected = reference_solve(f, h0, diffusivity, velocity, 2)
        np.testing.assert_allclose(
            to_numpy(solve(f, h0, diffusivity, velocity, 2)), expected,
            rtol=1e-10, atol=1e-12)
