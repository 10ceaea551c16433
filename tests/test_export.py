"""Export: TFLite files with built-in operators only and SavedModels, compared with
the Keras model they come from; quantised files on real CIFAR-10 images; the
`experiments.export` runner and its one-line errors."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from pde_keras import GlobalLayer, export, fused_solver, solver, training
from test_runners import JPEG_TARBALL, _failed_with, _run, extract_jpeg_subset

# Every diffusivity, velocity, init and boundary, and each use of the periodic
# neighbours (stencil, central differences of u and v, Perona-Malik's Sobel).
LAYER_OPTIONS = [
    dict(diffusivity="depthwise", velocity="depthwise", init="identity", boundary="periodic"),
    dict(diffusivity="constant", velocity="identity", init="residual", boundary="neumann"),
    dict(diffusivity="perona_malik", velocity="residual", init="identity", boundary="dirichlet"),
    dict(diffusivity="residual", velocity="zero", init="residual", boundary="periodic"),
    dict(diffusivity="zero", velocity="depthwise", init="identity", boundary="neumann"),
    dict(diffusivity="perona_malik", velocity="identity", init="identity", boundary="periodic"),
]
FLOAT32_TOLERANCE = 1e-4


def _randomise_batch_norms(model, seed=0):
    """Moving statistics and affine weights away from 1 and 0, so that folding shows."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape, name = tuple(variable.shape), variable.path.rsplit("/", 1)[-1]
        if name in ("moving_variance", "gamma"):
            variable.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
        elif name in ("moving_mean", "beta"):
            variable.assign(rng.normal(0, 0.1, shape).astype("float32"))


def _every_option_classifier(image_shape=(8, 8, 3), classes=5):
    """Raw pixels -> Normalization -> conv -> one GlobalLayer per LAYER_OPTIONS -> logits.

    Layer normalisations between the Global layers keep each one's input of
    order 1 (six untrained layers in a row grow it to ~1e7 otherwise).
    """
    keras.utils.set_random_seed(1)
    core_inputs = keras.Input(image_shape)
    x = keras.layers.Conv2D(4, 3, padding="same")(core_inputs)
    for i, options in enumerate(LAYER_OPTIONS):
        x = GlobalLayer(steps=2, name=f"global{i}", **options)(x)
        x = keras.layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    core = keras.Model(core_inputs, keras.layers.Dense(classes)(x), name="every_option")
    model = training.build_classifier(core, image_shape, [120.0, 115.0, 100.0],
                                      [60.0, 62.0, 66.0])
    _randomise_batch_norms(model)
    return model


@pytest.fixture(scope="module")
def every_option_model():
    model = _every_option_classifier()
    pixels = np.random.default_rng(2).uniform(0, 255, (6, 8, 8, 3)).astype("float32")
    return model, pixels, model.predict(pixels, verbose=0)


def test_builtin_periodic_neighbours_equal_roll():
    field = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype("float32")
    for axis in (solver.X_AXIS, solver.Y_AXIS):
        with solver.builtin_ops_only():
            following, preceding = solver.neighbours(field, axis, "periodic")
        np.testing.assert_array_equal(following, np.roll(field, -1, axis))
        np.testing.assert_array_equal(preceding, np.roll(field, 1, axis))


def test_tflite_has_builtin_ops_only_and_matches_keras(every_option_model, tmp_path):
    model, pixels, expected = every_option_model
    exported = export.export_model(model, tmp_path / "m.tflite", "tflite")
    assert exported.custom_ops == []
    # An independent reading of the operators: the interpreter's own list.
    interpreter = tf.lite.Interpreter(model_path=exported.path)
    interpreter_ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not [op for op in interpreter_ops if "Flex" in op or "Roll" in op.title()
                or op == "CUSTOM"], interpreter_ops
    assert interpreter_ops <= set(exported.ops) and "WHILE" in exported.ops
    assert exported.size_bytes == (tmp_path / "m.tflite").stat().st_size
    # The raw-pixel normalisation is inside: raw pixels in, the Keras logits out.
    logits = exported.predict(pixels, batch_size=4)
    assert np.abs(expected).max() > 0.1  # Not vanishing logits.
    np.testing.assert_allclose(logits, expected, rtol=0, atol=FLOAT32_TOLERANCE)
    # Training keeps TensorFlow's Roll (one kernel each way).
    graph = tf.function(lambda x: model(x)).get_concrete_function(
        tf.TensorSpec((1, 8, 8, 3))).graph
    assert "Roll" in {op.type for op in graph.get_operations()}


@pytest.mark.skipif(fused_solver.library() is None, reason="the compiled kernel cannot be built")
def test_export_never_uses_the_compiled_kernel(every_option_model, tmp_path):
    """With the compiled solver forced, Keras runs the kernel but exports hold no custom op."""
    model, pixels, expected = every_option_model
    with fused_solver.solver_path("compiled"):
        graph = tf.function(lambda x: model(x)).get_concrete_function(
            tf.TensorSpec((1, 8, 8, 3))).graph
        assert any(op.type.startswith("PdeKeras") for op in graph.get_operations())
        exported = export.export_model(model, tmp_path / "m.tflite", "tflite")
    assert exported.custom_ops == []
    np.testing.assert_allclose(exported.predict(pixels, batch_size=4), expected, rtol=0,
                               atol=FLOAT32_TOLERANCE)


def test_saved_model_matches_keras(every_option_model, tmp_path):
    model, pixels, expected = every_option_model
    exported = export.export_model(model, tmp_path / "saved", "saved_model")
    assert "Roll" not in exported.ops and exported.size_bytes > 0
    np.testing.assert_allclose(exported.predict(pixels), expected, rtol=0,
                               atol=FLOAT32_TOLERANCE)
    # Exporting again replaces the directory.
    export.export_model(model, tmp_path / "saved", "saved_model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_bad_arguments_fail_with_one_line(every_option_model, tmp_path):
    model = every_option_model[0]
    with pytest.raises(ValueError, match="format"):
        export.export_model(model, tmp_path / "m.onnx", "onnx")
    with pytest.raises(ValueError, match="quantize"):
        export.export_model(model, tmp_path / "m", "saved_model", "float16")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------- quantisation, real images

TRAIN_PER_CLASS, TEST_PER_CLASS = 50, 30
# Quantised against float32 Keras, on 300 real test images. Measured: float16
# changed no prediction, dynamic range 2 of 300 (accuracy 0.287 vs 0.283).
ACCURACY_TOLERANCE = {"float16": 0.01, "dynamic_range": 0.04}
AGREEMENT_AT_LEAST = {"float16": 0.99, "dynamic_range": 0.9}


@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    """50 training and 30 test images of each class, as uint8 arrays."""
    if not JPEG_TARBALL.exists():
        pytest.skip("no CIFAR-10 JPEG copy here")
    root = extract_jpeg_subset(tmp_path_factory.mktemp("cifar10-jpeg"), TRAIN_PER_CLASS,
                               TEST_PER_CLASS)
    classes = sorted(p.name for p in (root / "train").iterdir())
    splits = {}
    for split in ("train", "test"):
        files = [(f, label) for label, name in enumerate(classes)
                 for f in sorted((root / split / name).iterdir())]
        images = np.stack([np.asarray(keras.utils.load_img(f)) for f, _ in files])
        splits[split] = (images, np.array([label for _, label in files]))
    return splits


def test_quantised_accuracy_on_real_images(real_images, tmp_path):
    """A small Global-layer net trained briefly on 500 images; tested on 300."""
    (train_x, train_y), (test_x, test_y) = real_images["train"], real_images["test"]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(x))
    x = GlobalLayer(steps=2)(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    core = keras.Model(inputs, keras.layers.Dense(10)(x), name="small_global")
    model = training.build_classifier(core, (32, 32, 3), train_x.mean((0, 1, 2)),
                                      train_x.std((0, 1, 2)))
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train_x.astype("float32"), train_y, batch_size=50, epochs=6, verbose=0)
    keras_predicted = model.predict(test_x.astype("float32"), verbose=0).argmax(-1)
    keras_accuracy = np.mean(keras_predicted == test_y)
    assert keras_accuracy > 0.2  # Learnt something (chance: 0.1; measured 0.28).
    for quantize, tolerance in ACCURACY_TOLERANCE.items():
        exported = export.export_model(model, tmp_path / f"{quantize}.tflite", "tflite", quantize)
        assert exported.custom_ops == []
        predicted = exported.predict(test_x).argmax(-1)
        accuracy, agreement = np.mean(predicted == test_y), np.mean(predicted == keras_predicted)
        assert abs(accuracy - keras_accuracy) <= tolerance, (quantize, accuracy, keras_accuracy)
        assert agreement >= AGREEMENT_AT_LEAST[quantize], (quantize, agreement)


# ------------------------------------------------------------------ runner


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as experiments.cifar writes it: a model and its config (synthetic)."""
    run = tmp_path_factory.mktemp("run")
    model = _every_option_classifier((32, 32, 3), 10)
    model.save(run / "last.keras")
    config = {"dataset": "cifar10", "model": "resnet32_global", "data_source": "synthetic",
              "train_examples": 64, "test_examples": 40, "seed": 0}
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_runner_writes_the_file_and_its_report(run_dir):
    process = _run(["-m", "experiments.export", f"--model_dir={run_dir}",
                    "--format=tflite", "--compare_examples=30"])
    assert process.returncode == 0, process.stderr[-3000:]
    path = run_dir / "last.tflite"
    report = json.loads((run_dir / "last.tflite.json").read_text())
    assert process.stdout.strip().splitlines()[-1].endswith(f"report: {path}.json")
    assert report["path"] == str(path) and report["size_bytes"] == path.stat().st_size
    assert report["format"] == "tflite" and report["quantize"] == "none"
    assert report["custom_ops"] == [] and report["ops"] == export.tflite_ops(path)[0]
    assert report["compared_examples"] == 30 and report["test_examples"] == 40
    assert report["max_abs_logit_difference"] <= FLOAT32_TOLERANCE
    assert report["test_accuracy"] == report["keras_test_accuracy"]


def test_runner_errors_are_one_line(run_dir, tmp_path):
    process = _run(["-m", "experiments.export", f"--model_dir={tmp_path}"])
    _failed_with(process, f"error: No model in {str(tmp_path)!r}: expected last.keras, "
                 "written by pde_keras.training (python -m experiments.mnist / "
                 "experiments.cifar).")
    process = _run(["-m", "experiments.export", f"--model_dir={run_dir}", "--format=onnx"])
    _failed_with(process, "error: flag --format=onnx: value should be one of "
                 "<saved_model|tflite> (see --helpfull)")
    process = _run(["-m", "experiments.export", f"--model_dir={run_dir}",
                    "--format=saved_model", "--quantize=float16"])
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith(
        "error: Invalid value for argument `quantize`: expected 'none' for format")


def test_deploy_benchmark_reports_size_and_latency():
    from benchmarks import deploy

    results = deploy.run(["resnet32", "resnet32_global_K1"], ["none"], rounds=1, repeats=1,
                         warmup=0, threads=1)
    for name, params in (("resnet32", 469_370), ("resnet32_global_K1", 163_578)):
        r = results[name]["none"]
        assert r["custom_ops"] == [] and r["latency_ms_batch1"] > 0
        # The weights are in the file as float32 constants, not uninitialised variables
        # (folded batch norms keep 1-2 of their 4 numbers per channel).
        assert 3.2 * params < r["size_bytes"] < 4 * params + 200_000, (name, r["size_bytes"])
    assert results["resnet32"]["none"]["latency_ratio_vs_resnet32"] == 1.0
