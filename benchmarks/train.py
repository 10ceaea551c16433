"""Training throughput and inference latency of the CIFAR models.

    python -m benchmarks.train [--jit_compile] [--output=train.json]

Measures, in one process and interleaved (one round times every model in
turn), training images/s of `model.train_on_batch` (SGD, batch 128,
synthetic CIFAR-shaped data, after warm-up; median over rounds) and
inference latency of `model.predict_on_batch` at batch 1 and 128 (median
over rounds of the mean of 20 and 3 calls), for
resnet32, resnet32_4stage and resnet32_global with K=1 and K=5. Prints a
table with ratios to resnet32.

The resnet32_global rows run once per solver path (`PDE_KERAS_SOLVER`: the
compiled kernel and the keras.ops reference on TensorFlow; `--paths`).

`resnet32_global_skeleton` is resnet32_global with its three GlobalLayers
left out (stem, four one-block stages, head): the ceiling that any speed-up
of the GlobalLayer can approach, measured in the same run.
"""

import os
import platform

from absl import app, flags

import keras
import numpy as np

import pde_keras
from pde_keras import fused_solver, run_directory
from pde_keras.models import resnet
from benchmarks import timing

FLAGS = flags.FLAGS

# name -> function returning the (uncompiled) model
MODELS = {
    "resnet32": lambda: pde_keras.models.create("resnet32"),
    "resnet32_4stage": lambda: pde_keras.models.create("resnet32_4stage"),
    "resnet32_global_K1": lambda: pde_keras.models.create("resnet32_global", steps=1),
    "resnet32_global_K5": lambda: pde_keras.models.create("resnet32_global", steps=5),
    "resnet32_global_skeleton": lambda: resnet.resnet(
        resnet.FOUR_STAGES, 1, name="resnet32_global_skeleton"),
}
# The models with GlobalLayers: measured once per solver path.
WITH_SOLVER = ("resnet32_global_K1", "resnet32_global_K5")


def define_flags():
    flags.DEFINE_integer("batch_size", 128, "Training batch size.", lower_bound=1)
    flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds; the median is reported.",
                         lower_bound=1)
    flags.DEFINE_integer("steps_per_round", 2, "Training steps timed per model and round.",
                         lower_bound=1)
    flags.DEFINE_integer("warmup", 2, "Untimed training steps of each model first.",
                         lower_bound=1)
    flags.DEFINE_multi_enum("models", list(MODELS), list(MODELS), "Models to measure.")
    flags.DEFINE_boolean("jit_compile", False, "Compile training and inference with XLA.")
    flags.DEFINE_multi_enum("paths", None, ["compiled", "reference"],
                            "Solver paths to measure (default: every path this backend has).")
    flags.DEFINE_string("output", None, "Also write the results as JSON to this path.")


def _build(name, jit_compile):
    model = MODELS[name]()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    return model


def run(names, batch_size, rounds, steps_per_round, warmup, jit_compile, paths=None):
    """Returns {model: {"train_images_per_s", "latency_ms_batch1", ...}}.

    Models with GlobalLayers are keyed `<model>/<path>`, one per solver path.
    """
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch_size, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 10, size=batch_size)
    models, model_paths = {}, {}
    for name in names:
        for path in (paths or fused_solver.available_paths()) if name in WITH_SOLVER else [None]:
            key = name if path is None else f"{name}/{path}"
            models[key], model_paths[key] = _build(name, jit_compile), path

    def on_path(key, fn):
        path = model_paths[key]
        return fn if path is None else timing.on_solver_path(path, fn)

    train = {key: on_path(key, lambda m=m: m.train_on_batch(images, labels))
             for key, m in models.items()}
    seconds = timing.measure(train, rounds, warmup, repeats=steps_per_round)
    results = {name: {"train_images_per_s": batch_size / t} for name, t in seconds.items()}
    for batch in (1, 128):
        x = images[:1] if batch == 1 else np.resize(images, (128, 32, 32, 3))
        infer = {key: on_path(key, lambda m=m: m.predict_on_batch(x)) for key, m in models.items()}
        # A batch-1 call takes milliseconds: more calls per sample steady its median.
        repeats = 20 if batch == 1 else 3
        for name, t in timing.measure(infer, rounds, 2, repeats=repeats).items():
            results[name][f"latency_ms_batch{batch}"] = t * 1e3
    base = results.get("resnet32")
    for name, r in results.items():
        if base:
            r["train_speedup_vs_resnet32"] = r["train_images_per_s"] / base["train_images_per_s"]
            for batch in (1, 128):
                r[f"latency_ratio_batch{batch}_vs_resnet32"] = (
                    r[f"latency_ms_batch{batch}"] / base[f"latency_ms_batch{batch}"])
        r["trainable_params"] = int(sum(np.prod(w.shape) for w in models[name].trainable_weights))
    return results


def main(argv):
    del argv
    timing.quiet_retracing_warnings()
    results = run(FLAGS.models, FLAGS.batch_size, FLAGS.rounds, FLAGS.steps_per_round,
                  FLAGS.warmup, FLAGS.jit_compile, FLAGS.paths)
    print(f"backend={keras.backend.backend()} jit_compile={FLAGS.jit_compile} "
          f"batch_size={FLAGS.batch_size} cpus={os.cpu_count()}")
    header = (f"{'model':<24} {'path':<10} {'params':>8} {'train img/s':>12} {'x resnet32':>10} "
              f"{'lat b1 ms':>10} {'x resnet32':>10} {'lat b128 ms':>12} {'x resnet32':>10}")
    print(header)
    for name, r in results.items():
        model, _, path = name.partition("/")
        print(f"{model:<24} {path or '-':<10} {r['trainable_params']:>8} "
              f"{r['train_images_per_s']:>12.1f} "
              f"{r.get('train_speedup_vs_resnet32', float('nan')):>10.2f} "
              f"{r['latency_ms_batch1']:>10.2f} "
              f"{r.get('latency_ratio_batch1_vs_resnet32', float('nan')):>10.2f} "
              f"{r['latency_ms_batch128']:>12.1f} "
              f"{r.get('latency_ratio_batch128_vs_resnet32', float('nan')):>10.2f}")
    if FLAGS.output:
        record = {"backend": keras.backend.backend(), "jit_compile": FLAGS.jit_compile,
                  "batch_size": FLAGS.batch_size, "machine": platform.machine(),
                  "cpus": os.cpu_count(), "pde_keras_version": pde_keras.__version__,
                  "models": results}
        run_directory.write_json(FLAGS.output, record)


if __name__ == "__main__":
    define_flags()
    app.run(main)
