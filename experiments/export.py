"""Exports a trained run's model as a TFLite file or a SavedModel, and checks it.

Example:

    python -m experiments.export --model_dir=/tmp/y --format=tflite [--quantize=float16]

Loads `MODEL_DIR/last.keras` (or `best.keras`), writes the exported model
(default `MODEL_DIR/last.tflite` or `MODEL_DIR/last_saved_model/`) with
`pde_keras.export.export_model`, runs it (TFLite interpreter / loaded
SavedModel) and the Keras model on the run's test split (the seeded subset
it was evaluated on), and writes `<out>.json` beside it: format, size,
operators, max |logit difference| on the first `--compare_examples` test
images, and both test accuracies. A TFLite file holds built-in operators
only. Errors (no model in the directory, a bad flag) end the program with
one line on stderr and exit status 1.
"""

import numpy as np
from absl import flags

from pde_keras import command_line, export, run_directory
from visualize import trained_runs

FLAGS = flags.FLAGS


def define_flags():
    command_line.define_run_dir_flag(
        "A run directory of python -m experiments.cifar / experiments.mnist (config.json, "
        "last.keras, best.keras).")
    flags.DEFINE_enum(
        "format", "tflite", export.FORMATS,
        "tflite (one file, TFLite built-in operators only) or saved_model (a directory).")
    flags.DEFINE_enum(
        "quantize", "none", export.QUANTIZATIONS,
        "TFLite only: none (float32), float16 (float16 weights) or dynamic_range (int8 "
        "weights, activations quantised on the fly).")
    flags.DEFINE_enum(
        "checkpoint", "last", tuple(run_directory.CHECKPOINTS),
        "Which saved model: last (the final model of results.json) or best.")
    flags.DEFINE_string(
        "out", None, "Where to write (default: MODEL_DIR/<checkpoint>.tflite, "
        "<checkpoint>_float16.tflite, ..., or MODEL_DIR/<checkpoint>_saved_model); the "
        "report goes to OUT.json.")
    flags.DEFINE_string(
        "data_dir", None, "Where the run's data is now, if it moved since training "
        "(default: the data_dir in the run's config).")
    flags.DEFINE_integer(
        "compare_examples", 100, "Test images on which the logits of the exported and the "
        "Keras model are compared (the first ones of the test split).", lower_bound=1)
    flags.DEFINE_integer("batch_size", 100, "Prediction batch size.", lower_bound=1)


def default_out(model_dir, checkpoint, format, quantize):
    """`MODEL_DIR/last.tflite`, `last_float16.tflite`, `last_saved_model`, ..."""
    suffix = "" if quantize == "none" else f"_{quantize}"
    name = (f"{checkpoint}{suffix}.tflite" if format == "tflite"
            else f"{checkpoint}_saved_model")
    return f"{model_dir.rstrip('/')}/{name}"


def export_run(model_dir, format, quantize="none", checkpoint="last", out=None,
               data_dir=None, compare_examples=100, batch_size=100):
    """Exports a run's model, evaluates it beside the Keras model; returns the report.

    The report (also written to `OUT.json`) holds `format`, `quantize`,
    `path`, `size_bytes`, `ops`, `custom_ops` (operators that are not TFLite
    built-ins; always empty for TFLite), `max_abs_logit_difference` over
    `compared_examples` test images, `test_examples`, `test_accuracy` (the
    exported model's), `keras_test_accuracy` and `prediction_agreement`.
    """
    export.check_options(format, quantize)  # Before the slow loading.
    run = trained_runs.TrainedRun(model_dir, checkpoint, data_dir)
    out = out or default_out(str(model_dir), checkpoint, format, quantize)
    exported = export.export_model(run.model, out, format, quantize)
    split = run.test_split
    logits = exported.predict(split.images, batch_size)
    keras_logits = run.model.predict(split.images, batch_size=batch_size, verbose=0)
    compared = min(compare_examples, len(split.labels))
    predicted, keras_predicted = logits.argmax(-1), keras_logits.argmax(-1)
    report = {
        "model_dir": str(model_dir),
        "checkpoint": checkpoint,
        "model": run.saved_config.get("model", run.model.name),
        "format": format,
        "quantize": quantize,
        "path": exported.path,
        "size_bytes": exported.size_bytes,
        "ops": exported.ops,
        "custom_ops": exported.custom_ops,
        "compared_examples": compared,
        "max_abs_logit_difference": float(np.abs(
            logits[:compared] - keras_logits[:compared]).max()),
        "test_examples": int(len(split.labels)),
        "test_accuracy": float(np.mean(predicted == split.labels)),
        "keras_test_accuracy": float(np.mean(keras_predicted == split.labels)),
        "prediction_agreement": float(np.mean(predicted == keras_predicted)),
    }
    run_directory.write_json(f"{exported.path}.json", report)
    return report


def summary(report):
    """One line: what was written, its size and operators, and how it compares."""
    return (
        f"{report['model']} ({report['checkpoint']}) -> {report['path']} ({report['format']}, "
        f"quantize={report['quantize']}): {report['size_bytes']:,} bytes, {len(report['ops'])} "
        f"op types, {len(report['custom_ops'])} custom; max |logit difference| "
        f"{report['max_abs_logit_difference']:.2e} on {report['compared_examples']} test "
        f"images; test accuracy {report['test_accuracy']:.4f} (Keras "
        f"{report['keras_test_accuracy']:.4f}) on {report['test_examples']}; report: "
        f"{report['path']}.json")


def export_from_flags():
    """Exports as the flags say and prints the summary line."""
    print(summary(export_run(
        FLAGS.model_dir, FLAGS.format, FLAGS.quantize, FLAGS.checkpoint, FLAGS.out,
        FLAGS.data_dir, FLAGS.compare_examples, FLAGS.batch_size)))


if __name__ == "__main__":
    define_flags()
    command_line.run_reporting_errors(export_from_flags)
