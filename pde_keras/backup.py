"""Backups of the training state: atomic, resumable mid-epoch, on signals.

A run directory's `backup/` holds the newest two backups, each a directory
`epochEEEEE-stepSSSSSS/` (`latest.weights.h5`, `training_metadata.json`)
written under a temporary name and renamed when complete
(`BackupAndRestore`). `find_backups` lists the readable ones, newest first;
`resumable_backups` also checks that they belong to the planned run;
`stop_on_signals` turns SIGTERM and SIGINT into a backup and `Interrupted`.
"""

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import signal
import tempfile
import threading

import keras
from absl import logging

from pde_keras import run_directory, validation
from pde_keras.run_directory import BACKUP_DIR, UnreadableFileError


class BackupError(RuntimeError):
    """A workdir holds backups, but none of them can be read."""


class Interrupted(Exception):
    """Training stopped on a signal (SIGTERM, SIGINT) after writing a backup.

    Attributes:
        signum: the signal's number (the runners exit with 128 + signum).
    """

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` with atomic backups, mid-epoch resume and signals.

    Keras' callback writes the weights and then the epoch counter in place,
    so that a kill in between pairs one step's weights with another's
    counter. Here every backup is a directory `epochEEEEE-stepSSSSSS/`
    (`latest.weights.h5`, `training_metadata.json`) written under a
    temporary name and renamed when complete; the previous backup is
    deleted only then (two are kept). `save_freq=N` backs up every N steps
    of an epoch as well as at its end, and a backup taken at step k of an
    epoch resumes at step k: the optimizer's iteration count (the learning
    rate) comes with the weights, and the epoch's first k batches are
    skipped (drawn from the input pipeline, not trained on).

    When the loss is NaN (`TerminateOnNaN` stops `fit`, which still ends the
    epoch), that epoch's backup is skipped and `diverged` is `(epoch,
    loss)`. When `signum` is set (by `stop_on_signals`), the next step's
    end writes a backup and raises `Interrupted`. The backup directory is
    left for `train_and_evaluate` to delete once the results are written.

    Args:
        backup_dir: the directory of the backups.
        save_freq: `"epoch"` or a number of steps.
        backups: the readable backups to restore from, newest first
            (`find_backups`).
    """

    diverged = None
    signum = None

    def __init__(self, backup_dir, save_freq="epoch", backups=()):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=False)
        self.backups = list(backups)
        # Where `restore` resumed: the epoch, and its steps done before the backup.
        self._resume_epoch, self._skip = None, 0

    def restore(self, model):
        """Loads the newest loadable backup into `model` (compiled).

        Returns:
            `(epoch, step)`: where training resumes (`(0, 0)` without one).

        Raises:
            BackupError: there were backups and none could be loaded.
        """
        if not self.backups:
            return 0, 0
        if model.optimizer is not None and not model.optimizer.built:
            # The optimizer's variables (iterations, momenta) are in the backup.
            model.optimizer.build(model.trainable_variables)
        errors = []
        for backup in self.backups:
            try:
                model.load_weights(backup.weights)
            except (OSError, ValueError) as error:
                errors.append(f"{backup.weights}: {validation.first_line(error)}")
                logging.warning("Cannot load the backup %s (%s); trying the previous one.",
                                backup.weights, validation.first_line(error))
                continue
            model._initial_epoch = backup.epoch
            self._resume_epoch, self._skip = backup.epoch, backup.step
            logging.info("Resuming from the backup %s: epoch %d, step %d.",
                         backup.path, backup.epoch + 1, backup.step)
            return backup.epoch, backup.step
        raise _unreadable(self.backup_dir, errors)

    def on_train_begin(self, logs=None):
        pass  # Restored by `restore`, before fit.

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch
        if self._skip and epoch == self._resume_epoch:
            self._skip_batches(self._skip)
        else:
            self._skip = 0

    def on_train_batch_end(self, batch, logs=None):
        steps_done = batch + 1
        if steps_done <= self._skip:
            if steps_done == self._skip:
                self._stop_skipping()
            return
        if self.signum is not None and steps_done != self.params.get("steps"):
            # The epoch's last step: its end backs up and stops instead.
            self._save(self._current_epoch, steps_done)
            raise self._interrupted(self._current_epoch, steps_done)
        if (self.save_freq != "epoch" and steps_done % self.save_freq == 0
                and steps_done != self.params.get("steps")):
            self._save(self._current_epoch, steps_done)

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged = (epoch, float(loss))
            return
        self._save(epoch + 1, 0)
        if self.signum is not None:
            raise self._interrupted(epoch + 1, 0)

    def on_train_end(self, logs=None):
        pass  # train_and_evaluate deletes the backups once results.json is written.

    def _save(self, epoch, step):
        """Writes the backup of `step` steps into `epoch` (0-based), atomically."""
        backup_dir = pathlib.Path(self.backup_dir)
        backup_dir.mkdir(parents=True, exist_ok=True)
        final = backup_dir / _backup_name(epoch, step)
        incomplete = pathlib.Path(tempfile.mkdtemp(dir=backup_dir, prefix=_INCOMPLETE))
        try:
            self.model.save_weights(str(incomplete / _WEIGHTS))
            run_directory.write_json(incomplete / _METADATA, {"epoch": epoch, "step": step})
            if final.exists():  # Written before a resume; this one is newer.
                shutil.rmtree(final)
            os.replace(incomplete, final)
        finally:
            shutil.rmtree(incomplete, ignore_errors=True)
        # Only now that the new backup is complete: keep it and the newest readable
        # one before it. Unreadable ones, and those after it (of a resume that fell
        # back past them), are never resumed from again.
        previous = None
        for backup in _backup_candidates(backup_dir):
            if backup.path == final:
                continue
            if previous is None and backup.order < (1, epoch, step) and backup.error() is None:
                previous = backup
            else:
                backup.remove()
        for leftover in backup_dir.glob(_INCOMPLETE + "*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _skip_batches(self, count):
        """Makes the next `count` training steps draw their batch and do nothing."""
        self._train_function = self.model.train_function
        if keras.backend.backend() == "jax":
            def skip(state, data):
                return {}, state
        else:
            def skip(iterator):
                next(iterator)
                return {}
        logging.info("Skipping the %d steps of epoch %d done before the backup.",
                     count, self._current_epoch + 1)
        self.model.train_function = skip

    def _stop_skipping(self):
        self.model.train_function = self._train_function
        self._skip = 0

    def _interrupted(self, epoch, step):
        name = signal.Signals(self.signum).name
        where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
        return Interrupted(
            self.signum, f"interrupted by {name}: backup of {where} written to "
            f"{str(pathlib.Path(self.backup_dir) / _backup_name(epoch, step))!r}; re-run the "
            "same command to resume from it")


# A backup directory's files. The previous format (pde-keras up to 0.2.0:
# keras' BackupAndRestore(double_checkpoint=True)) has the same pair directly
# in `backup/`, and the previous epoch's with the suffix `.bkp`.
_WEIGHTS = "latest.weights.h5"
_METADATA = "training_metadata.json"
_INCOMPLETE = ".incomplete-"
_BACKUP_NAME = re.compile(r"^epoch(\d+)-step(\d+)$")


def _backup_name(epoch, step):
    return f"epoch{epoch:05d}-step{step:06d}"


@dataclasses.dataclass(frozen=True)
class _Backup:
    """One backup: its weights and metadata files, and its position.

    `epoch` is the number of epochs done and `step` the steps done into the
    next one; None when the metadata cannot be read.
    """

    path: pathlib.Path  # The directory, or the weights file of the old format.
    weights: pathlib.Path
    metadata: pathlib.Path
    epoch: int | None
    step: int | None
    order: tuple  # Newest first when sorted descending.

    def remove(self):
        if self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for path in (self.weights, self.metadata):
                path.unlink(missing_ok=True)

    def error(self):
        """Why this backup cannot be restored, or None."""
        if self.epoch is None:
            return f"{self.metadata}: unreadable or missing"
        try:
            import h5py

            with h5py.File(self.weights, "r"):
                pass
        except (OSError, ValueError) as error:
            return f"{self.weights}: {validation.first_line(error)}"
        return None


def _read_position(metadata):
    """(epoch, step) of a backup's metadata file, or (None, None)."""
    try:
        saved = json.loads(metadata.read_text())
        position = int(saved["epoch"]), int(saved.get("step", 0))
    except (OSError, ValueError, TypeError, KeyError):
        return None, None
    return position if min(position) >= 0 else (None, None)


def _backup_candidates(backup_dir):
    """Every backup in `backup_dir`, readable or not, newest first."""
    backups = []
    if not backup_dir.is_dir():
        return backups
    for path in backup_dir.iterdir():
        match = _BACKUP_NAME.match(path.name)
        if match and path.is_dir():
            epoch, step = _read_position(path / _METADATA)
            backups.append(_Backup(path, path / _WEIGHTS, path / _METADATA, epoch, step,
                                   (1, int(match[1]), int(match[2]))))
    # The old format: older than any new one; the latest before its `.bkp`.
    for rank, suffix in ((1, ""), (0, ".bkp")):
        weights = backup_dir / (_WEIGHTS + suffix)
        metadata = backup_dir / (_METADATA + suffix)
        if weights.exists() or metadata.exists():
            epoch, step = _read_position(metadata)
            backups.append(_Backup(weights, weights, metadata, epoch, step, (0, rank)))
    return sorted(backups, key=lambda backup: backup.order, reverse=True)


def find_backups(workdir):
    """The readable backups of `workdir`, newest first (a warning per unreadable one).

    Raises:
        BackupError: there are backups and none is readable.
    """
    backup_dir = pathlib.Path(workdir) / BACKUP_DIR
    readable, errors = [], []
    for backup in _backup_candidates(backup_dir):
        error = backup.error()
        if error is None:
            readable.append(backup)
            continue
        errors.append(error)
        logging.warning("Unreadable backup: %s; falling back to the previous one.", error)
    if errors and not readable:
        raise _unreadable(backup_dir, errors)
    return readable


def _unreadable(backup_dir, errors):
    return BackupError(
        f"no readable backup in {str(backup_dir)!r} ({'; '.join(errors)}): re-run with "
        f"--restart to train from scratch, or remove {str(backup_dir)!r}")


@contextlib.contextmanager
def stop_on_signals(backup):
    """SIGTERM and SIGINT make `backup` write a backup and stop training.

    The handlers only record the signal: the backup is written at the end of
    the current step (or of the epoch's evaluation). Outside the main thread,
    where Python cannot handle signals, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        del frame
        backup.signum = signum

    previous = {signum: signal.signal(signum, handler)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def resumable_backups(config, workdir, restart):
    """The readable backups `workdir` resumes from, newest first ([] if none).

    With `restart`, deletes the backup directory and returns [].

    Raises:
        ValueError: the backup belongs to another dataset or model, or the
            run's `config.json` is unreadable.
        BackupError: there are backups and none is readable.
    """
    workdir = pathlib.Path(workdir)
    if restart:
        delete_backups(workdir)
        return []
    backups = find_backups(workdir)
    if not backups:
        return []
    try:
        previous = run_directory.read_json(workdir / run_directory.CONFIG_FILE)
    except FileNotFoundError:
        previous = {}
    except UnreadableFileError as error:
        raise UnreadableFileError(
            error.path, f"{error.reason}; it is the configuration of the backup in "
            f"{str(workdir / BACKUP_DIR)!r}: repair it, or re-run with --restart to train "
            "from scratch") from None
    try:  # The log too: resuming appends to it and reads its best epoch.
        run_directory.read_log(workdir / run_directory.LOG_FILE)
    except UnreadableFileError as error:
        raise UnreadableFileError(
            error.path, f"{error.reason}; remove it (resuming then logs the remaining "
            "epochs only) or re-run with --restart to train from scratch") from None
    difference = run_directory.differing_field(
        previous, config.to_json(), run_directory.MODEL_FIELDS)
    if difference:
        name, recorded, planned = difference
        raise validation.invalid(
            "workdir", f"a new directory, or the one of a run with {name}={recorded!r} to "
            f"resume it (it holds that run's backup, and this run has {name}={planned!r})",
            str(workdir))
    return backups


def delete_backups(workdir):
    """Deletes `workdir`'s backups (once its results are written)."""
    shutil.rmtree(pathlib.Path(workdir) / BACKUP_DIR, ignore_errors=True)
