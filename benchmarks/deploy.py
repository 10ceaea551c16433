"""Deployed size and latency of the CIFAR models as TFLite files.

    python -m benchmarks.deploy [--threads=1] [--output=deploy.json]

Exports resnet32, resnet32_4stage and resnet32_global with K=1 and K=5 (the
raw-pixel classifiers training saves, untrained: size and latency do not
depend on the weights) with `pde_keras.export.export_model`, float32 and
each quantisation, all with TFLite built-in operators only. Measures the
file size and the TFLite interpreter's batch-1 latency, interleaved (one
round runs every file in turn; median over rounds), and prints a table with
ratios to resnet32 at the same quantisation.
"""

import os
import platform
import tempfile

from absl import app, flags

import keras
import numpy as np

import pde_keras
from pde_keras import export, run_directory, training
from benchmarks import timing, train

FLAGS = flags.FLAGS

# name -> function returning the core model (normalised images -> logits)
MODELS = {name: train.MODELS[name] for name in (
    "resnet32", "resnet32_4stage", "resnet32_global_K1", "resnet32_global_K5")}
# CIFAR-10's per-channel pixel statistics; the benchmark only needs plausible ones.
PIXEL_MEAN, PIXEL_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


def define_flags():
    flags.DEFINE_multi_enum("models", list(MODELS), list(MODELS), "Models to measure.")
    flags.DEFINE_multi_enum("quantize", list(export.QUANTIZATIONS), list(export.QUANTIZATIONS),
                            "Quantisations to measure (none: float32).")
    flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds; the median is reported.",
                         lower_bound=1)
    flags.DEFINE_integer("repeats", 5, "Back-to-back invocations per file and round.",
                         lower_bound=1)
    flags.DEFINE_integer("warmup", 3, "Untimed invocations of each file first.", lower_bound=0)
    flags.DEFINE_integer("threads", 1, "TFLite interpreter threads (1: a small device core).",
                         lower_bound=1)
    flags.DEFINE_string("output", None, "Also write the results as JSON to this path.")


def run(names, quantizations, rounds, repeats, warmup, threads):
    """Returns {model: {quantize: {"size_bytes", "latency_ms_batch1", ...}}}."""
    image = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    results, cases = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for name in names:
            model = training.build_classifier(MODELS[name](), (32, 32, 3), PIXEL_MEAN, PIXEL_STD)
            results[name] = {}
            for quantize in quantizations:
                exported = export.export_model(
                    model, os.path.join(directory, f"{name}_{quantize}.tflite"), "tflite",
                    quantize)
                results[name][quantize] = {"size_bytes": exported.size_bytes,
                                           "custom_ops": exported.custom_ops}
                runner = export.tflite_runner(exported.path, num_threads=threads)
                cases[name, quantize] = lambda runner=runner: runner(image)
            keras.backend.clear_session()
        seconds = timing.measure(cases, rounds, warmup, repeats=repeats)
    for (name, quantize), time_s in seconds.items():
        results[name][quantize]["latency_ms_batch1"] = time_s * 1e3
    base = results.get("resnet32")
    for name, by_quantize in results.items():
        for quantize, r in by_quantize.items():
            if base:
                r["size_ratio_vs_resnet32"] = r["size_bytes"] / base[quantize]["size_bytes"]
                r["latency_ratio_vs_resnet32"] = (
                    r["latency_ms_batch1"] / base[quantize]["latency_ms_batch1"])
    return results


def main(argv):
    del argv
    results = run(FLAGS.models, FLAGS.quantize, FLAGS.rounds, FLAGS.repeats, FLAGS.warmup,
                  FLAGS.threads)
    print(f"TFLite interpreter, batch 1, threads={FLAGS.threads}, rounds={FLAGS.rounds} "
          f"cpus={os.cpu_count()}")
    print(f"{'model':<20} {'quantize':<14} {'size KB':>9} {'x resnet32':>10} "
          f"{'lat b1 ms':>10} {'x resnet32':>10}")
    for name, by_quantize in results.items():
        for quantize, r in by_quantize.items():
            print(f"{name:<20} {quantize:<14} {r['size_bytes'] / 1024:>9.1f} "
                  f"{r.get('size_ratio_vs_resnet32', float('nan')):>10.2f} "
                  f"{r['latency_ms_batch1']:>10.2f} "
                  f"{r.get('latency_ratio_vs_resnet32', float('nan')):>10.2f}")
    if FLAGS.output:
        record = {"runtime": "tflite", "threads": FLAGS.threads, "batch_size": 1,
                  "machine": platform.machine(), "cpus": os.cpu_count(),
                  "pde_keras_version": pde_keras.__version__, "models": results}
        run_directory.write_json(FLAGS.output, record)


if __name__ == "__main__":
    define_flags()
    app.run(main)
