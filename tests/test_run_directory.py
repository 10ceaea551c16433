"""`pde_keras.run_directory`: atomic writes, readers of a run's files with
one-line errors, and the one "same run" rule (backend-agnostic)."""

import json
import re

import pytest

from pde_keras import config, run_directory
from pde_keras.run_directory import UnreadableFileError

pytestmark = pytest.mark.multibackend


def _unreadable(path, reason):
    return pytest.raises(UnreadableFileError, match="^" + re.escape(
        f"cannot read {str(path)!r}: {reason}") + "$")


def test_write_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "results.json"
    run_directory.write_json(path, {"a": [1, 2.5], "b": None})
    assert json.loads(path.read_text()) == {"a": [1, 2.5], "b": None}
    run_directory.write_json(path, {"a": 3})  # Replaces, leaves no temporary file.
    assert run_directory.read_json(path) == {"a": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_read_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_directory.read_json(tmp_path / "missing.json")
    garbled = tmp_path / "garbled.json"
    garbled.write_text("{'a': 1}")
    with _unreadable(garbled, "Expecting property name enclosed in double quotes: line 1 "
                              "column 2 (char 1)"):
        run_directory.read_json(garbled)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with _unreadable(listed, "a JSON list, not an object"):
        run_directory.read_json(listed)


def test_read_config_falls_back_to_the_copy_in_the_results(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_directory.read_config(tmp_path)
    run_directory.write_json(tmp_path / "results.json", {"config": {"model": "resnet32"}})
    assert run_directory.read_config(tmp_path) == {"model": "resnet32"}
    run_directory.write_json(tmp_path / "config.json", {"model": "mnist_pde"})
    assert run_directory.read_config(tmp_path) == {"model": "mnist_pde"}
    (tmp_path / "config.json").unlink()
    run_directory.write_json(tmp_path / "results.json", {"config": 3})
    with _unreadable(tmp_path / "results.json", "it has no 'config' object"):
        run_directory.read_config(tmp_path)


def _write_log(path, text):
    path.write_text(text)
    return path


def test_read_log_columns_with_missing_values(tmp_path):
    path = _write_log(tmp_path / "log.csv", "epoch,accuracy,val_accuracy\n0,0.5,0.25\n1,,0.75\n")
    assert run_directory.read_log(path) == {
        "epoch": [0.0, 1.0], "accuracy": [0.5, None], "val_accuracy": [0.25, 0.75]}
    assert run_directory.read_log(tmp_path / "none.csv") == {}


def test_read_log_errors(tmp_path):
    path = _write_log(tmp_path / "log.csv", "epoch,accuracy\n0,0.5,9\n")
    with _unreadable(path, "a row has more values than the header"):
        run_directory.read_log(path)
    path = _write_log(tmp_path / "log.csv", "epoch,accuracy\n0,high\n")
    with _unreadable(path, "could not convert string to float: 'high'"):
        run_directory.read_log(path)


def test_epoch_log_keeps_the_last_row_of_a_repeated_epoch(tmp_path):
    """A run resumed in epoch 2 logs it twice: the later row counts."""
    path = _write_log(tmp_path / "log.csv", "epoch,val_accuracy\n0,0.1\n1,0.2\n1,0.3\n2,0.4\n")
    assert run_directory.epoch_log(path) == {"epoch": [1, 2, 3], "val_accuracy": [0.1, 0.3, 0.4]}
    assert run_directory.epoch_log(_write_log(tmp_path / "empty.csv", "epoch,loss\n")) == {}


def test_best_epoch_is_the_first_of_equal_accuracies(tmp_path):
    path = _write_log(tmp_path / "log.csv",
                      "epoch,val_accuracy\n0,0.5\n1,0.75\n2,0.75\n3,\n")
    assert run_directory.best_epoch(path) == (0.75, 2)
    assert run_directory.best_epoch(tmp_path / "none.csv") == (None, None)


def test_same_run_rule():
    planned = config.Config(epochs=3, data_dir="/here").to_json()
    recorded = {**planned, "data_dir": "/elsewhere", "epochs": 5}
    fields = run_directory.result_fields(planned)
    assert "data_dir" not in fields and "epochs" in fields
    # Finished results must match every field but where and how it ran.
    assert run_directory.differing_field(recorded, planned, fields) == ("epochs", 5, 3)
    # A backup resumes under other epochs, never another model.
    assert run_directory.differing_field(recorded, planned, run_directory.MODEL_FIELDS) is None
    other = {**recorded, "model": "mnist_conv"}
    assert run_directory.differing_field(other, planned, run_directory.MODEL_FIELDS) == (
        "model", "mnist_conv", "mnist_pde")
    # A field the recorded config lacks (added later to Config) has its default.
    older = {key: value for key, value in planned.items() if key != "warmup_epochs"}
    assert run_directory.differing_field(older, planned, fields) is None
    warm = config.Config(epochs=3, warmup_epochs=1).to_json()
    assert run_directory.differing_field(older, warm, fields) == ("warmup_epochs", 0, 1)


def test_recorded_config_makes_changed_defaults_explicit():
    """pde-keras 0.1.0's Global models used coefficient epsilon 1e-5 (today: "channels")."""
    config_of = {"model": "resnet32_global", "model_options": {"steps": 1}}
    old = run_directory.recorded_config({"version": "0.1.0", "config": config_of})
    assert old["model_options"] == {"steps": 1, "coefficient_epsilon": 1e-5}
    assert config_of == {"model": "resnet32_global", "model_options": {"steps": 1}}  # Not changed.
    # Results without a version were written by 0.1.0 too.
    assert run_directory.recorded_config({"config": config_of}) == old
    for results in ({"version": "0.2.0", "config": config_of},
                    {"version": "0.1.0", "config": {"model": "resnet32", "model_options": {}}},
                    {"version": "0.1.0", "config": {
                        "model": "resnet32_global", "model_options": {"coefficient_epsilon": 16}}}):
        assert run_directory.recorded_config(results) == results["config"]
    planned = config.Config(dataset="cifar10", model="resnet32_global").to_json()
    fields = run_directory.result_fields(planned)
    old_run = {"version": "0.1.0", "config": planned}
    assert run_directory.differing_field(run_directory.recorded_config(old_run), planned,
                                         fields) == ("model_options",
                                                     {"coefficient_epsilon": 1e-5}, {})
