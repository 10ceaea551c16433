"""Forward+backward time of the Global layer against a 3x3 Conv2D.

    python -m benchmarks.layer [--jit_compile] [--output=layer.json]

Measures, in one process and interleaved, training-mode fwd+bwd (gradients
with respect to the input and the weights) of `GlobalLayer` with K=1 and
K=5 and of `Conv2D(16, 3)` on the same (128, 32, 32, 16) tensor, and prints
the medians and the ratios to the convolution.
"""

import os
import platform

from absl import app, flags

import keras

import pde_keras
from pde_keras import training
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
    flags.DEFINE_string("output", None, "Also write the results as JSON to this path.")


def run(batch_size, size, channels, steps, rounds, warmup, jit_compile):
    """Returns {case: median seconds} and {case: ratio to the Conv2D}."""
    shape = (batch_size, size, size, channels)
    inputs = timing.random_inputs(shape)
    layers = {"conv2d_3x3": keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)}
    for k in steps:
        layers[f"global_K{k}"] = pde_keras.GlobalLayer(steps=k)
    cases = {}
    for name, layer in layers.items():
        layer.build(shape)
        cases[name] = timing.gradient_step(layer, inputs, jit_compile)
    medians = timing.measure(cases, rounds, warmup)
    ratios = {name: t / medians["conv2d_3x3"] for name, t in medians.items()}
    return medians, ratios


def main(argv):
    del argv
    medians, ratios = run(FLAGS.batch_size, FLAGS.size, FLAGS.channels, FLAGS.steps,
                          FLAGS.rounds, FLAGS.warmup, FLAGS.jit_compile)
    print(f"backend={keras.backend.backend()} jit_compile={FLAGS.jit_compile} "
          f"input=({FLAGS.batch_size}, {FLAGS.size}, {FLAGS.size}, {FLAGS.channels}) "
          f"cpus={os.cpu_count()}")
    print(f"{'case':<12} {'median ms':>10} {'x conv':>8}")
    for name in medians:
        print(f"{name:<12} {medians[name] * 1e3:>10.1f} {ratios[name]:>8.2f}")
    if FLAGS.output:
        record = {
            "backend": keras.backend.backend(), "jit_compile": FLAGS.jit_compile,
            "batch_size": FLAGS.batch_size, "size": FLAGS.size, "channels": FLAGS.channels,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "median_seconds": medians, "ratio_to_conv": ratios,
            "pde_keras_version": pde_keras.__version__,
        }
        training.write_json(FLAGS.output, record)


if __name__ == "__main__":
    define_flags()
    app.run(main)
