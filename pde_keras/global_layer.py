"""The Global layer: a few steps of a learned advection-diffusion PDE."""

import keras
from keras import layers, ops

from pde_keras import fused_solver, solver, validation
from pde_keras.layer_options import (BATCHNORM_EPSILON, BATCHNORM_MOMENTUM, KERNEL_INITIALIZER,
                                     KERNEL_REGULARIZER, HasLayerOptions, LayerOptions)
from pde_keras.residual_block import BasicResidualBlock

DIFFUSIVITIES = ("depthwise", "constant", "perona_malik", "residual", "zero")
VELOCITIES = ("depthwise", "identity", "residual", "zero")
INITS = ("identity", "residual")
# Maps predicted by sub-layers, and which option decides each one's branch.
_VELOCITY_MAPS = ("u", "v")
_DIFFUSIVITY_MAPS = ("Dx", "Dy")
# The solver's order of the four maps (the rows of its `normalization`).
_SOLVER_MAPS = ("Dx", "Dy", "u", "v")
# coefficient_epsilon's default: the authors' epsilon, the channel count.
CHANNELS = "channels"


@keras.saving.register_keras_serializable(package="pde_keras")
class GlobalLayer(HasLayerOptions, keras.layers.Layer):
    """PDE-constrained feature layer of Kag & Saligrama (CVPR 2022).

    The layer runs K steps of the discretised advection-diffusion equation
    dH/dt = div(D grad H) - div(v H) + f on each channel of its input f
    (NHWC; x is the height axis, y the width axis):

        L H^{k+1} = M H^{k-1} - 2 (u_x + v_y) dt H^k + 2 dt f
                    + (-A_x + 2 B_x) H^k_{x+1} + (A_x + 2 B_x) H^k_{x-1}
                    + (-A_y + 2 B_y) H^k_{y+1} + (A_y + 2 B_y) H^k_{y-1}

    with L = 1 + 2 B_x + 2 B_y, M = 1 - 2 B_x - 2 B_y, A_x = u dt / dx,
    A_y = v dt / dy, B_x = D_x dt / dx^2, B_y = D_y dt / dy^2 and central
    differences u_x, v_y (see `pde_keras.solve_advection_diffusion`).
    H^{-1} = f, H^0 = init(f), and the output is ReLU(BN(H^K)).
    The diffusivity (D_x, D_y) and velocity (u, v) are computed once from
    H^0, before the K steps.

    The authors' PyTorch code equals this equation with the velocity
    negated, (u, v) -> (-u, -v); with ReLU-activated velocities the two
    layers are therefore not interchangeable weight for weight.

    Args:
        steps: number of solver steps K (integer >= 1). Defaults to 5.
        dt: time step. Defaults to 0.2.
        dx: grid spacing along x (height). Defaults to 1.0.
        dy: grid spacing along y (width). Defaults to 1.0.
        boundary: ghost-cell rule for H, u and v: `"periodic"` (default,
            the reference implementation), `"neumann"` (zero flux) or
            `"dirichlet"` (zero).
        diffusivity: how (D_x, D_y) is made from H^0:
            `"depthwise"` (default): depth-wise 3x3 conv -> BN -> ReLU, one
            each for D_x and D_y; `"constant"`: D_x = D_y =
            `diffusivity_constant`; `"perona_malik"`: isotropic
            D = 1 / (1 + |grad H^0|^2 / lambda^2) with |grad H^0| from the
            (unnormalised) Sobel filters; `"residual"`: basic residual
            block -> BN -> ReLU, one each; `"zero"`: pure advection.
        velocity: how (u, v) is made from H^0: `"depthwise"` (default):
            depth-wise 3x3 conv -> BN -> ReLU, one each; `"identity"`:
            ReLU(BN(H^0)), a BN each; `"residual"`: basic residual block ->
            BN -> ReLU, one each; `"zero"`: pure diffusion.
        init: H^0 from the input: `"identity"` (default) or `"residual"`
            (a basic residual block of the input).
        diffusivity_constant: D for `diffusivity="constant"` (>= 0).
            Defaults to 1.0.
        perona_malik_lambda: lambda for `diffusivity="perona_malik"` (> 0).
            Defaults to 2.0.
        kernel_initializer: initializer of every convolution kernel.
        kernel_regularizer: optional regularizer of every convolution kernel.
        batchnorm_momentum: momentum of every batch normalisation (0.9,
            PyTorch's 0.1 in Keras' convention).
        batchnorm_epsilon: epsilon of the output batch normalisation and of
            those inside residual blocks. Defaults to 1e-5 (PyTorch's).
        coefficient_epsilon: epsilon of the four coefficient batch
            normalisations, those in front of the ReLUs that make u, v, D_x
            and D_y (whichever branch feeds them): `"channels"` (default)
            uses the layer's number of channels, as the authors' code does
            (`BatchNorm2d(planes, planes)`: PyTorch's second argument is
            epsilon); a positive number sets it (`1e-5`: every batch norm
            alike, the layer of pde-keras 0.1.0). The large epsilon damps the
            learned velocities and diffusivities in inference mode: with 1e-5
            ResNet32-Global blows up early in training (test loss 1e3-1e27).
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    The four convolution and batch-norm settings (`kernel_initializer` to
    `batchnorm_epsilon`) are checked and kept as one
    `pde_keras.layer_options.LayerOptions`, `layer_options`, which also
    makes the sub-layers.

    Under a mixed-precision policy the sub-layers run in the compute dtype
    and the solver in float32: the K steps accumulate products of
    coefficient maps, which float16 resolves too coarsely.

    On TensorFlow on CPU, float32 layers run compiled kernels (built from
    source on first use, see `pde_keras.fused_solver`), with hand-written
    gradients: the depth-wise coefficient conv, which also sums the maps'
    batch statistics; the K solver steps, which normalise and rectify the
    maps as they read them (the four coefficient batch norms, no pass of
    their own) and sum H^K's statistics; one pass for the output batch norm
    + ReLU; in inference mode, with every map depth-wise, the whole layer as
    one op. Other batch norms in training run as TensorFlow's fused batch
    norm. It computes what the keras.ops code computes (the reference, and
    the only path on JAX); the moving averages are updated as Keras does.
    The environment variable `PDE_KERAS_SOLVER=auto|compiled|reference`
    chooses the path at run time; weights, config and `.keras` files are the
    same on both.

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        Same as the input.

    Example:

    >>> import numpy as np, keras, pde_keras
    >>> inputs = keras.Input((32, 32, 16))
    >>> outputs = pde_keras.GlobalLayer(steps=5, diffusivity="perona_malik")(inputs)
    >>> model = keras.Model(inputs, outputs)
    >>> tuple(model(np.zeros((2, 32, 32, 16), "float32")).shape)
    (2, 32, 32, 16)
    >>> maps = model.layers[-1].coefficient_maps(np.ones((1, 32, 32, 16), "float32"))
    >>> sorted(maps)[:4]
    ['Dx', 'Dy', 'initial', 'output']

    Reference:
        A. Kag and V. Saligrama, "Condensing CNNs with Partial Differential
        Equations", CVPR 2022, eq. 2.
    """

    def __init__(self, steps=5, dt=0.2, dx=1.0, dy=1.0, boundary="periodic",
                 diffusivity="depthwise", velocity="depthwise", init="identity",
                 diffusivity_constant=1.0, perona_malik_lambda=2.0,
                 kernel_initializer=KERNEL_INITIALIZER, kernel_regularizer=KERNEL_REGULARIZER,
                 batchnorm_momentum=BATCHNORM_MOMENTUM, batchnorm_epsilon=BATCHNORM_EPSILON,
                 coefficient_epsilon=CHANNELS, **kwargs):
        super().__init__(**kwargs)
        self.steps = validation.check_positive_int("steps", steps)
        self.dt = validation.check_float("dt", dt, positive=True)
        self.dx = validation.check_float("dx", dx, positive=True)
        self.dy = validation.check_float("dy", dy, positive=True)
        self.boundary = validation.check_choice("boundary", boundary, solver.BOUNDARIES)
        self.diffusivity = validation.check_choice("diffusivity", diffusivity, DIFFUSIVITIES)
        self.velocity = validation.check_choice("velocity", velocity, VELOCITIES)
        self.init = validation.check_choice("init", init, INITS)
        self.diffusivity_constant = validation.check_float(
            "diffusivity_constant", diffusivity_constant, non_negative=True)
        self.perona_malik_lambda = validation.check_float(
            "perona_malik_lambda", perona_malik_lambda, positive=True)
        self.layer_options = LayerOptions.resolved(
            kernel_initializer, kernel_regularizer, batchnorm_momentum, batchnorm_epsilon)
        if coefficient_epsilon != CHANNELS:
            try:
                coefficient_epsilon = validation.check_float(
                    "coefficient_epsilon", coefficient_epsilon, positive=True)
            except ValueError:
                raise validation.invalid("coefficient_epsilon", f"{CHANNELS!r} or a positive "
                                         "finite number", coefficient_epsilon) from None
        self.coefficient_epsilon = coefficient_epsilon

    # -- construction -----------------------------------------------------

    def _norm(self, name, epsilon=None):
        return self.layer_options.norm(name, epsilon, dtype=self.dtype_policy)

    def _residual_block(self, name):
        return BasicResidualBlock(**self.layer_options.as_dict(), dtype=self.dtype_policy,
                                  name=name)

    def _branch(self, kind, map_name, epsilon):
        """The sub-layers that predict one map alone, before its ReLU.

        Depth-wise maps share one depth-wise conv (depth multiplier = their
        number; the same weights as separate convs, in one kernel) and then
        each has its own BN: BNs over the 4x larger fused tensor measured
        slower than four small ones (they fall out of the CPU cache).
        Every branch ends in its coefficient BN, of epsilon `epsilon`.
        """
        if kind in ("depthwise", "identity"):
            return [self._norm(f"{map_name}_bn", epsilon)]
        if kind == "residual":
            return [self._residual_block(f"{map_name}_block"),
                    self._norm(f"{map_name}_bn", epsilon)]
        return []

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                "GlobalLayer expects rank-4 inputs (batch, height, width, "
                f"channels). Received: input_shape={tuple(input_shape)}")
        if input_shape[-1] is None:
            raise ValueError(
                "GlobalLayer needs a known number of channels. "
                f"Received: input_shape={tuple(input_shape)}")
        self.init_block = (
            self._residual_block("init_block") if self.init == "residual" else None)
        kinds = {name: self.velocity for name in _VELOCITY_MAPS}
        kinds.update({name: self.diffusivity for name in _DIFFUSIVITY_MAPS})
        self.depthwise_maps = tuple(n for n, kind in kinds.items() if kind == "depthwise")
        if self.depthwise_maps:
            self.coefficient_conv = self.layer_options.depthwise_conv(
                3, len(self.depthwise_maps), "coefficient_conv", dtype=self.dtype_policy)
            self.coefficient_conv.build(input_shape)
        epsilon = (float(input_shape[-1]) if self.coefficient_epsilon == CHANNELS
                   else self.coefficient_epsilon)
        self.branches = {name: self._branch(kind, name, epsilon) for name, kind in kinds.items()}
        self.output_bn = self._norm("output_bn")
        sublayers = [self.output_bn] + [l for b in self.branches.values() for l in b]
        if self.init_block is not None:
            sublayers.append(self.init_block)
        for layer in sublayers:
            layer.build(input_shape)

    # -- computation ------------------------------------------------------

    def _split_depthwise(self, initial):
        """The shared depth-wise conv's output, split into one tensor per map."""
        if keras.backend.backend() == "jax":
            return self._depthwise_as_shifted_products(initial)
        if fused_solver.use_compiled(initial.dtype):
            # The compiled kernel writes each map separately (no split of a
            # fused tensor); TensorFlow's grouped-conv gradient with a depth
            # multiplier measured several times slower.
            return dict(zip(self.depthwise_maps, fused_solver.depthwise_maps(
                initial, ops.cast(self.coefficient_conv.kernel, initial.dtype))))
        fused = self.coefficient_conv(initial)
        # The conv's output channels run channel-major: c * n + map index.
        split_shape = tuple(ops.shape(fused)[:-1]) + (-1, len(self.depthwise_maps))
        return dict(zip(self.depthwise_maps,
                        ops.unstack(ops.reshape(fused, split_shape), axis=-1)))

    def _depthwise_as_shifted_products(self, initial):
        """The same zero-padded 3x3 depth-wise conv, as nine shifted products.

        XLA (the JAX backend) compiles grouped convolutions' gradients poorly
        on CPU (measured 4-7x a full 3x3 conv, 150x with a depth multiplier);
        nine shifted products per map fuse into one loop instead.
        """
        kernel = ops.cast(self.coefficient_conv.kernel, initial.dtype)
        padded = ops.pad(initial, ((0, 0), (1, 1), (1, 1), (0, 0)))
        windows = {(a, b): padded[:, a:(a - 2) or None, b:(b - 2) or None, :]
                   for a in range(3) for b in range(3)}
        return {
            name: sum(window * kernel[a, b, :, j] for (a, b), window in windows.items())
            for j, name in enumerate(self.depthwise_maps)
        }

    def _apply(self, layer, inputs, training):
        """`layer(inputs, training=training)`; a batch normalisation in training
        mode on the compiled path runs as TensorFlow's fused batch norm."""
        if (training is True and isinstance(layer, layers.BatchNormalization)
                and fused_solver.use_compiled(inputs.dtype)):
            return fused_solver.batch_normalization_training(layer, inputs)
        return layer(inputs, training=training)

    def _fused_norms(self, initial, training):
        """Whether the depth-wise maps' and the output's batch norms run inside
        the compiled kernels: the depth-wise op sums the maps' batch
        statistics as it writes them, the solver normalises each map as it
        reads it and sums H^K's statistics as it writes it, and one pass
        normalises and rectifies H^K (see `_fused_depthwise`, `_fused_solve`):
        no batch norm makes passes of its own."""
        if not self.depthwise_maps or not fused_solver.use_compiled(initial.dtype):
            return False
        if training is True:  # batch statistics, unless a frozen norm uses its averages
            norms = [self.output_bn] + [self.branches[name][0] for name in self.depthwise_maps]
            return all(norm.trainable for norm in norms)
        return training is None or training is False  # (not a symbolic flag)

    def _coefficients(self, initial, training):
        """Returns (maps, pre_activation, normalization, solver_initial): D_x,
        D_y, u, v from H^0, and H^0 as the solver should take it.

        Learned maps are float32 tensors; constant ones are python floats.
        `pre_activation` holds the learned maps before their ReLU, as the
        solver takes them. `normalization` is None, or on the fused path
        `(scale, shift)` for `fused_solver.solve`: then the depth-wise maps in
        `pre_activation` are before their batch norm too, and
        `solver_initial` is H^0 passed through the maps' statistics op
        (see `fused_solver.depthwise_maps`); else it is `initial`.
        """
        maps, pre_activation, normalization, solver_initial = {}, {}, None, initial
        if self._fused_norms(initial, training):
            pre_activation, normalization, solver_initial = self._fused_depthwise(
                initial, training)
        branch_inputs = (self._split_depthwise(initial)
                         if self.depthwise_maps and normalization is None else {})
        for map_name, branch in self.branches.items():
            if branch and map_name not in pre_activation:
                h = branch_inputs.get(map_name, initial)
                for layer in branch:
                    h = self._apply(layer, h, training)
                pre_activation[map_name] = ops.cast(h, "float32")
                maps[map_name] = ops.relu(pre_activation[map_name])
        initial32 = ops.cast(initial, "float32")
        if self.velocity == "zero":
            maps["u"] = maps["v"] = 0.0
        if self.diffusivity == "zero":
            maps["Dx"] = maps["Dy"] = 0.0
        elif self.diffusivity == "constant":
            maps["Dx"] = maps["Dy"] = self.diffusivity_constant
        elif self.diffusivity == "perona_malik":
            maps["Dx"] = maps["Dy"] = solver.perona_malik_diffusivity(
                initial32, self.perona_malik_lambda, self.boundary)
        return maps, pre_activation, normalization, solver_initial

    def _fused_depthwise(self, initial, training):
        """The depth-wise maps before their batch norms, the norms as the
        solver's `(scale, shift)` rows (the identity for the other maps), and
        H^0 passed through the maps' statistics op, for the solver."""
        norms = [self.branches[name][0] for name in self.depthwise_maps]
        raw, mean, variance, solver_initial = fused_solver.depthwise_maps(
            initial, self.coefficient_conv.kernel, statistics=True)
        normalization = fused_solver.normalization(
            norms, (mean, variance) if training is True else None, self._solver_rows())
        return dict(zip(self.depthwise_maps, raw)), normalization, solver_initial

    def _solver_rows(self):
        """For each of the solver's maps, its index among the depth-wise conv's
        maps (-1: not a depth-wise map)."""
        return [self.depthwise_maps.index(name) if name in self.depthwise_maps else -1
                for name in _SOLVER_MAPS]

    def _fused_inference(self, inputs, initial):
        """The output in inference mode, one compiled op (every map depth-wise)."""
        norms = [self.branches[name][0] for name in _SOLVER_MAPS] + [self.output_bn]
        return fused_solver.global_inference(
            inputs, initial, self.coefficient_conv.kernel, self._solver_rows(),
            fused_solver.normalization(norms),
            self.steps, dt=self.dt, dx=self.dx, dy=self.dy, boundary=self.boundary)

    def _fused_solve(self, inputs, initial, given, normalization, training):
        """(H^K, output) from the compiled solver, which normalises the maps
        by `normalization` and sums H^K's batch statistics, and one pass of
        the output batch norm + ReLU (all float32 on this path). The
        depth-wise maps' gradient goes through their conv inside the
        solver's gradient."""
        # Learned maps are full tensors already; constants become full maps.
        d_x, d_y, u, v = (solver.broadcast_like(given[name], inputs)
                          if isinstance(given[name], (int, float)) else given[name]
                          for name in _SOLVER_MAPS)
        solution, mean, variance = fused_solver.solve(
            inputs, initial, (d_x, d_y), (u, v), self.steps, dt=self.dt, dx=self.dx, dy=self.dy,
            boundary=self.boundary, rectify=True, normalization=normalization, statistics=True,
            depthwise=(self.coefficient_conv.kernel, self._solver_rows()))
        scale, shift = fused_solver.normalization(
            [self.output_bn], ([mean], [variance]) if training is True else None)
        return solution, fused_solver.normalize_relu(solution, scale, shift)

    def _run(self, inputs, training, inspect=False):
        initial = inputs if self.init_block is None else self.init_block(inputs, training=training)
        if not inspect and training is not True and len(self.depthwise_maps) == 4 and (
                self._fused_norms(initial, training)):
            return (self._fused_inference(inputs, initial),)
        maps, pre_activation, normalization, solver_initial = self._coefficients(
            initial, training)
        # The solver applies the learned maps' ReLU itself (in the compiled
        # kernel's pass over the maps); the other maps are >= 0 already.
        given = {**maps, **pre_activation}
        if normalization is not None:
            # (f is H^0 without an init block: then one tensor for both.)
            source = solver_initial if inputs is initial else inputs
            solution, output = self._fused_solve(source, solver_initial, given, normalization,
                                                 training)
        else:
            solution = solver.solve_advection_diffusion(
                ops.cast(inputs, "float32"), ops.cast(initial, "float32"),
                (given["Dx"], given["Dy"]), (given["u"], given["v"]), self.steps,
                dt=self.dt, dx=self.dx, dy=self.dy, boundary=self.boundary,
                rectify_coefficients=True)
            solution = ops.cast(solution, self.compute_dtype)
            output = ops.relu(self._apply(self.output_bn, solution, training))
        return output, initial, solution, maps, pre_activation, normalization

    def call(self, inputs, training=None):
        return self._run(inputs, training)[0]

    def coefficient_maps(self, inputs, training=False):
        """Returns the layer's maps for `inputs`, for inspection and figures.

        Args:
            inputs: a batch shaped like the layer's input, e.g. one image's
                features `(1, height, width, channels)`.
            training: run the batch normalisations in training mode.

        Returns:
            A dict of tensors shaped like `inputs` (float32): `"Dx"`,
            `"Dy"`, `"u"`, `"v"` (the coefficients the solver used),
            `"ux"`, `"vy"` (their central differences), `"initial"` (H^0),
            `"solution"` (H^K, before the output BN) and `"output"`; plus
            `"<map>_pre"` (before the ReLU) for every map a sub-layer
            predicts. Constant coefficients are filled in as full maps.
        """
        inputs = ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
        if not self.built:
            self.build(tuple(inputs.shape))
        output, initial, solution, maps, pre_activation, normalization = self._run(
            inputs, training, inspect=True)
        if normalization is not None:  # the fused path's maps, normalised as the solver did
            scale, shift = normalization
            for m, name in enumerate(_SOLVER_MAPS):
                if name in self.depthwise_maps:
                    pre_activation[name] = pre_activation[name] * scale[m] + shift[m]
                    maps[name] = ops.relu(pre_activation[name])
        like = ops.cast(solution, "float32")
        full = {name: solver.broadcast_like(value, like) for name, value in maps.items()}
        result = {
            "initial": ops.cast(initial, "float32"),
            "solution": like,
            "output": ops.cast(output, "float32"),
            "ux": solver.central_difference(full["u"], solver.X_AXIS, self.dx, self.boundary),
            "vy": solver.central_difference(full["v"], solver.Y_AXIS, self.dy, self.boundary),
        }
        result.update(full)
        result.update({f"{name}_pre": value for name, value in pre_activation.items()})
        return result

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "steps": self.steps,
            "dt": self.dt,
            "dx": self.dx,
            "dy": self.dy,
            "boundary": self.boundary,
            "diffusivity": self.diffusivity,
            "velocity": self.velocity,
            "init": self.init,
            "diffusivity_constant": self.diffusivity_constant,
            "perona_malik_lambda": self.perona_malik_lambda,
            **self.layer_options.get_config(),
            "coefficient_epsilon": self.coefficient_epsilon,
        })
        return config

    @classmethod
    def from_config(cls, config):
        # Files saved before coefficient_epsilon existed (pde-keras 0.1.0)
        # used batchnorm_epsilon for every batch norm: they keep computing so.
        if "coefficient_epsilon" not in config:
            epsilon = config.get("batchnorm_epsilon", BATCHNORM_EPSILON)
            config = {**config, "coefficient_epsilon": epsilon}
        return super().from_config(config)
