"""The discretised advection-diffusion solver of the Global layer.

This module is the only home of the finite-difference stencil: the layer,
the coefficient maps and the Perona-Malik Sobel filter all take their
neighbours from :func:`neighbours`.
"""

import contextlib
import contextvars
import functools

import keras
from keras import ops

from pde_keras import fused_solver, validation

BOUNDARIES = ("periodic", "neumann", "dirichlet")

# Feature maps are NHWC: x is the height axis, y the width axis.
X_AXIS = 1
Y_AXIS = 2


# Set by `builtin_ops_only()`; read when a graph is traced.
_BUILTIN_OPS_ONLY = contextvars.ContextVar("builtin_ops_only", default=False)


@contextlib.contextmanager
def builtin_ops_only():
    """Within it, the solver is traced from ops every runtime has built in.

    Exporters trace models inside it (`pde_keras.export`): periodic neighbours
    become slices + concatenation instead of TensorFlow's `Roll`, which the
    TFLite runtime lacks (only its Select-ops runtime has it). Training and
    inference keep `Roll` (one kernel each way). The context is read at trace
    time: a function traced before entering it keeps what it traced. It is
    the one switch exporters set: any solver path that would put a custom
    operator in the graph must fall back to the plain ops under it (export
    never uses a custom op).
    """
    token = _BUILTIN_OPS_ONLY.set(True)
    try:
        yield
    finally:
        _BUILTIN_OPS_ONLY.reset(token)


def builtin_ops_required():
    """Whether the graph being traced must use built-in ops only (`builtin_ops_only`)."""
    return _BUILTIN_OPS_ONLY.get()


def _along(axis, index, rank=4):
    key = [slice(None)] * rank
    key[axis] = index
    return tuple(key)


def neighbours(field, axis, boundary="periodic"):
    """Returns the fields of the next and the previous cell along `axis`.

    `next[i] = field[i + 1]` and `previous[i] = field[i - 1]`, with the ghost
    cell beyond each edge given by `boundary`: `periodic` wraps around,
    `neumann` repeats the edge value (zero flux), `dirichlet` is zero.

    Args:
        field: rank-4 NHWC tensor.
        axis: 1 (x, height) or 2 (y, width).
        boundary: one of `BOUNDARIES`.

    Returns:
        `(next, previous)`, each shaped like `field`.
    """
    boundary = validation.check_choice("boundary", boundary, BOUNDARIES)
    if boundary == "periodic" and not _BUILTIN_OPS_ONLY.get():
        # One kernel each way (TensorFlow's roll), not slice + concatenate.
        return ops.roll(field, -1, axis=axis), ops.roll(field, 1, axis=axis)
    first = field[_along(axis, slice(0, 1))]
    last = field[_along(axis, slice(-1, None))]
    if boundary == "periodic":  # Under builtin_ops_only(): the wrap-around as slices.
        after_last, before_first = first, last
    elif boundary == "neumann":
        after_last, before_first = last, first
    else:
        after_last = before_first = ops.zeros_like(first)
    following = ops.concatenate([field[_along(axis, slice(1, None))], after_last], axis=axis)
    preceding = ops.concatenate([before_first, field[_along(axis, slice(None, -1))]], axis=axis)
    return following, preceding


def central_difference(field, axis, spacing=1.0, boundary="periodic"):
    """`(field[i + 1] - field[i - 1]) / (2 * spacing)` along `axis`."""
    following, preceding = neighbours(field, axis, boundary)
    return (following - preceding) * (0.5 / spacing)


def sobel_gradient_squared(field, boundary="periodic"):
    """|grad field|^2 from the 3x3 Sobel filters (unnormalised), per channel.

    G_x = [1, 2, 1]^T (along y) smoothing of the central difference
    `field[x + 1] - field[x - 1]`, G_y likewise with the axes swapped; the
    ghost cells come from `boundary` (see :func:`neighbours`).

    Args:
        field: rank-4 NHWC tensor.
        boundary: one of `BOUNDARIES`.

    Returns:
        `G_x^2 + G_y^2`, shaped like `field`.
    """
    def smooth(values, axis):
        following, preceding = neighbours(values, axis, boundary)
        return preceding + 2.0 * values + following

    g_x = central_difference(smooth(field, Y_AXIS), X_AXIS, 0.5, boundary)
    g_y = central_difference(smooth(field, X_AXIS), Y_AXIS, 0.5, boundary)
    return g_x * g_x + g_y * g_y


def perona_malik_diffusivity(field, lam=2.0, boundary="periodic"):
    """The isotropic Perona-Malik diffusivity D = 1 / (1 + |grad field|^2 / lam^2).

    |grad field| comes from the 3x3 Sobel filters
    (:func:`sobel_gradient_squared`), so D is small at edges and near 1 in
    flat regions.

    Args:
        field: rank-4 NHWC float tensor (H^0).
        lam: the contrast parameter lambda (positive).
        boundary: one of `BOUNDARIES`.

    Returns:
        D, shaped like `field`.

    Reference:
        P. Perona and J. Malik, "Scale-space and edge detection using
        anisotropic diffusion", IEEE TPAMI 12(7), 1990.
    """
    lam = validation.check_float("perona_malik_lambda", lam, positive=True)
    return 1.0 / (1.0 + sobel_gradient_squared(field, boundary) / lam**2)


def _check_pair(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise validation.invalid(name, "a pair of tensors or scalars", type(value).__name__)
    return value


def broadcast_like(value, like):
    """A coefficient as a full map: `value` broadcast to the shape and dtype of `like`.

    Needed before differencing: a velocity given as a scalar or a per-channel
    tensor still has ghost cells (zero under `dirichlet`) at the edges. The
    layers' `coefficient_maps` also fill in constant coefficients with it.

    Args:
        value: a python number or a tensor that broadcasts to `like`'s
            shape (e.g. per channel, `(channels,)`).
        like: the tensor whose shape and dtype the result takes.

    Returns:
        `value` cast to `like.dtype`, broadcast by `zeros_like(like) + value`
        unless it already has `like`'s (fully known) shape.
    """
    value = ops.cast(value, like.dtype)
    if tuple(value.shape) == tuple(like.shape) and None not in tuple(like.shape):
        return value
    return ops.zeros_like(like) + value


def stencil_coefficients(diffusivity, velocity, like, dt=0.2, dx=1.0, dy=1.0,
                         boundary="periodic"):
    """The per-cell coefficients of one step of eq. 2, divided through by L.

    Returns a dict with `previous` (M / L), `centre` (-2 (u_x + v_y) dt / L),
    `x_next` ((-A_x + 2 B_x) / L), `x_previous`, `y_next`, `y_previous`,
    `source` (2 dt / L), and the velocity derivatives `ux`, `vy`.
    """
    d_x, d_y = diffusivity
    u, v = broadcast_like(velocity[0], like), broadcast_like(velocity[1], like)
    d_x, d_y = ops.cast(d_x, like.dtype), ops.cast(d_y, like.dtype)
    ux = central_difference(u, X_AXIS, dx, boundary)
    vy = central_difference(v, Y_AXIS, dy, boundary)
    a_x, a_y = u * (dt / dx), v * (dt / dy)
    two_b_x, two_b_y = d_x * (2.0 * dt / dx**2), d_y * (2.0 * dt / dy**2)
    inv_l = 1.0 / (1.0 + two_b_x + two_b_y)
    return {
        "previous": (1.0 - two_b_x - two_b_y) * inv_l,
        "centre": (ux + vy) * (-2.0 * dt) * inv_l,
        "x_next": (two_b_x - a_x) * inv_l,
        "x_previous": (two_b_x + a_x) * inv_l,
        "y_next": (two_b_y - a_y) * inv_l,
        "y_previous": (two_b_y + a_y) * inv_l,
        "source": (2.0 * dt) * inv_l,
        "ux": ux,
        "vy": vy,
    }


def solve_advection_diffusion(source, initial, diffusivity, velocity, steps,
                              dt=0.2, dx=1.0, dy=1.0, boundary="periodic",
                              rectify_coefficients=False):
    """Runs `steps` steps of the discretised advection-diffusion equation.

    Solves eq. 2 of Kag & Saligrama (2022) on NHWC feature maps, every
    channel independently (x is the height axis 1, y the width axis 2):

        L H^{k+1} = M H^{k-1} - 2 (u_x + v_y) dt H^k + 2 dt f
                    + (-A_x + 2 B_x) H^k_{x+1} + (A_x + 2 B_x) H^k_{x-1}
                    + (-A_y + 2 B_y) H^k_{y+1} + (A_y + 2 B_y) H^k_{y-1}

    with L = 1 + 2 B_x + 2 B_y, M = 1 - 2 B_x - 2 B_y, A_x = u dt / dx,
    A_y = v dt / dy, B_x = D_x dt / dx^2, B_y = D_y dt / dy^2 and central
    differences u_x, v_y. H^{-1} = f (the source), H^0 = `initial`.

    Args:
        source: rank-4 NHWC float tensor, the source f and H^{-1}.
        initial: tensor shaped like `source`, H^0.
        diffusivity: pair `(D_x, D_y)`, each a tensor or scalar
            broadcastable to `source`.
        velocity: pair `(u, v)`, each a tensor or scalar broadcastable to
            `source`.
        steps: number of steps K (integer >= 1).
        dt: time step (positive).
        dx: grid spacing along x (positive).
        dy: grid spacing along y (positive).
        boundary: ghost-cell rule for H, u and v: `"periodic"` (wrap
            around, the reference implementation), `"neumann"` (repeat the
            edge value) or `"dirichlet"` (zero).
        rectify_coefficients: use ReLU(D_x), ReLU(D_y), ReLU(u), ReLU(v):
            the Global layer passes its maps before their ReLU, which the
            compiled kernel then applies in the same pass.

    Returns:
        H^K, shaped like `source`, in `source`'s dtype.

    Note:
        The authors' PyTorch code equals this equation with the velocity
        negated, (u, v) -> (-u, -v).

    On TensorFlow on CPU a float32 problem runs in a compiled, fused kernel
    (`pde_keras.fused_solver`) that computes the same as the keras.ops code
    here, which remains the reference and the path on JAX, for other dtypes
    and under XLA. `PDE_KERAS_SOLVER=auto|compiled|reference` (environment
    variable, read at each call) chooses the path.
    """
    steps = validation.check_positive_int("steps", steps)
    dt = validation.check_float("dt", dt, positive=True)
    dx = validation.check_float("dx", dx, positive=True)
    dy = validation.check_float("dy", dy, positive=True)
    boundary = validation.check_choice("boundary", boundary, BOUNDARIES)
    diffusivity = _check_pair("diffusivity", diffusivity)
    velocity = _check_pair("velocity", velocity)
    source = ops.convert_to_tensor(source)
    if len(source.shape) != 4:
        raise validation.invalid(
            "source", "a rank-4 tensor (batch, height, width, channels)",
            f"<tensor of shape {tuple(source.shape)}>")
    if "float" not in keras.backend.standardize_dtype(source.dtype):
        source = ops.cast(source, "float32")
    initial = ops.cast(ops.convert_to_tensor(initial), source.dtype)
    if tuple(initial.shape) != tuple(source.shape):
        raise validation.invalid(
            "initial", f"a tensor shaped like `source` {tuple(source.shape)}",
            f"<tensor of shape {tuple(initial.shape)}>")

    if fused_solver.use_compiled(source.dtype):
        d_x, d_y, u, v = (broadcast_like(value, source) for value in (*diffusivity, *velocity))
        return fused_solver.solve(source, initial, (d_x, d_y), (u, v), steps,
                                  dt=dt, dx=dx, dy=dy, boundary=boundary,
                                  rectify=bool(rectify_coefficients))
    if rectify_coefficients:
        diffusivity, velocity = (tuple(_relu(value) for value in pair)
                                 for pair in (diffusivity, velocity))
    c = stencil_coefficients(diffusivity, velocity, source, dt, dx, dy, boundary)
    constants = (c["source"] * source,) + tuple(c[name] for name in _STEP_COEFFICIENTS)
    step = _step_function(boundary)
    if steps == 1:  # the authors' CIFAR setting: no loop to pay for
        return step(None, (source, initial, constants))[1]
    # A loop rather than unrolled steps: under XLA, unrolled steps fuse into
    # one kernel that recomputes neighbours of neighbours (5^K work); a loop
    # keeps each H^k materialised. JAX differentiates fori_loop (a scan);
    # TensorFlow's XLA needs the bounded while_loop.
    if keras.backend.backend() == "tensorflow":
        return ops.while_loop(lambda *state: True, lambda *state: step(None, state),
                              (source, initial, constants), maximum_iterations=steps)[1]
    return ops.fori_loop(0, steps, step, (source, initial, constants))[1]


def _relu(value):
    if isinstance(value, (int, float)):
        return max(float(value), 0.0)
    return ops.relu(value)


_STEP_COEFFICIENTS = ("previous", "centre", "x_next", "x_previous", "y_next", "y_previous")


@functools.lru_cache(maxsize=None)
def _step_function(boundary):
    """One step of eq. 2 as a loop body, one function per boundary.

    The same function object serves every call, so JAX's loop tracing cache
    hits instead of re-compiling the loop for each new closure.
    """

    def step(_, state):
        previous, current, constants = state
        driven, c_previous, c_centre, c_x_next, c_x_previous, c_y_next, c_y_previous = constants
        x_next, x_previous = neighbours(current, X_AXIS, boundary)
        y_next, y_previous = neighbours(current, Y_AXIS, boundary)
        following = (
            c_previous * previous + driven + c_centre * current
            + c_x_next * x_next + c_x_previous * x_previous
            + c_y_next * y_next + c_y_previous * y_previous
        )
        return current, following, constants

    return step
