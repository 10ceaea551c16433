"""Backend-neutral forward+backward timing, shared by the benchmarks.

Timings are interleaved (one round runs every case once, in turn) and
summarised by medians, so a noisy shared machine slows all cases alike.
"""

import inspect
import logging
import statistics
import time

import keras
import numpy as np

from pde_keras import fused_solver


class _DropRetracingWarning(logging.Filter):
    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


def quiet_retracing_warnings():
    """Drops TensorFlow's "triggered tf.function retracing" warning: every
    case is a tf.function of its own, traced once, but TensorFlow counts
    traces across functions and so warns of retracing that does not happen.
    Other TensorFlow warnings still print."""
    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _DropRetracingWarning) for f in logger.filters):
        logger.addFilter(_DropRetracingWarning())


def gradient_step(layer, inputs, jit_compile):
    """Returns a no-argument callable: one training-mode fwd+bwd of `layer`.

    The gradient is taken with respect to the input and every trainable
    weight of `sum(layer(x)^2)` (summed over every output if the layer
    returns several), as inside a network; the callable blocks until the
    result is computed.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(inputs)

        @tf.function(jit_compile=jit_compile)
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = sum(tf.reduce_sum(tf.square(tf.cast(o, "float32")))
                           for o in tf.nest.flatten(y))
            return tape.gradient(loss, [x] + layer.trainable_variables)

        return lambda: [g.numpy() for g in step() if g is not None]
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        x = jnp.asarray(inputs)
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        accepts_training = "training" in inspect.signature(layer.call).parameters
        kwargs = {"training": True} if accepts_training else {}

        def loss_fn(trainable, x):
            y, _ = layer.stateless_call(trainable, non_trainable, x, **kwargs)
            return sum(jnp.sum(jnp.square(o.astype("float32"))) for o in jax.tree_util.tree_leaves(y))

        grad = jax.grad(loss_fn, argnums=(0, 1))
        if jit_compile:
            grad = jax.jit(grad)
        return lambda: jax.block_until_ready(grad(trainable, x))
    raise SystemExit(f"error: benchmarks support the tensorflow and jax backends, not {backend!r}")


def measure(cases, rounds, warmup, repeats=1):
    """Times each callable in `cases` (a dict) `rounds` times, interleaved.

    Returns {name: median seconds per call}. Each sample is the mean of
    `repeats` back-to-back calls.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            samples[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(values) for name, values in samples.items()}


def random_inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")



def on_solver_path(path, fn):
    """`fn` run with `PDE_KERAS_SOLVER=path` (so its traces take that path)."""
    def call():
        with fused_solver.solver_path(path):
            return fn()

    return call
