"""Forward+backward time of the Global layer against a 3x3 Conv2D.

    python -m benchmarks.layer [--jit_compile] [--paths=compiled --paths=reference]
                               [--pieces] [--output=layer.json]

Measures, in one process and interleaved, training-mode fwd+bwd (gradients
with respect to the input and the weights) of `GlobalLayer` with K=1 and
K=5 and of `Conv2D(16, 3)` on the same (128, 32, 32, 16) tensor, and prints
the medians and the ratios to the convolution. Every Global case runs once
per solver path (`PDE_KERAS_SOLVER`: the compiled kernel and the keras.ops
reference on TensorFlow, the reference on JAX); `solver_K5` is the solver
alone, its coefficient maps given (gradients with respect to f = H^0 and
the four maps D_x, D_y, u, v). `--pieces` adds the layer's parts one by
one, as the layer runs them in training mode on each path: the solver alone
at K=1, the depth-wise coefficient conv (four maps, with their batch
statistics on the compiled path), the output batch norm + ReLU (one pass on
the compiled path) and, for scale, one ReLU.
"""

import os
import platform

from absl import app, flags

import keras

import pde_keras
from pde_keras import fused_solver, run_directory, solver
from benchmarks import timing

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("size", 32, "Height and width of the feature maps.", lower_bound=3)
    flags.DEFINE_integer("channels", 16, "Channels of the feature maps.", lower_bound=1)
    flags.DEFINE_multi_integer("steps", [1, 5], "Solver steps K to measure (repeatable).")
    flags.DEFINE_integer("rounds", 15, "Interleaved timing rounds; the median is reported.",
                         lower_bound=1)
    flags.DEFINE_integer("warmup", 3, "Untimed calls of each case first.", lower_bound=0)
    flags.DEFINE_boolean("jit_compile", False, "Compile each step with XLA.")
    flags.DEFINE_multi_enum("paths", None, ["compiled", "reference"],
                            "Solver paths to measure (default: every path this backend has).")
    flags.DEFINE_boolean("pieces", False, "Also time the layer's parts one by one.")
    flags.DEFINE_string("output", None, "Also write the results as JSON to this path.")


class SolverAlone(keras.layers.Layer):
    """The solver with given maps: D_x, D_y, u, v are weights, f = H^0 the input."""

    def __init__(self, steps, **kwargs):
        super().__init__(**kwargs)
        self.steps = steps

    def build(self, input_shape):
        self.maps = [self.add_weight(shape=input_shape, name=name,
                                     initializer=keras.initializers.RandomUniform(0.0, 1.0))
                     for name in ("Dx", "Dy", "u", "v")]

    def call(self, inputs):
        d_x, d_y, u, v = self.maps
        return solver.solve_advection_diffusion(inputs, inputs, (d_x, d_y), (u, v), self.steps)


class DepthwiseMaps(keras.layers.Layer):
    """The Global layer's depth-wise coefficient conv, four maps, as each path
    runs it in training (the compiled op also sums the maps' batch statistics)."""

    def build(self, input_shape):
        self.conv = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False,
                                                 depth_multiplier=4)
        self.conv.build(input_shape)

    def call(self, inputs):
        if fused_solver.use_compiled(inputs.dtype):
            maps, mean, variance, _ = fused_solver.depthwise_maps(inputs, self.conv.kernel,
                                                                  statistics=True)
            return [*maps, mean, variance]
        return self.conv(inputs)


class NormRelu(keras.layers.Layer):
    """The Global layer's output batch norm + ReLU as each path runs it in
    training: compiled, one normalise-and-rectify pass (the solver sums the
    statistics, given here); reference, Keras' BatchNormalization and ReLU."""

    def build(self, input_shape):
        self.norm = keras.layers.BatchNormalization()
        self.norm.build(input_shape)
        channels = (input_shape[-1],)
        self.statistics = [self.add_weight(shape=channels, initializer=init, trainable=False)
                           for init in ("zeros", "ones")]

    def call(self, inputs, training=None):
        if training and fused_solver.use_compiled(inputs.dtype):
            mean, variance = ([s] for s in self.statistics)
            scale, shift = fused_solver.normalization([self.norm], (mean, variance))
            return fused_solver.normalize_relu(inputs, scale, shift)
        return keras.ops.relu(self.norm(inputs, training=training))


def run(batch_size, size, channels, steps, rounds, warmup, jit_compile, paths=None,
        pieces=False):
    """Returns {case: median seconds} and {case: ratio to the Conv2D}.

    Cases are `conv2d_3x3` and `<case>/<path>` for each solver path
    (`relu` has no path).
    """
    shape = (batch_size, size, size, channels)
    inputs = timing.random_inputs(shape)
    conv = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)
    conv.build(shape)
    cases = {"conv2d_3x3": timing.gradient_step(conv, inputs, jit_compile)}
    for path in paths or fused_solver.available_paths():
        layers = {f"global_K{k}": pde_keras.GlobalLayer(steps=k) for k in steps}
        layers["solver_K5"] = SolverAlone(5)
        if pieces:
            layers.update(solver_K1=SolverAlone(1), depthwise_4=DepthwiseMaps(),
                          norm_relu=NormRelu())
        for name, layer in layers.items():
            layer.build(shape)
            cases[f"{name}/{path}"] = timing.on_solver_path(
                path, timing.gradient_step(layer, inputs, jit_compile))
    if pieces:
        relu = keras.layers.ReLU()
        relu.build(shape)
        cases["relu"] = timing.gradient_step(relu, inputs, jit_compile)
    medians = timing.measure(cases, rounds, warmup)
    ratios = {name: t / medians["conv2d_3x3"] for name, t in medians.items()}
    return medians, ratios


def main(argv):
    del argv
    timing.quiet_retracing_warnings()
    medians, ratios = run(FLAGS.batch_size, FLAGS.size, FLAGS.channels, FLAGS.steps,
                          FLAGS.rounds, FLAGS.warmup, FLAGS.jit_compile, FLAGS.paths,
                          FLAGS.pieces)
    print(f"backend={keras.backend.backend()} jit_compile={FLAGS.jit_compile} "
          f"input=({FLAGS.batch_size}, {FLAGS.size}, {FLAGS.size}, {FLAGS.channels}) "
          f"cpus={os.cpu_count()}")
    print(f"{'case':<12} {'path':<10} {'median ms':>10} {'x conv':>8}")
    for name in medians:
        case, _, path = name.partition("/")
        print(f"{case:<12} {path or '-':<10} {medians[name] * 1e3:>10.1f} {ratios[name]:>8.2f}")
    if FLAGS.output:
        record = {
            "backend": keras.backend.backend(), "jit_compile": FLAGS.jit_compile,
            "batch_size": FLAGS.batch_size, "size": FLAGS.size, "channels": FLAGS.channels,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "median_seconds": medians, "ratio_to_conv": ratios,
            "pde_keras_version": pde_keras.__version__,
        }
        run_directory.write_json(FLAGS.output, record)


if __name__ == "__main__":
    define_flags()
    app.run(main)
