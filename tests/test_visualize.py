"""Tests of the figures (`visualize`): PNGs from tiny trained runs, the maps
written equal the layers' `coefficient_maps`, and one-line errors.

The four MNIST nets of the report's Figure 2 (2 channels) are trained once
for the module through the runners' library function (synthetic data, 1
epoch), the Perona-Malik one with `dump_maps=True`. ResNet32-Global is drawn
untrained here (tracing its training takes a minute); the slow test trains
it with `dump_maps=True` and runs `visualize.pde_maps` on it. The commands run in
subprocesses on TensorFlow; the tests marked `multibackend` run in process
on either backend.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

import pde_keras
from experiments import runner_flags
from pde_keras import training
from pde_keras.evaluation import confusion_matrix
from visualize import evaluation_figures as evaluation
from visualize import feature_figures as features
from visualize import map_figures as maps
from visualize import trained_runs as runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(data_source="synthetic", train_examples=32, test_examples=8, batch_size=16,
            jit_compile=False, verbose=0)
RUNS = {
    "conv": dict(model="mnist_conv", model_options={"channels": 2}),
    "residual": dict(model="mnist_residual", model_options={"channels": 2}),
    "pde": dict(model="mnist_pde", model_options={"channels": 2}),
    # One test image: the dump draws image 0 only (1 and 2 are beyond the split).
    "pde_pm": dict(model="mnist_pde", test_examples=1, dump_maps=True,
                   model_options={"channels": 2, "diffusivity": "perona_malik"}),
}
GLOBAL_RUN = dict(dataset="cifar10", model="resnet32_global", test_examples=1, dump_maps=True)
GLOBAL_LAYERS = ("stage1_global", "stage2_global", "stage3_global")
WRITTEN_BY = "written by pde_keras.training (python -m experiments.mnist / experiments.cifar)"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, options in RUNS.items():
        runner_flags.train(_config(options), root / name,
                           dump_maps=options.get("dump_maps", False))
    return root


def _config(options):
    """The training Config of a run of `RUNS` (dump_maps is the runner's)."""
    return training.Config(**{key: value for key, value in {**TINY, **options}.items()
                              if key != "dump_maps"})


@pytest.fixture(scope="module")
def untrained_global(tmp_path_factory):
    """A run directory as training writes it, of an untrained ResNet32-Global.

    Tracing ResNet32-Global's training takes a minute; its maps and errors
    need only the saved files (the slow test trains one).
    """
    root = tmp_path_factory.mktemp("global")
    config = _config(GLOBAL_RUN)
    _, (train_images, _), _ = training.load_splits(config)
    core = pde_keras.models.create("resnet32_global")
    model = training.build_classifier(core, (32, 32, 3), *training.channel_stats(train_images))
    model.save(root / "last.keras")
    training.write_json(root / "config.json", config.to_json())
    return root


def _run(module, *flags, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
           "KERAS_BACKEND": "tensorflow"}
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ok(process):
    assert process.returncode == 0, process.stderr[-3000:]
    return process.stdout.strip().splitlines()


def _failed_with(process, line):
    """Exit 1, `line` last on stderr, no traceback, nothing on stdout."""
    assert process.returncode == 1, (process.returncode, process.stderr[-3000:])
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1] == line
    assert process.stdout == ""


def _png(path, size):
    """Checks a non-empty PNG of `size` (width, height) with colour; returns its pixels."""
    assert path.stat().st_size > 0, path
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    assert (pixels.shape[1], pixels.shape[0]) == size, path
    colours = np.unique(pixels @ np.array([65536, 256, 1]))  # One int per RGB colour.
    assert len(colours) > 1, f"{path} is one colour"
    coloured = pixels[(pixels.max(axis=-1) - pixels.min(axis=-1)) > 40]
    assert len(np.unique(coloured @ np.array([65536, 256, 1]))) >= 16, f"{path}: no colour map"
    return pixels


def _np(tensor):
    return keras.ops.convert_to_numpy(tensor)


def _layer_inputs(model_dir, names, pixels):
    """The saved model and the inputs of its layers `names`, computed here directly."""
    model = keras.saving.load_model(str(model_dir / "last.keras"), compile=False)
    core = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    normalized = model.get_layer("normalize")(pixels[None].astype("float32"))
    inputs = [keras.Model(core.input, core.get_layer(name).input)(normalized)
              for name in names]
    return core, inputs


def _test_image(options, index):
    """Test image `index` of a run with `options`, as training loaded it."""
    _, _, (images, _) = training.load_splits(_config(options))
    return images[index]


def _check_maps_files(out, layers, overview_rows):
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"layer{i}_{name}.png" for i in range(layers) for name in maps.MAPS]
        + ["maps.npz", "overview.png"])
    for i in range(layers):
        for name in ("Dx", "Dy", "u", "v", "ux", "vy", "input", "output"):
            _png(out / f"layer{i}_{name}.png", (1200, 400))
    _png(out / "overview.png", (1800, overview_rows * 190 + 60))


def _check_global_maps(arrays, core, inputs):
    """The arrays of maps.npz equal each Global layer's coefficient_maps of its input."""
    assert list(arrays["layer_names"]) == list(GLOBAL_LAYERS)
    for i, (name, layer_input) in enumerate(zip(GLOBAL_LAYERS, inputs)):
        expected = core.get_layer(name).coefficient_maps(layer_input)
        assert {k for k in arrays if k.startswith(f"layer{i}_")} == {
            f"layer{i}_{key}" for key in [*expected, "input"]}
        for key, value in expected.items():
            np.testing.assert_allclose(arrays[f"layer{i}_{key}"], _np(value)[0],
                                       rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
        np.testing.assert_allclose(arrays[f"layer{i}_input"], _np(layer_input)[0], rtol=1e-6)
        for key in ("Dx", "Dy", "u", "v", "ux", "vy"):
            assert np.ptp(arrays[f"layer{i}_{key}"]) > 0, (name, key)  # Structure, not blank.


# ------------------------------------------------------------ PDE maps


@pytest.mark.multibackend
def test_global_layer_maps_are_their_coefficient_maps(untrained_global, tmp_path):
    paths = maps.write_run_maps(untrained_global, out_dir=tmp_path)
    assert paths == sorted(tmp_path.iterdir())
    _check_maps_files(tmp_path, 3, 3)
    arrays = np.load(tmp_path / "maps.npz")
    image = _test_image(GLOBAL_RUN, 0)
    np.testing.assert_array_equal(arrays["image"], image)
    core, inputs = _layer_inputs(untrained_global, GLOBAL_LAYERS, image)
    _check_global_maps(arrays, core, inputs)


@pytest.mark.slow
def test_cifar_run_dump_maps_and_pde_maps_command(tmp_path):
    """The acceptance: a trained ResNet32-Global's maps, at the end of training and later."""
    runner_flags.train(_config(GLOBAL_RUN), tmp_path, dump_maps=True)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["image0"]
    _check_maps_files(tmp_path / "maps" / "image0", 3, 3)
    image = _test_image(GLOBAL_RUN, 0)
    core, inputs = _layer_inputs(tmp_path, GLOBAL_LAYERS, image)
    _check_global_maps(np.load(tmp_path / "maps" / "image0" / "maps.npz"), core, inputs)

    out = tmp_path / "again"
    _ok(_run("visualize.pde_maps", f"--model_dir={tmp_path}", f"--out_dir={out}"))
    _check_maps_files(out, 3, 3)
    _check_global_maps(np.load(out / "maps.npz"), core, inputs)


def test_dump_maps_at_the_end_of_training(trained):
    """The PDE net's maps of test image 0, as `AdvectionDiffusion.coefficient_maps` gives them."""
    out = trained / "pde_pm" / "maps"
    assert sorted(p.name for p in out.iterdir()) == ["image0"]
    _check_maps_files(out / "image0", 1, 1)
    arrays = np.load(out / "image0" / "maps.npz")
    image = _test_image(RUNS["pde_pm"], 0)
    np.testing.assert_array_equal(arrays["image"], image)
    core, (layer_input,) = _layer_inputs(trained / "pde_pm", ["pde"], image)
    expected = core.get_layer("pde").coefficient_maps(layer_input)
    assert set(arrays) == {"image", "layer_names", "layer0_input",
                           *(f"layer0_{key}" for key in expected)}
    for key, value in expected.items():
        np.testing.assert_allclose(arrays[f"layer0_{key}"], _np(value)[0], rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    assert np.ptp(arrays["layer0_Dx"]) > 0  # Perona-Malik: D varies with the image.


def test_pde_maps_command_on_the_mnist_pde_net(trained, tmp_path):
    lines = _ok(_run("visualize.pde_maps", f"--model_dir={trained / 'pde'}", "--image_index=3",
                     f"--out_dir={tmp_path}"))
    assert lines == [f"wrote 10 files to {tmp_path} (overview: {tmp_path}/overview.png)"]
    _check_maps_files(tmp_path, 1, 1)
    arrays = np.load(tmp_path / "maps.npz")
    image = _test_image(RUNS["pde"], 3)
    np.testing.assert_array_equal(arrays["image"], image)
    core, (layer_input,) = _layer_inputs(trained / "pde", ["pde"], image)
    expected = core.get_layer("pde").coefficient_maps(layer_input)
    for key, value in expected.items():
        np.testing.assert_allclose(arrays[f"layer0_{key}"], _np(value)[0], rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(arrays["layer0_u"], _np(layer_input[1])[0])  # u = v = g
    np.testing.assert_array_equal(arrays["layer0_Dx"], np.ones((28, 28, 2), "float32"))


def test_pde_maps_of_an_image_file(trained, tmp_path):
    """A file of another size and mode is resized to the model's grey 28x28 input."""
    digit = np.zeros((56, 40, 3), np.uint8)
    digit[10:46, 16:24] = (255, 255, 255)
    Image.fromarray(digit).save(tmp_path / "one.png")
    paths = maps.write_run_maps(trained / "pde", image=tmp_path / "one.png")
    out = trained / "pde" / "maps" / "one"
    assert paths[0].parent == out and len(paths) == 10
    image = np.load(out / "maps.npz")["image"]
    assert image.shape == (28, 28, 1) and image.max() > 200 and image.min() == 0


# ------------------------------------------------------- other figures


def test_mnist_features_command(trained, tmp_path):
    dirs = ",".join(str(trained / name) for name in ("conv", "residual", "pde", "pde_pm"))
    lines = _ok(_run("visualize.mnist_features", f"--model_dirs={dirs}", "--image_index=1",
                     f"--out={tmp_path / 'fig2.png'}"))
    assert lines == [f"wrote {tmp_path / 'fig2.png'}"]
    _png(tmp_path / "fig2.png", (7 * 280, 340))  # Panels (a)-(g) of the report.


def test_figure2_panels(trained):
    run = runs.TrainedRun(trained / "pde_pm")
    image, caption = run.image(0)
    assert caption.startswith("test image 0 (")
    (title_f, feature), (title_v, velocity) = features.run_panels(run, image)
    assert title_f == "PDE feature map\nPerona-Malik D (lambda = 2)"
    assert title_v == "PDE velocity map (u = v)\nPerona-Malik D (lambda = 2)"
    assert feature.shape == velocity.shape == (28, 28, 2)
    assert feature.min() >= 0  # After the net's output ReLU.
    (title,), _ = zip(*features.run_panels(runs.TrainedRun(trained / "conv"), image))
    assert title == "Conv feature map"


def test_confusion_command(trained, tmp_path):
    out = tmp_path / "confusion.png"
    lines = _ok(_run("visualize.confusion",
                     f"--model_dirs={trained / 'conv'},{trained / 'pde'}",
                     "--labels=conv,pde", f"--out={out}"))
    _png(out, (2 * 560, 520))
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["class_names"] == [str(i) for i in range(10)]
    for label, name in (("conv", "conv"), ("pde", "pde")):
        entry = report["runs"][label]
        matrix = np.array(entry["matrix"])
        assert matrix.shape == (10, 10) and matrix.sum() == entry["test_examples"] == 8
        results = json.loads((trained / name / "results.json").read_text())
        assert entry["accuracy"] == pytest.approx(results["test_accuracy"])
        pair = entry["pair"]
        assert (pair["first_as_second"], pair["second_as_first"]) == (matrix[3, 5],
                                                                      matrix[5, 3])
        assert pair["examples"] == matrix[3].sum() + matrix[5].sum()
    assert lines[0].startswith("conv: accuracy ") and "3<->5 confusions: " in lines[0]
    assert lines[-1] == f"wrote {out} and {out.with_suffix('.json')}"


@pytest.mark.multibackend
def test_pair_confusion_counts():
    labels = np.array([3, 3, 3, 5, 5, 1])
    predictions = np.array([5, 3, 5, 3, 5, 1])
    matrix = confusion_matrix(labels, predictions, 10)
    assert matrix.sum() == 6 and matrix[3, 5] == 2 and matrix[5, 3] == 1
    assert evaluation.pair_confusion(matrix, 3, 5) == {
        "classes": [3, 5], "first_as_second": 2, "second_as_first": 1, "total": 3,
        "examples": 5, "percent": 60.0}


def test_curves_command(trained, tmp_path):
    dirs = ",".join(str(trained / name) for name in ("conv", "pde", "pde_pm"))
    lines = _ok(_run("visualize.curves", f"--model_dirs={dirs}", f"--out={tmp_path / 'c.png'}"))
    assert lines == [f"wrote {tmp_path / 'c.png'}"]
    # The PDE runs logged their layer's Courant numbers: a third panel.
    _png(tmp_path / "c.png", (1700, 460))
    log = evaluation.read_log(trained / "pde")
    assert list(log["epoch"]) == [1] and {"accuracy", "val_accuracy", "cross_entropy",
                                          "pde_courant"} <= set(log)
    assert len(evaluation.curves_figure([("pde", log)]).axes) == 3
    # Without PDE layers, loss and accuracy only.
    conv = evaluation.read_log(trained / "conv")
    assert not any(name.endswith("_courant") for name in conv)
    evaluation.write_curves([trained / "conv", trained / "residual"], tmp_path / "conv.png")
    _png(tmp_path / "conv.png", (1200, 460))


def test_default_labels(trained):
    dirs = [trained / "pde", trained / "pde_pm", trained / "conv", trained / "conv"]
    assert runs.labels_for(dirs) == [
        "mnist_pde (channels=2)", "mnist_pde (channels=2, diffusivity=perona_malik)",
        "mnist_conv (channels=2) [conv]", "mnist_conv (channels=2) [conv]"]
    assert runs.labels_for(dirs[:2], ["a", "b"]) == ["a", "b"]


# --------------------------------------------------------------- errors


def _raises(message):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


def test_errors(trained, untrained_global, tmp_path):
    missing, empty = tmp_path / "nowhere", tmp_path / "empty"
    empty.mkdir()
    with _raises(f"Model directory '{missing}' does not exist."):
        maps.write_run_maps(missing)
    with _raises(f"No model in '{empty}': expected last.keras, {WRITTEN_BY}."):
        maps.write_run_maps(empty)
    with _raises(f"The model in '{trained / 'conv' / 'best.keras'}' (mnist_conv_classifier) "
                 "has no PDE layers (GlobalLayer or AdvectionDiffusion): no coefficient maps "
                 "to draw."):
        maps.write_run_maps(trained / "conv", checkpoint="best")
    for index in (8, -1):
        with _raises(f"Invalid value for argument `image_index`: expected an integer in "
                     f"[0, 7] (the 8 test images of '{trained / 'pde'}'). Received: "
                     f"image_index={index}"):
            maps.write_run_maps(trained / "pde", image_index=index)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(runs.VisualizeError, match="^" + re.escape(
            f"Cannot read image '{tmp_path / 'bad.png'}': ")):
        maps.write_run_maps(trained / "pde", image=tmp_path / "bad.png")
    with _raises(f"The model in '{untrained_global / 'last.keras'}' "
                 "(resnet32_global_classifier) has no layer 'output_relu': expected an MNIST "
                 "illustrative net (mnist_conv, mnist_residual, mnist_pde)."):
        features.write_figure2([untrained_global], tmp_path / "f.png")
    with _raises("The models take images of different shapes ((28, 28, 1), (32, 32, 3)): "
                 "expected runs on one dataset."):
        features.write_figure2([trained / "pde", untrained_global], tmp_path / "f.png")
    with _raises("Invalid value for argument `pair`: expected two different class indices in "
                 "[0, 9]. Received: pair='3,3'"):
        evaluation.write_confusion([trained / "conv"], tmp_path / "c.png", pair=("3", "3"))
    with _raises("Invalid value for argument `labels`: expected one label per model "
                 "directory (2). Received: labels=['a']"):
        evaluation.write_curves([trained / "conv", trained / "pde"], tmp_path / "c.png",
                                labels=["a"])
    with _raises(f"No training log in '{empty}': expected log.csv, {WRITTEN_BY}."):
        evaluation.write_curves([empty], tmp_path / "c.png")
    # Garbled run files: one line naming the file.
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "config.json").write_text((trained / "conv" / "config.json").read_text())
    (garbled / "log.csv").write_text("epoch,loss\n0,0.5\n1,0.4?\n")
    with _raises(f"Cannot read '{garbled / 'log.csv'}': could not convert string to float: "
                 "'0.4?'"):
        evaluation.write_curves([garbled], tmp_path / "c.png")
    (garbled / "config.json").write_text("{")
    with _raises(f"Cannot read '{garbled / 'config.json'}': Expecting property name enclosed "
                 "in double quotes: line 1 column 2 (char 1)"):
        runs.read_config(garbled)
    assert not (tmp_path / "f.png").exists() and not (tmp_path / "c.png").exists()


@pytest.mark.multibackend
def test_dump_maps_needs_pde_layers(tmp_path):
    with _raises("Invalid value for argument `dump_maps`: expected False for model "
                 "'mnist_conv', which has no PDE layers (GlobalLayer, AdvectionDiffusion). "
                 "Received: dump_maps=True"):
        runner_flags.train(_config(RUNS["conv"]), tmp_path, dump_maps=True)
    assert not (tmp_path / "log.csv").exists()
    with _raises("Invalid value for argument `dump_maps`: expected True or False. "
                 "Received: dump_maps=1"):
        runner_flags.train(_config(RUNS["conv"]), tmp_path, dump_maps=1)


def test_command_error_is_one_line(trained):
    _failed_with(
        _run("visualize.pde_maps", f"--model_dir={trained / 'conv'}", timeout=120),
        f"error: The model in '{trained / 'conv' / 'last.keras'}' (mnist_conv_classifier) "
        "has no PDE layers (GlobalLayer or AdvectionDiffusion): no coefficient maps to draw.")


def test_runner_dump_maps_flag(tmp_path):
    """--dump_maps reaches the training config: a model without PDE layers is refused."""
    _failed_with(
        _run("experiments.mnist", "--backbone=conv", "--channels=1", "--data_source=synthetic",
             "--train_examples=32", "--test_examples=8", "--epochs=1", "--dump_maps",
             f"--model_dir={tmp_path}", timeout=120),
        "error: Invalid value for argument `dump_maps`: expected False for model "
        "'mnist_conv', which has no PDE layers (GlobalLayer, AdvectionDiffusion). "
        "Received: dump_maps=True")
