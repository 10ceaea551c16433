"""The run directory: its file names, atomic writes, and reading it back.

A run directory (`workdir` of `pde_keras.training.train_and_evaluate`, the
runners' `--model_dir`) holds:

- `config.json`: the run's `pde_keras.config.Config` (`CONFIG_FILE`);
- `log.csv`: one row per epoch (`LOG_FILE`);
- `tensorboard/`: TensorBoard event files (`TENSORBOARD_DIR`);
- `last.keras`, `best.keras`: the final and the best model (`CHECKPOINTS`);
- `backup/`: the training state while training (`BACKUP_DIR`,
  `pde_keras.backup`);
- `results.json`: the results, written last (`RESULTS_FILE`);
- `maps/`: the coefficient maps drawn by `--dump_maps` (`MAPS_DIR`).

Every file is written atomically (`write_json`, `write_text`: a temporary
file renamed into place), and every reader raises `UnreadableFileError`
(one line) for a garbled file. `differing_field` is the one rule that tells
whether a recorded config describes the run a config plans, used both to
resume from a backup and by the sweep to count finished results.
"""

import csv
import json
import os
import pathlib
import tempfile

from pde_keras import config, models, validation

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
LOG_FILE = "log.csv"
TENSORBOARD_DIR = "tensorboard"
BACKUP_DIR = "backup"
MAPS_DIR = "maps"
# `checkpoint` name -> file: the final model, and the best per-epoch test accuracy.
CHECKPOINTS = {"last": "last.keras", "best": "best.keras"}

# Config fields that fix what a model's weights are: a backup resumes under a
# change of any other field (e.g. more epochs), never of these.
MODEL_FIELDS = ("dataset", "model", "model_options")
# Config fields that say only where the data lies and how a run is executed:
# results that differ in these alone count as the same run.
EXECUTION_FIELDS = ("data_dir", "download", "eval_batch_size", "jit_compile", "distribution",
                    "verbose", "backup_every_steps")


class UnreadableFileError(ValueError):
    """A file of a run directory (`config.json`, `results.json`, `log.csv`) is garbled.

    Attributes:
        path: the file.
        reason: what is wrong with it (one line).
    """

    def __init__(self, path, reason):
        super().__init__(f"cannot read {str(path)!r}: {reason}")
        self.path, self.reason = path, reason


def write_json(path, payload):
    """Writes `payload` as JSON to `path` atomically (temporary file + rename)."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text(path, text):
    """Writes the string `text` to `path` atomically (temporary file + rename)."""
    path = pathlib.Path(path)
    with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def read_json(path):
    """The JSON object in `path` (a run's `config.json`, `results.json`, ...).

    Raises:
        FileNotFoundError: there is no such file.
        UnreadableFileError: it cannot be read or holds no JSON object.
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as error:
        raise UnreadableFileError(path, validation.first_line(error)) from None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise UnreadableFileError(path, validation.first_line(error)) from None
    if not isinstance(value, dict):
        raise UnreadableFileError(path, f"a JSON {type(value).__name__}, not an object")
    return value


def read_config(workdir):
    """The config dict of a run: its `config.json`, else the copy in `results.json`.

    Raises:
        FileNotFoundError: the directory holds neither file.
        UnreadableFileError: the file is garbled, or `results.json` has no
            config object.
    """
    workdir = pathlib.Path(workdir)
    path = workdir / CONFIG_FILE
    if path.is_file():
        return read_json(path)
    path = workdir / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {str(workdir)!r}")
    saved = read_json(path)
    if not isinstance(saved.get("config"), dict):
        raise UnreadableFileError(path, "it has no 'config' object")
    return saved["config"]


def read_log(log_path):
    """A run's CSV log (`log.csv`) as `{column: [number or None per row]}`.

    One entry per row, in order (a resumed run may log an epoch twice; the
    `epoch` column is 0-based); None where a row has no value.

    Returns:
        The columns, or `{}` when there is no log.

    Raises:
        UnreadableFileError: the file is not a CSV table of numbers.
    """
    path = pathlib.Path(log_path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return {}
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise UnreadableFileError(path, validation.first_line(error)) from None
    columns = dict.fromkeys(key for row in rows for key in row)
    if None in columns:  # csv.DictReader's key of the values beyond the header.
        raise UnreadableFileError(path, "a row has more values than the header")
    try:
        return {column: [float(row[column]) if row.get(column) else None for row in rows]
                for column in columns}
    except ValueError as error:
        raise UnreadableFileError(path, validation.first_line(error)) from None


def epoch_log(log_path):
    """`read_log` with one row per epoch, the last logged (a resumed run may
    repeat one), in epoch order; `epoch` becomes 1-based. `{}` without epochs."""
    columns = read_log(log_path)
    rows = {int(epoch): index for index, epoch in enumerate(columns.get("epoch", []))
            if epoch is not None}
    if not rows:
        return {}
    epochs = sorted(rows)
    log = {name: [values[rows[epoch]] for epoch in epochs]
           for name, values in columns.items() if name != "epoch"}
    log["epoch"] = [epoch + 1 for epoch in epochs]
    return log


def best_epoch(log_path):
    """(best val_accuracy, its 1-based epoch) in the CSV log, or (None, None).

    The first of equal accuracies, as `keras.callbacks.ModelCheckpoint`
    keeps it.
    """
    return best_of(read_log(log_path))


def best_of(log):
    """`best_epoch` of a log already read (`read_log`'s columns)."""
    rows = [(accuracy, int(epoch) + 1)
            for accuracy, epoch in zip(log.get("val_accuracy", []), log.get("epoch", []))
            if accuracy is not None and epoch is not None]
    return max(rows, key=lambda row: row[0]) if rows else (None, None)


def differing_field(recorded, planned, fields):
    """The first of `fields` in which two configs differ, or None: the same run.

    Args:
        recorded: a config dict read from a run directory. A field it lacks
            (added to `Config` after the run was recorded) has its default.
        planned: the planned config, as `Config.to_json()`.
        fields: the fields compared: `MODEL_FIELDS` to resume from a backup,
            every field but `EXECUTION_FIELDS` for finished results.

    Returns:
        `(name, recorded value, planned value)` or None.
    """
    recorded = {**config.Config().to_json(), **recorded}
    for name in fields:
        if recorded.get(name) != planned[name]:
            return name, recorded.get(name), planned[name]
    return None


# Model options whose default changed, by the last version with the old default:
# a run recorded by such a version without the option set used the old value.
_OLD_DEFAULTS = {"coefficient_epsilon": ("0.1.0", 1e-5)}


def recorded_config(results):
    """The config a `results.json` dict records, with the defaults of its
    version made explicit where they have changed since (a Global model of
    pde-keras 0.1.0 without `coefficient_epsilon` used 1e-5, not today's
    `"channels"`), so that `differing_field` tells such a run from a new one."""
    recorded = dict(results.get("config", {}))
    version = _version(results.get("version", "0.1.0"))
    options = dict(recorded.get("model_options", {}))
    accepted = models.options(recorded["model"]) if recorded.get("model") in models.names() else ()
    for option, (last, value) in _OLD_DEFAULTS.items():
        if option in accepted and option not in options and version <= _version(last):
            options[option] = value
    if options != recorded.get("model_options", {}):
        recorded["model_options"] = options
    return recorded


def _version(text):
    """`"0.2.0"` -> (0, 2, 0); unparsable parts count as 0."""
    return tuple(int(part) if part.isdigit() else 0 for part in str(text).split("."))


def result_fields(planned):
    """The fields of `planned` (a config dict) that finished results must match."""
    return [name for name in planned if name not in EXECUTION_FIELDS]
