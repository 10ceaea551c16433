"""A weightless layer that runs the PDE solver with a given velocity field."""

import keras
from keras import ops

from pde_keras import solver, validation

DIFFUSIVITIES = ("constant", "perona_malik")


@keras.saving.register_keras_serializable(package="pde_keras")
class AdvectionDiffusion(keras.layers.Layer):
    """K solver steps driven by a velocity field computed elsewhere.

    The PDE feature layer of the paper's MNIST illustrative example: the
    model computes a velocity map g with ordinary layers, and this layer
    runs `pde_keras.solve_advection_diffusion` with source f, H^{-1} = H^0 =
    f, velocity u = v = g and a diffusivity that is either constant
    (D_x = D_y = `diffusivity_constant`, the paper's D = 1) or the
    Perona-Malik map of f (`pde_keras.solver.perona_malik_diffusivity`,
    the report's extension). The layer has no weights.

    Args:
        diffusivity: `"constant"` (default) or `"perona_malik"`.
        diffusivity_constant: D for `diffusivity="constant"` (>= 0).
            Defaults to 1.0.
        perona_malik_lambda: lambda for `diffusivity="perona_malik"`
            (> 0). Defaults to 2.0.
        steps: number of solver steps K (integer >= 1). Defaults to 5.
        dt: time step. Defaults to 0.2.
        dx: grid spacing along x (height). Defaults to 1.0.
        dy: grid spacing along y (width). Defaults to 1.0.
        boundary: ghost-cell rule, `"periodic"` (default, the reference
            code's rolls), `"neumann"` or `"dirichlet"`.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Under a mixed-precision policy the solver runs in float32 and the
    result is cast to the compute dtype, as in `GlobalLayer`.

    Input shape:
        A list `[source, velocity]` of two 4D tensors
        `(batch, height, width, channels)` of the same shape.

    Output shape:
        H^K, shaped like `source`.

    `coefficient_maps([source, velocity])` returns the maps the solver used
    (D_x, D_y, u = v = g, u_x, v_y, H^0, H^K) for figures.

    Example:

    >>> import numpy as np, keras, pde_keras
    >>> f = keras.Input((28, 28, 1))
    >>> g = keras.layers.Conv2D(1, 3, padding="same")(f)
    >>> h = pde_keras.AdvectionDiffusion(diffusivity="perona_malik")([f, g])
    >>> tuple(keras.Model(f, h)(np.zeros((2, 28, 28, 1), "float32")).shape)
    (2, 28, 28, 1)

    Reference:
        A. Kag and V. Saligrama, "Condensing CNNs with Partial Differential
        Equations", CVPR 2022, Section 3 (MNIST illustrative example).
    """

    def __init__(self, diffusivity="constant", diffusivity_constant=1.0,
                 perona_malik_lambda=2.0, steps=5, dt=0.2, dx=1.0, dy=1.0,
                 boundary="periodic", **kwargs):
        super().__init__(**kwargs)
        self.diffusivity = validation.check_choice("diffusivity", diffusivity, DIFFUSIVITIES)
        self.diffusivity_constant = validation.check_float(
            "diffusivity_constant", diffusivity_constant, non_negative=True)
        self.perona_malik_lambda = validation.check_float(
            "perona_malik_lambda", perona_malik_lambda, positive=True)
        self.steps = validation.check_positive_int("steps", steps)
        self.dt = validation.check_float("dt", dt, positive=True)
        self.dx = validation.check_float("dx", dx, positive=True)
        self.dy = validation.check_float("dy", dy, positive=True)
        self.boundary = validation.check_choice("boundary", boundary, solver.BOUNDARIES)

    def build(self, input_shape):
        shapes = [tuple(shape) for shape in input_shape] if isinstance(input_shape, list) else None
        if shapes is None or len(shapes) != 2 or len(shapes[0]) != 4 or shapes[0] != shapes[1]:
            raise ValueError(
                "AdvectionDiffusion expects a list [source, velocity] of two rank-4 "
                f"tensors of the same shape. Received: input_shape={input_shape}")

    def _run(self, inputs):
        """Returns (source, velocity, diffusivity, solution), all float32."""
        source, velocity = (ops.cast(tensor, "float32") for tensor in inputs)
        if self.diffusivity == "perona_malik":
            diffusivity = solver.perona_malik_diffusivity(
                source, self.perona_malik_lambda, self.boundary)
        else:
            diffusivity = self.diffusivity_constant
        solution = solver.solve_advection_diffusion(
            source, source, (diffusivity, diffusivity), (velocity, velocity), self.steps,
            dt=self.dt, dx=self.dx, dy=self.dy, boundary=self.boundary)
        return source, velocity, diffusivity, solution

    def call(self, inputs):
        return ops.cast(self._run(inputs)[-1], self.compute_dtype)

    def coefficient_maps(self, inputs):
        """Returns the layer's maps for `inputs`, for inspection and figures.

        The same keys as `pde_keras.GlobalLayer.coefficient_maps`, so that
        figures can treat both layers alike.

        Args:
            inputs: `[source, velocity]`, as the layer's call, e.g. one
                image's `(1, height, width, channels)` features f and g.

        Returns:
            A dict of float32 tensors shaped like `source`: `"Dx"`, `"Dy"`
            (the diffusivity: the constant filled in, or the Perona-Malik
            map of f), `"u"`, `"v"` (both the velocity g), `"ux"`, `"vy"`
            (their central differences), `"initial"` (H^0 = f), `"solution"`
            (H^K) and `"output"` (the layer's output, H^K here).
        """
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise validation.invalid(
                "inputs", "a list [source, velocity] of two tensors", type(inputs).__name__)
        source, velocity, diffusivity, solution = self._run(inputs)
        diffusivity = solver.broadcast_like(diffusivity, source)
        velocity = solver.broadcast_like(velocity, source)
        return {
            "Dx": diffusivity,
            "Dy": diffusivity,
            "u": velocity,
            "v": velocity,
            "ux": solver.central_difference(velocity, solver.X_AXIS, self.dx, self.boundary),
            "vy": solver.central_difference(velocity, solver.Y_AXIS, self.dy, self.boundary),
            "initial": source,
            "solution": solution,
            "output": solution,
        }

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update({
            "diffusivity": self.diffusivity,
            "diffusivity_constant": self.diffusivity_constant,
            "perona_malik_lambda": self.perona_malik_lambda,
            "steps": self.steps,
            "dt": self.dt,
            "dx": self.dx,
            "dy": self.dy,
            "boundary": self.boundary,
        })
        return config
