"""Deployment: a Keras classifier as a TensorFlow SavedModel or a TFLite file.

`export_model(model, path, format, quantize)` writes the file (atomically)
and returns an `ExportedModel`: its size, the operators it uses, and a
`predict` that runs it (the TFLite interpreter, or the loaded SavedModel),
so that callers compare it with the Keras model.

Both formats are traced inside `pde_keras.solver.builtin_ops_only()`: the
Global layers' periodic neighbours become slices + concatenation, so a
TFLite file holds TFLite built-in operators only (the converter is told to
fail otherwise) and runs on the plain TFLite / LiteRT runtime, without the
Select-TF-ops runtime. Export never uses a custom op. The training path
keeps TensorFlow's `Roll`. The model's raw-pixel normalisation stays inside
the exported model; the converter folds inference-mode batch norms into
the convolutions in front of them where it can.
"""

import dataclasses
import os
import pathlib
import shutil
import tempfile
import warnings

import keras
import numpy as np

from pde_keras import solver, validation

FORMATS = ("saved_model", "tflite")
QUANTIZATIONS = ("none", "float16", "dynamic_range")


@dataclasses.dataclass
class ExportedModel:
    """An exported model file and how to run it.

    Attributes:
        path: the TFLite file or the SavedModel directory.
        format: `"tflite"` or `"saved_model"`.
        quantize: `"none"`, `"float16"` or `"dynamic_range"` (TFLite only).
        size_bytes: the file's size (a SavedModel: all its files).
        ops: sorted operator names: TFLite operators (built-in names such as
            `"CONV_2D"`; a custom or Select-TF op would appear by its custom
            name, e.g. `"FlexRoll"`), or the SavedModel's TensorFlow op types.
        custom_ops: the TFLite operators among `ops` that are not built-ins
            (custom or Select-TF ops); empty for every file `export_model`
            writes. Empty for a SavedModel.
    """

    path: str
    format: str
    quantize: str
    size_bytes: int
    ops: list
    custom_ops: list

    def predict(self, images, batch_size=100):
        """Runs the exported model on `images` (raw pixels, NHWC) in batches.

        Returns:
            float32 logits, one row per image.
        """
        runner = self._runner()
        images = np.asarray(images, dtype=np.float32)
        batches = [runner(images[start:start + batch_size])
                   for start in range(0, len(images), batch_size)]
        return np.concatenate(batches).astype(np.float32)

    def _runner(self):
        if self.format == "tflite":
            return tflite_runner(self.path)
        import tensorflow as tf

        loaded = tf.saved_model.load(self.path)  # Its variables live as long as it does.
        return lambda batch: loaded.serve(tf.constant(batch)).numpy()


def export_model(model, path, format="tflite", quantize="none"):
    """Exports `model` (an inference-mode Keras classifier) to `path`.

    Args:
        model: a Keras model with one image input of known height, width and
            channels (e.g. a run's `last.keras`, which takes raw pixels).
        path: the file to write (`"tflite"`), or the directory
            (`"saved_model"`); replaced atomically if it exists.
        format: one of `FORMATS`.
        quantize: one of `QUANTIZATIONS`: `"none"` (float32),
            `"float16"` (float16 weights, computed in float32) or
            `"dynamic_range"` (int8 weights, activations quantised on the
            fly). TFLite only.

    Returns:
        An `ExportedModel`.

    Raises:
        ValueError: an unknown format or quantisation, quantisation of a
            SavedModel, another Keras backend than TensorFlow, or a model the
            TFLite built-in operators cannot express.
    """
    format, quantize = check_options(format, quantize)
    if keras.backend.backend() != "tensorflow":
        raise ValueError("Export traces the model with TensorFlow: run it with "
                         f"KERAS_BACKEND=tensorflow (the backend is {keras.backend.backend()!r}).")
    path = pathlib.Path(path)
    if format == "tflite":
        _write_bytes_atomically(path, _tflite_bytes(model, quantize))
        ops, custom_ops = tflite_ops(path)
        size = path.stat().st_size
    else:
        _export_saved_model(model, path)
        ops, custom_ops = _saved_model_ops(path), []
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return ExportedModel(str(path), format, quantize, size, ops, custom_ops)


def check_options(format, quantize):
    """Returns `(format, quantize)` if `export_model` takes them, else raises ValueError."""
    format = validation.check_choice("format", format, FORMATS)
    quantize = validation.check_choice("quantize", quantize, QUANTIZATIONS)
    if format == "saved_model" and quantize != "none":
        raise validation.invalid("quantize", "'none' for format 'saved_model' (quantisation "
                                 "is a TFLite conversion)", quantize)
    return format, quantize


def _serving_function(model):
    """The model's inference-mode call, traced with any batch size."""
    import tensorflow as tf

    spec = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32, name="pixels")

    @tf.function(input_signature=[spec])
    def serve(pixels):
        return model(pixels, training=False)

    with solver.builtin_ops_only():
        return serve.get_concrete_function()


def _tflite_bytes(model, quantize):
    import tensorflow as tf

    from tensorflow.python.framework import convert_to_constants

    # Variables frozen here, not by the converter: given the model to track,
    # it left ResNet32's weights as uninitialised resource variables (NaN).
    frozen = convert_to_constants.convert_variables_to_constants_v2(_serving_function(model))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    # Built-in operators only: the converter fails rather than add Select-TF ops.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    try:
        return converter.convert()
    except Exception as error:  # The converter raises its own ConverterError.
        lines = [line.strip() for line in str(error).splitlines() if "ops are not supported"
                 in line or "Select" in line]
        raise ValueError(
            f"Cannot convert {model.name!r} to TFLite with built-in operators only: "
            f"{lines[0] if lines else type(error).__name__}") from None


def _export_saved_model(model, path):
    """Exports into a temporary sibling directory, then swaps it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        with solver.builtin_ops_only():
            model.export(str(staging), format="tf_saved_model", verbose=False)
        previous = None
        if path.exists():
            previous = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, previous / "old")
        os.replace(staging, path)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _saved_model_ops(path):
    """TensorFlow op types of the SavedModel's serving graph and its functions."""
    import tensorflow as tf

    graph = tf.saved_model.load(str(path)).signatures["serve"].graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return sorted({node.op for node in nodes})


def _write_bytes_atomically(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as f:
        f.write(content)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def tflite_ops(path):
    """The operators of a TFLite file, read from its flat buffer's operator codes.

    Returns:
        `(ops, custom_ops)`, sorted names: every operator, built-ins by their
        `BuiltinOperator` name (`"CONV_2D"`), custom operators (Select-TF ops
        included: `"FlexRoll"`) by their custom name; and the custom ones.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    names = {value: name for name, value in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
    model = flatbuffer_utils.read_model(str(path))
    ops, custom_ops = set(), set()
    for code in model.operatorCodes:
        # Codes above 127 live in builtinCode only, older files' in the deprecated field.
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = code.customCode
            custom_ops.add(custom.decode() if isinstance(custom, bytes) else str(custom))
        else:
            ops.add(names[builtin])
    return sorted(ops | custom_ops), sorted(custom_ops)


def tflite_runner(path, num_threads=None):
    """A callable `batch -> logits` over a TFLite interpreter of the file `path`.

    The interpreter is resized when the batch size changes.
    """
    import tensorflow as tf

    with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice.
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=num_threads)
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    shape = [None]

    def run(batch):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if shape[0] != batch.shape:
            interpreter.resize_tensor_input(source["index"], batch.shape)
            interpreter.allocate_tensors()
            shape[0] = batch.shape
        interpreter.set_tensor(source["index"], batch)
        interpreter.invoke()
        return interpreter.get_tensor(target["index"])

    return run
