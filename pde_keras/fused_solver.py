"""The compiled, fused solver kernel (TensorFlow on CPU) and the path switch.

`pde_keras/kernels/fused_solver.cc` runs the K solver steps of
`pde_keras.solver` as one TensorFlow op, coefficient maps included, with a
hand-written backward op (the adjoint recurrence); the other ops serve the
Global layer: its depth-wise coefficient convolution (one output per map,
with their batch statistics), its batch norms as per-channel (scale, shift)
(`normalization`), which the solver applies to the maps as it reads them,
the output batch norm + ReLU in one pass (`normalize_relu`), and the whole
layer in inference mode (`global_inference`). It is built from source on
first use with the installed TensorFlow's compile and link flags, cached per
TensorFlow version and source hash, and loaded with `tf.load_op_library`.
The keras.ops solver stays the reference: it runs on
JAX, for dtypes other than float32, under XLA, and whenever the kernel
cannot be built (one log line says why).

The path is a runtime choice, never part of a layer's config:
`PDE_KERAS_SOLVER=auto` (default: the kernel where it applies),
`compiled` (the kernel; an error where it cannot run) or `reference`
(the keras.ops solver). `PDE_KERAS_CACHE` sets the cache directory
(default `$XDG_CACHE_HOME/pde_keras/ops` or `~/.cache/pde_keras/ops`) and
`CXX` the compiler (default `g++`).
"""

import contextlib
import fcntl
import hashlib
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import threading

import keras

from pde_keras import validation

SOURCE = pathlib.Path(__file__).parent / "kernels" / "fused_solver.cc"
ENVIRONMENT_VARIABLE = "PDE_KERAS_SOLVER"
PATHS = ("auto", "compiled", "reference")
LANES_VARIABLE = "PDE_KERAS_LANES"
LANES = ("auto", "8", "16")

_LOG = logging.getLogger("pde_keras")
_lock = threading.Lock()
_library = None
_failure = None  # why the kernel cannot be used, once known
_logged = set()


def requested_path():
    """The path asked for by `PDE_KERAS_SOLVER`: `auto`, `compiled` or `reference`."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    return validation.check_choice(ENVIRONMENT_VARIABLE, value, PATHS)


def requested_lanes():
    """The kernels' channels per work unit asked for by `PDE_KERAS_LANES`:
    `auto` (16 where the build has AVX-512 and a call's channels come in
    whole 16s, else 8), `8` or `16` (16 only where built). For tests and
    comparisons; the kernels read it at every call."""
    value = os.environ.get(LANES_VARIABLE, "auto") or "auto"
    return validation.check_choice(LANES_VARIABLE, value, LANES)


@contextlib.contextmanager
def solver_path(path):
    """Sets `PDE_KERAS_SOLVER` to `path` inside the block (what gets traced
    there keeps that path), restoring the previous value after."""
    path = validation.check_choice(ENVIRONMENT_VARIABLE, path, PATHS)
    previous = os.environ.get(ENVIRONMENT_VARIABLE)
    os.environ[ENVIRONMENT_VARIABLE] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENVIRONMENT_VARIABLE, None)
        else:
            os.environ[ENVIRONMENT_VARIABLE] = previous


def available_paths():
    """The paths this process can run: `compiled` (TensorFlow, kernel built) and `reference`."""
    if keras.backend.backend() == "tensorflow" and library() is not None:
        return ("compiled", "reference")
    return ("reference",)


def _log_once(message):
    if message not in _logged:
        _logged.add(message)
        _LOG.warning(message)


def _instruction_set_flags():
    """`-mavx2 -mfma` where this CPU has them (the kernel's vectors double in
    width), and AVX-512 where it has that too: 32 vector registers instead of
    16 (the many-tap loops keep their taps and sums in registers), mask
    registers for partial channel blocks, and the kernels built a second time
    for 16-channel units (512-bit vectors); compiler-chosen vectors stay at
    256 bits (`-mprefer-vector-width=256`)."""
    try:
        cpu_flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    if not {"avx2", "fma"} <= cpu_flags:
        return []
    if {"avx512f", "avx512vl"} <= cpu_flags:
        return ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mprefer-vector-width=256"]
    return ["-mavx2", "-mfma"]


def _cache_directory(tensorflow_version, source_digest):
    root = os.environ.get("PDE_KERAS_CACHE")
    if not root:
        root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
        root = root / "pde_keras" / "ops"
    return pathlib.Path(root) / f"{tensorflow_version}-{source_digest}"


def _build(tf, library_path):
    """Compiles the kernel to `library_path` (atomically: temp file, then rename)."""
    compiler = os.environ.get("CXX", "g++")
    handle, temporary = tempfile.mkstemp(suffix=".so.tmp", dir=library_path.parent)
    os.close(handle)
    command = ([compiler, "-O3", "-fPIC", "-shared", "-w", *_instruction_set_flags(), str(SOURCE),
                "-o", temporary] + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags())
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"`{compiler}` failed ({result.returncode}): "
                               f"{result.stderr.strip()[-2000:]}")
        os.replace(temporary, library_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def _load():
    """Builds (once per TensorFlow version and source) and loads the kernel."""
    import tensorflow as tf

    # The build flags are part of the key: a cache shared by machines with
    # different CPUs never hands one a library built for the other.
    key = SOURCE.read_bytes() + " ".join(_instruction_set_flags()).encode()
    source_digest = hashlib.sha256(key).hexdigest()[:16]
    directory = _cache_directory(tf.__version__, source_digest)
    directory.mkdir(parents=True, exist_ok=True)
    library_path = directory / "fused_solver.so"
    # The lock makes concurrent processes wait for one build instead of
    # compiling side by side; the rename makes a half-written file invisible.
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library_path.exists():
            _build(tf, library_path)
    library = tf.load_op_library(str(library_path))
    _register_gradient(tf, library)
    return library


def _register_gradient(tf, library):
    def zeros_for_none(op, grads):
        return [tf.zeros_like(output) if grad is None else grad
                for output, grad in zip(op.outputs, grads)]

    @tf.RegisterGradient("PdeKerasSolve")
    def _solve_gradient(op, *grads):
        attrs = {name: op.get_attr(name) for name in (
            "steps", "dt", "dx", "dy", "boundary", "rectify", "shared_initial", "depthwise")}
        grad_solution, grad_mean, grad_variance = zeros_for_none(op, grads)
        grads = library.pde_keras_solve_grad(*op.inputs[:8], op.outputs[1], grad_solution,
                                             grad_mean, grad_variance, op.inputs[8:], **attrs)
        grads = [*grads[:8], *grads[8]]
        # Empty outputs (None here): dL/dH^0 when one tensor is both f and H^0
        # (its whole gradient is the first output, so no sum of two copies
        # follows), and each depth-wise map's, whose share went into dL/dH^0
        # and the kernel's gradient.
        if attrs["shared_initial"]:
            grads[1] = None
        for m, row in enumerate(attrs["depthwise"]):
            if row >= 0:
                grads[2 + m] = None
        return grads

    @tf.RegisterGradient("PdeKerasDepthwiseMaps")
    def _depthwise_gradient(op, *grads):
        *grad_maps, grad_mean, grad_variance = zeros_for_none(op, grads)
        return library.pde_keras_depthwise_maps_grad(
            op.inputs[0], op.inputs[1], op.outputs[-2], grad_maps, grad_mean, grad_variance, [])

    @tf.RegisterGradient("PdeKerasDepthwiseStatistics")
    def _depthwise_statistics_gradient(op, grad_input, grad_mean, grad_variance):
        inputs, kernel, mean, _ = op.inputs
        if grad_mean is None and grad_variance is None:
            return [grad_input, None, None, None]
        grad_mean, grad_variance = (tf.zeros_like(mean) if grad is None else grad
                                    for grad in (grad_mean, grad_variance))
        # The statistics' share alone (every map's own gradient empty: zero),
        # written onto the gradient of the input passed through.
        empty = [tf.zeros((0,))] * int(kernel.shape[-1])
        grads = library.pde_keras_depthwise_maps_grad(
            inputs, kernel, mean, empty, grad_mean, grad_variance,
            [] if grad_input is None else [grad_input])
        return [*grads, None, None]

    @tf.RegisterGradient("PdeKerasNormalization")
    def _normalization_gradient(op, grad_scale, grad_shift):
        count, epsilon = op.get_attr("count"), op.get_attr("epsilon")
        gamma, beta, mean, variance = (op.inputs[i * count:(i + 1) * count] for i in range(4))
        grads = [[None] * count for _ in range(4)]
        for row, n in enumerate(op.get_attr("rows")):
            if n < 0:
                continue
            # scale = gamma / sqrt(variance + epsilon), shift = beta - mean * scale.
            d_scale = tf.reshape(grad_scale[row], tf.shape(gamma[n]))
            d_shift = tf.reshape(grad_shift[row], tf.shape(gamma[n]))
            inverse = tf.math.rsqrt(variance[n] + epsilon[n])
            through_scale = d_scale - d_shift * mean[n]
            for k, grad in enumerate((through_scale * inverse, d_shift,
                                      -d_shift * gamma[n] * inverse,
                                      -0.5 * through_scale * gamma[n] * inverse ** 3)):
                grads[k][n] = grad if grads[k][n] is None else grads[k][n] + grad
        return [tf.zeros_like(value) if grad is None else grad
                for values, row_grads in zip((gamma, beta, mean, variance), grads)
                for value, grad in zip(values, row_grads)]

    @tf.RegisterGradient("PdeKerasGlobalInference")
    def _global_inference_gradient(op, grad_output):
        # The three-op path computes the same; its ops' gradients chain.
        attrs = {name: op.get_attr(name)
                 for name in ("steps", "dt", "dx", "dy", "boundary", "maps")}
        # With shared_initial, one tensor is both f and H^0: all its gradient
        # goes to the second input (TensorFlow adds the two).
        shared = op.get_attr("shared_initial")
        inputs = list(op.inputs)[1:] if shared else list(op.inputs)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            initial, kernel, scale, shift = inputs[-4:]
            source = initial if shared else inputs[0]
            maps = depthwise_maps(initial, kernel)
            d_x, d_y, u, v = (maps[k] for k in attrs.pop("maps"))
            solution = solve(source, initial, (d_x, d_y), (u, v), **attrs, rectify=True,
                             normalization=(scale[:4], shift[:4]))
            output = normalize_relu(solution, scale[4], shift[4])
        grads = tape.gradient(output, inputs, output_gradients=grad_output)
        return [None] + grads if shared else grads

    @tf.RegisterGradient("PdeKerasNormalizeRelu")
    def _normalize_relu_gradient(op, grad_y):
        return library.pde_keras_normalize_relu_grad(*op.inputs, grad_y)


def library():
    """The loaded op library, or None (the reason logged once) if it cannot be built."""
    global _library, _failure
    with _lock:
        if _library is None and _failure is None:
            if sys.platform != "linux":
                _failure = f"the kernel is built for Linux only, not {sys.platform}"
            else:
                try:
                    _library = _load()
                except Exception as error:  # noqa: BLE001 - any failure means: fall back
                    _failure = f"{type(error).__name__}: {error}"
        if _failure is not None:
            _log_once("pde_keras: the compiled solver kernel is unavailable, so the keras.ops "
                      f"solver runs ({_failure}).")
        return _library


def _in_xla_context(tf):
    """Whether ops are being traced for XLA (the kernel has no XLA lowering)."""
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - private module moved
        return False
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def use_compiled(dtype):
    """Whether the compiled kernels run for a `dtype` problem (solver, depth-wise maps).

    Raises:
        RuntimeError: `PDE_KERAS_SOLVER=compiled` where the kernel cannot run.
    """
    from pde_keras import solver  # Late: solver imports this module.

    if solver.builtin_ops_required():
        return False  # Exporting (solver.builtin_ops_only): never a custom op.
    path = requested_path()
    if path == "reference":
        return False
    requested_lanes()  # (validated here; the kernels read it)
    forced = path == "compiled"
    if keras.backend.backend() != "tensorflow":
        reason = f"the compiled kernel is TensorFlow-only, the backend is {keras.backend.backend()}"
        if forced:
            raise RuntimeError(f"{ENVIRONMENT_VARIABLE}=compiled: {reason}.")
        _log_once(f"pde_keras: the keras.ops solver runs ({reason}).")
        return False
    if keras.backend.standardize_dtype(dtype) != "float32":
        return False  # the kernel is float32; the solver runs in float32 under mixed precision
    import tensorflow as tf

    if _in_xla_context(tf):
        return False
    if not forced and tf.config.list_logical_devices("GPU"):
        return False  # CPU kernel: leave GPU graphs to TensorFlow's own kernels
    if library() is None:
        if forced:
            raise RuntimeError(f"{ENVIRONMENT_VARIABLE}=compiled, but the kernel could not be "
                               f"built: {_failure}")
        return False
    return True


def depthwise_maps(inputs, kernel, statistics=False):
    """The zero-padded 3x3 depth-wise conv of `inputs` (NHWC, float32) by
    `kernel` (3, 3, channels, maps): a list of `maps` tensors shaped like
    `inputs`, map k from `kernel[..., k]`.

    With `statistics`, returns `(maps, mean, variance, inputs)`: also each
    map's batch mean and biased variance per channel, `(maps, channels)`
    each (what a batch normalisation in training mode normalises with),
    summed by the kernel as it writes the maps, differentiable like the
    maps; and `inputs` passed through: the same values, whose gradient the
    statistics' share is written onto in place (where the solver takes
    them, as `solve(..., depthwise=...)` does, no sum of two gradients of
    the inputs follows).
    """
    maps, mean, variance = library().pde_keras_depthwise_maps(
        inputs, kernel, count=int(kernel.shape[-1]))
    if not statistics:
        return list(maps)
    # The statistics' gradient from an op of their own: the maps' op then
    # gets none where the maps have none of their own.
    inputs, mean, variance = library().pde_keras_depthwise_statistics(
        inputs, kernel, mean, variance)
    return list(maps), mean, variance, inputs


def normalization(norms, statistics=None, rows=None):
    """The batch normalisations `norms` (Keras `BatchNormalization` layers over
    the last axis) as `(scale, shift)`, `(len(rows), channels)` each: row r
    normalises as `x * scale[r] + shift[r]` what `norms[rows[r]]` normalises,
    or is the identity (1, 0) where `rows[r]` is -1 (default: one row per
    norm, in order). One kernel computes them.

    With `statistics = (mean, variance)` (the batch statistics, one per norm:
    `(len(norms), channels)` tensors, as `depthwise_maps(..., statistics=True)`
    gives them, or lists) that is the training-mode normalisation, and each
    layer's moving averages are updated as Keras does; without, the
    inference-mode one from the moving averages. Differentiable with respect
    to the statistics and each layer's gamma and beta.
    """
    import tensorflow as tf

    rows = list(range(len(norms))) if rows is None else [int(row) for row in rows]
    if statistics is None:
        mean = [norm.moving_mean for norm in norms]
        variance = [norm.moving_variance for norm in norms]
    else:
        mean, variance = (list(value) if isinstance(value, (list, tuple)) else tf.unstack(value)
                          for value in statistics)
        for norm, map_mean, map_variance in zip(norms, mean, variance):
            _update_moving_averages(norm, map_mean, map_variance)
    return library().pde_keras_normalization(
        [norm.gamma for norm in norms], [norm.beta for norm in norms], mean, variance,
        epsilon=[float(norm.epsilon) for norm in norms], rows=rows)


def batch_normalization_training(layer, inputs):
    """What `layer(inputs, training=True)` computes, for a Keras
    `BatchNormalization` over the last axis of a float32 NHWC tensor, in
    TensorFlow's fused batch-norm kernel (one pass for the statistics, one to
    normalise; Keras' own is a chain of unfused ops).

    The batch statistics are the same (the normalisation uses the biased
    batch variance); the moving averages are updated as Keras does, with the
    biased variance. Other layers (masked, renorm, no scale or centre, other
    axes) run as `layer(inputs, training=True)`.
    """
    import tensorflow as tf

    if (layer.renorm or not (layer.scale and layer.center) or layer.axis not in (-1, 3)
            or len(inputs.shape) != 4 or not layer.trainable):
        return layer(inputs, training=True)
    empty = tf.zeros((0,), "float32")
    outputs, mean, unbiased_variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=tf.cast(layer.gamma, "float32"), offset=tf.cast(layer.beta, "float32"),
        mean=empty, variance=empty, epsilon=layer.epsilon, is_training=True,
        data_format="NHWC")
    # The kernel reports the Bessel-corrected variance; Keras averages the biased one.
    count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], "float32")
    variance = unbiased_variance * ((count - 1.0) / count)
    _update_moving_averages(layer, mean, variance)
    return outputs


def _update_moving_averages(norm, mean, variance):
    """A Keras BatchNormalization's moving-average update with batch
    statistics `mean` and (biased) `variance`, as its own call makes it."""
    momentum = norm.momentum
    norm.moving_mean.assign(norm.moving_mean * momentum + mean * (1.0 - momentum))
    norm.moving_variance.assign(norm.moving_variance * momentum + variance * (1.0 - momentum))


def solve(source, initial, diffusivity, velocity, steps, dt, dx, dy, boundary, rectify=False,
          normalization=None, statistics=False, depthwise=None):
    """H^K from the kernel; every tensor float32 and shaped like `source`;
    `rectify`: ReLU the four coefficient maps (D_x, D_y, u, v) first, after
    `normalization` = (scale, shift), `(4, channels)` each, if given: map m
    becomes ReLU(map * scale[m] + shift[m]). With `statistics`, returns
    `(H^K, mean, variance)`: also H^K's batch mean and biased variance per
    channel (summed as the kernel writes H^K), differentiable like H^K.

    `depthwise = (kernel, rows)` says that map m (of D_x, D_y, u, v) is
    `depthwise_maps(initial, kernel)[rows[m]]` where `rows[m] >= 0` (each
    row at most once; -1: a map of its own). The gradient then takes those
    maps' share through the conv itself, into the gradients of `initial`
    and `kernel`, while the unit is in cache (no map's gradient is written
    out and read back); the maps themselves get none from here. So the
    maps must be exactly those outputs, and the solver their only consumer
    that a gradient is asked through."""
    import tensorflow as tf

    if normalization is None:  # the identity
        shape = tf.stack([4, tf.shape(source)[-1]])
        normalization = (tf.ones(shape), tf.zeros(shape))
    kernel, rows = depthwise if depthwise is not None else (None, [])
    solution, mean, variance = library().pde_keras_solve(
        source, initial, diffusivity[0], diffusivity[1], velocity[0], velocity[1],
        *normalization, [] if kernel is None else [kernel], steps=steps, dt=dt, dx=dx, dy=dy,
        boundary=boundary, rectify=rectify, shared_initial=source is initial,
        depthwise=[int(row) for row in rows])
    return (solution, mean, variance) if statistics else solution


def global_inference(source, initial, kernel, maps, normalization, steps, dt, dx, dy, boundary):
    """The Global layer in one kernel: with `(scale, shift) = normalization`,
    `(5, channels)` each, `normalize_relu(solve(source, initial, (D_x, D_y),
    (u, v), ..., rectify=True, normalization=(scale[:4], shift[:4])),
    scale[4], shift[4])`, D_x, D_y, u, v the depth-wise maps
    `depthwise_maps(initial, kernel)[k]` for k in `maps` (four indices); the
    maps and H^K never leave the kernel's per-unit buffers. What the layer
    runs in inference mode; differentiable (the gradient recomputes the
    three-op path)."""
    return library().pde_keras_global_inference(
        source, initial, kernel, *normalization, steps=steps, dt=dt,
        dx=dx, dy=dy, boundary=boundary, maps=[int(k) for k in maps],
        shared_initial=source is initial)


def normalize_relu(inputs, scale, shift):
    """ReLU(inputs * scale + shift) in one pass, for a float32 NHWC tensor and
    per-channel `scale`, `shift` (a batch normalisation as `normalization`
    gives it, and the ReLU after it)."""
    return library().pde_keras_normalize_relu(inputs, scale, shift)
