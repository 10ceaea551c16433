"""The training library: config checks, schedules, input pipeline, weight decay,
outputs, resume after a crash and NaN handling (backend-agnostic)."""

import csv
import json
import math
import re

import keras
import numpy as np
import pytest

from pde_keras import data, inspection, training
from pde_keras.training import Config

from run_helpers import TINY, invalid_argument

pytestmark = pytest.mark.multibackend



# ---------------------------------------------------------------- schedules


def _rates(schedule, steps):
    return np.array([float(schedule(step)) for step in steps])


def test_cosine_schedule_decays_to_zero_over_all_steps():
    schedule = training.make_schedule(Config(epochs=4, learning_rate=0.1), 10)
    np.testing.assert_allclose(
        _rates(schedule, [0, 20, 40]), [0.1, 0.05, 0.0], atol=1e-7)


def test_cosine_schedule_with_warmup():
    config = Config(epochs=4, learning_rate=0.1, warmup_epochs=1)
    schedule = training.make_schedule(config, 10)
    np.testing.assert_allclose(
        _rates(schedule, [0, 5, 10, 25, 40]), [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-7)


def test_step_schedule_changes_at_the_milestone_epochs():
    # The classic x0.2 at epochs 60/120/160 of 200, 10 steps per epoch.
    config = Config(epochs=200, learning_rate=0.1, schedule="step",
                    step_milestones=(0.3, 0.6, 0.8), step_factor=0.2)
    schedule = training.make_schedule(config, 10)
    rates = _rates(schedule, [0, 599, 600, 1199, 1200, 1599, 1600, 1999])
    np.testing.assert_allclose(
        rates, [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008], rtol=1e-6)


def test_step_schedule_defaults_to_the_authors():
    # MultiStepLR(milestones=[150, 225], gamma=0.1) over 300 epochs.
    schedule = training.make_schedule(Config(epochs=300, schedule="step"), 1)
    np.testing.assert_allclose(
        _rates(schedule, [149, 150, 224, 225]), [0.01, 0.001, 0.001, 0.0001], rtol=1e-6)


# ------------------------------------------------------------- weight decay


def _tiny_classifier():
    core = keras.Sequential([
        keras.Input((28, 28, 1)), keras.layers.Conv2D(2, 3),
        keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10)])
    return training.build_classifier(core, (28, 28, 1), [33.0], [78.0])


def test_weight_decay_is_l2_on_every_trainable_variable():
    model = _tiny_classifier()
    training._apply_weight_decay(model, Config(weight_decay=0.01))
    penalty = float(sum(keras.ops.convert_to_numpy(loss) for loss in model.losses))
    expected = 0.01 / 2 * sum(
        float(np.sum(np.square(keras.ops.convert_to_numpy(v))))
        for v in model.trainable_variables)
    assert len(model.trainable_variables) == 6  # conv kernel+bias, BN gamma+beta, dense
    assert penalty == pytest.approx(expected, rel=1e-5)


def test_decoupled_weight_decay_adds_no_penalty():
    model = _tiny_classifier()
    training._apply_weight_decay(model, Config(weight_decay=0.01,
                                               decoupled_weight_decay=True))
    assert model.losses == []


def test_pde_layers_courant_numbers_are_logged_per_epoch(tmp_path):
    config = Config(epochs=2, **{**TINY, "model": "mnist_pde"})
    results = training.train_and_evaluate(config, tmp_path)
    rows = _log_rows(tmp_path)
    assert results["stability"] == {"pde": {
        number: [float(row[f"pde_{number}"]) for row in rows]
        for number in ("courant", "diffusion_number")}}
    # D = 1 with dt = 0.2, dx = dy = 1: diffusion number 0.4; the velocity is learned.
    assert results["stability"]["pde"]["diffusion_number"] == pytest.approx([0.4, 0.4])
    assert all(c > 0 for c in results["stability"]["pde"]["courant"])
    # The logged numbers are those of the final model on the first 64 test images.
    last = keras.saving.load_model(tmp_path / "last.keras")
    images = training.load_splits(config)[2][0][:training.STABILITY_IMAGES]
    assert inspection.stability_numbers(last, images)["pde"]["courant"] == pytest.approx(
        results["stability"]["pde"]["courant"][-1], rel=1e-5)


def test_classifier_normalises_per_channel():
    core = keras.Sequential([keras.Input((2, 2, 3)), keras.layers.Flatten()])
    model = training.build_classifier(core, (2, 2, 3), [10.0, 20.0, 30.0], [1.0, 2.0, 5.0])
    pixels = np.tile(np.array([11.0, 24.0, 25.0], np.float32), (1, 2, 2, 1))
    out = keras.ops.convert_to_numpy(model(pixels))
    np.testing.assert_allclose(out.reshape(4, 3), [[1.0, 2.0, -1.0]] * 4, atol=1e-5)


# ---------------------------------------------------------- whole runs


def _log_rows(workdir):
    with open(workdir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_and_evaluate_writes_every_output(tmp_path):
    config = Config(epochs=2, **TINY)
    results = training.train_and_evaluate(config, tmp_path)

    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["config"] == config.to_json() == json.loads(
        (tmp_path / "config.json").read_text())
    assert results["epochs"] == 2 and results["resumed_from_epoch"] == 0
    assert results["trainable_params"] == 522
    assert results["macs"]["paper"] > 0 and results["macs"]["total"] >= results["macs"]["paper"]
    assert results["train_examples"] == 128 and results["test_examples"] == 32
    assert results["version"] == training.pde_keras.__version__
    assert 0 <= results["test_accuracy"] <= 1 and math.isfinite(results["test_loss"])
    assert [row["epoch"] for row in _log_rows(tmp_path)] == ["0", "1"]
    # Per-epoch training time (before the evaluation) and the throughput over all epochs.
    train_times = [float(row["train_time_s"]) for row in _log_rows(tmp_path)]
    assert all(t > 0 for t in train_times)
    assert results["train_images_per_s"] == pytest.approx(2 * 128 / sum(train_times), rel=1e-3)
    assert results["stability"] == {}  # No PDE layers.
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert not (tmp_path / "backup").exists()
    assert not list(tmp_path.glob(".results.json.*"))  # no temporary files left

    # The last checkpoint is the evaluated model and takes raw pixels.
    dataset = data.load("mnist", "synthetic", synthetic_sizes=(128, 32))
    last = keras.saving.load_model(tmp_path / "last.keras")
    predictions = np.argmax(last.predict(dataset.test_images.astype("float32"), verbose=0), 1)
    assert np.mean(predictions == dataset.test_labels) == pytest.approx(
        results["test_accuracy"])
    assert keras.saving.load_model(tmp_path / "best.keras").count_params() == \
        last.count_params()


class _Crash(keras.callbacks.Callback):
    """Raises at the start of epoch `at`; records the optimizer's step count."""

    def __init__(self, at=None):
        super().__init__()
        self.at, self.iterations = at, {}

    def on_epoch_begin(self, epoch, logs=None):
        self.iterations[epoch] = int(keras.ops.convert_to_numpy(
            self.model.optimizer.iterations))
        if epoch == self.at:
            raise KeyboardInterrupt


def test_rerun_after_a_crash_resumes_from_the_backup(tmp_path):
    config = Config(epochs=3, **TINY)
    with pytest.raises(KeyboardInterrupt):
        training.train_and_evaluate(config, tmp_path, callbacks=[_Crash(at=2)])
    assert [(backup.epoch, backup.step)
            for backup in training.find_backups(tmp_path)][0] == (2, 0)

    crash = _Crash()
    results = training.train_and_evaluate(config, tmp_path, callbacks=[crash])
    assert crash.iterations == {2: 8}  # Resumed at epoch 2, optimizer state restored.
    assert results["resumed_from_epoch"] == 2 and results["epochs"] == 3
    assert [row["epoch"] for row in _log_rows(tmp_path)] == ["0", "1", "2"]
    assert not (tmp_path / "backup").exists()


def test_resume_refuses_a_backup_of_another_model(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        training.train_and_evaluate(Config(epochs=2, **TINY), tmp_path,
                                    callbacks=[_Crash(at=1)])
    other = Config(epochs=2, **{**TINY, "model": "mnist_residual"})
    with invalid_argument(
        "workdir", "a new directory, or the one of a run with model='mnist_conv' to "
        "resume it (it holds that run's backup, and this run has model='mnist_residual')",
        repr(str(tmp_path)),
    ):
        training.train_and_evaluate(other, tmp_path)


class _Poison(keras.callbacks.Callback):
    """Sets a kernel to NaN at the start of epoch `at`."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            variable = self.model.trainable_variables[0]
            variable.assign(np.full(variable.shape, np.nan, "float32"))


def test_nan_stops_training_and_keeps_the_last_good_backup(tmp_path):
    with pytest.raises(training.TrainingDivergedError, match="^" + re.escape(
        "Training diverged: the loss became nan in epoch 2; the backup of the last good "
        f"epoch is kept in '{tmp_path / 'backup'}' (re-running resumes from it; lower "
        "learning_rate first).") + "$"):
        training.train_and_evaluate(Config(epochs=3, **TINY), tmp_path,
                                    callbacks=[_Poison(at=1)])
    assert [(backup.epoch, backup.step)
            for backup in training.find_backups(tmp_path)][0] == (1, 0)
    assert not (tmp_path / "results.json").exists()


def test_seeded_deterministic_runs_repeat_exactly(tmp_path):
    config = Config(epochs=1, deterministic=True, augmentation="crop_flip", **TINY)
    try:
        first, second = (training.train_and_evaluate(config, tmp_path / run)
                         for run in ("a", "b"))
    finally:
        if keras.backend.backend() == "tensorflow":  # Op determinism is process-wide.
            from tensorflow.python.framework import config as tf_config

            tf_config.disable_op_determinism()
    assert (first["test_loss"], first["test_accuracy"]) == (
        second["test_loss"], second["test_accuracy"])
    weights = [keras.saving.load_model(tmp_path / run / "last.keras").get_weights()
               for run in ("a", "b")]
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_mixed_precision_and_xla(tmp_path):
    config = Config(epochs=1, mixed_precision=True, jit_compile=True, **TINY)
    results = training.train_and_evaluate(config, tmp_path)
    assert math.isfinite(results["test_loss"])
    assert keras.config.dtype_policy().name == "float32"  # restored
    model = keras.saving.load_model(tmp_path / "last.keras", compile=False)
    assert model.output.dtype == "float32"
    convs = [layer for layer in model.get_layer("mnist_conv").layers
             if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(c.dtype_policy.name == "mixed_float16" for c in convs)
