"""Fault injection: the faults of long runs, driven through the real runners in
subprocesses (SIGTERM and SIGINT mid-epoch, SIGKILL during a backup write,
truncated backups, garbled run files, a full disk), and the training library's
resume (the learning rate after a mid-epoch resume, backups of the previous
format). Each time: nothing finished is lost, and every message is one line."""

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import keras
import pytest

from pde_keras import backup as backup_module
from pde_keras import run_directory, training
from test_runners import ROOT, _driver, _env, _failed_with, _runner, _succeeded

# One epoch of 128 steps of 32 synthetic digits, a backup every 50 steps (the
# issue's acceptance): about 2 s of training of the one-channel conv net here.
STEPS_PER_EPOCH = 128
BACKUP_EVERY = 50
RUN = ["--backbone=conv", "--channels=1", "--data_source=synthetic",
       f"--train_examples={32 * STEPS_PER_EPOCH}", "--test_examples=32", "--epochs=1",
       f"--backup_every_steps={BACKUP_EVERY}"]
# One epoch of 16 steps, a backup every 5: the full-disk runs.
SHORT_RUN = ["--backbone=conv", "--channels=1", "--data_source=synthetic",
             "--train_examples=512", "--test_examples=32", "--epochs=1",
             "--backup_every_steps=5"]
INTERRUPTED = re.compile(
    r"^interrupted by (SIGTERM|SIGINT): backup of epoch 1, step (\d+) written to "
    r"'(\S+)/backup/epoch00000-step(\d+)'; re-run the same command to resume from it$")


def _backups(workdir):
    """The complete backups' directory names in `workdir/backup`, oldest first."""
    return sorted(path.name for path in (workdir / "backup").glob("epoch*-step*"))


def _interrupt(workdir, signum):
    """Starts RUN, sends `signum` once a mid-epoch backup exists; returns
    (returncode, stderr, seconds from the signal to the exit)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.mnist", *RUN, f"--model_dir={workdir}"],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while (not list((workdir / "backup").glob("epoch00000-step*"))
           and process.poll() is None and time.time() < deadline):
        time.sleep(0.05)
    sent = time.time()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr, time.time() - sent


def _one_line_interruption(stderr, workdir, name):
    """Checks the interruption line (last on stderr, no traceback); returns its step."""
    assert "Traceback" not in stderr
    match = INTERRUPTED.match(stderr.strip().splitlines()[-1])
    assert match, stderr[-3000:]
    assert match[1] == name and match[3] == str(workdir)
    assert int(match[2]) == int(match[4]) > 0
    return int(match[2])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by SIGTERM mid-epoch: (its directory, step, returncode,
    stderr, seconds to exit). Tests work on copies."""
    workdir = tmp_path_factory.mktemp("interrupted")
    returncode, stderr, elapsed = _interrupt(workdir, signal.SIGTERM)
    step = _one_line_interruption(stderr, workdir, "SIGTERM")
    return workdir, step, returncode, elapsed


def _copy(interrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(interrupted[0], workdir)
    # Files record their directory (config.json does not; checkpoints do not matter).
    return workdir


def _resumed(workdir, *extra):
    results = _succeeded(_runner("mnist", *RUN, *extra, f"--model_dir={workdir}"), workdir)
    assert results["epochs"] == 1
    # Epoch 0 logged once, or twice when killed between its log row and its backup.
    assert set(run_directory.read_log(workdir / "log.csv")["epoch"]) == {0}
    assert not (workdir / "backup").exists()
    return results


# ---------------------------------------------------------------- signals


def test_sigterm_mid_epoch_backs_up_and_exits_143(interrupted):
    workdir, step, returncode, elapsed = interrupted
    assert returncode == 143
    assert elapsed < 30, elapsed
    assert _backups(workdir)[-1] == f"epoch00000-step{step:06d}"
    assert len(_backups(workdir)) == 2  # and the previous one
    assert not (workdir / "results.json").exists()


def test_rerun_after_sigterm_resumes_at_that_step(interrupted, tmp_path):
    workdir = _copy(interrupted, tmp_path)
    results = _resumed(workdir)
    assert (results["resumed_from_epoch"], results["resumed_from_step"]) == (0, interrupted[1])


def test_sigint_mid_epoch_exits_130(tmp_path):
    returncode, stderr, elapsed = _interrupt(tmp_path, signal.SIGINT)
    assert returncode == 130 and elapsed < 30, (returncode, elapsed)
    step = _one_line_interruption(stderr, tmp_path, "SIGINT")
    assert _backups(tmp_path)[-1] == f"epoch00000-step{step:06d}"


def test_sigkill_during_a_backup_write_resumes_from_the_previous_backup(tmp_path):
    # The third backup (the end of the epoch) dies half written.
    process = _driver(
        """
        import os, signal, keras
        save_weights, calls = keras.Model.save_weights, []
        def dying_save_weights(self, filepath, *args, **kwargs):
            calls.append(filepath)
            if len(calls) == 3:
                with open(filepath, "wb") as f:
                    f.write(b"\\x89HDF\\r\\n")
                os.kill(os.getpid(), signal.SIGKILL)
            return save_weights(self, filepath, *args, **kwargs)
        keras.Model.save_weights = dying_save_weights
        """, "mnist", *RUN, f"--model_dir={tmp_path}")
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    assert _backups(tmp_path) == ["epoch00000-step000050", "epoch00000-step000100"]
    results = _resumed(tmp_path)
    assert (results["resumed_from_epoch"], results["resumed_from_step"]) == (0, 100)


# --------------------------------------------------------- corrupt backups


def test_corrupt_latest_backup_falls_back_to_the_previous(interrupted, tmp_path):
    workdir = _copy(interrupted, tmp_path)
    latest, previous = (workdir / "backup" / name for name in reversed(_backups(workdir)))
    weights = latest / "latest.weights.h5"
    weights.write_bytes(weights.read_bytes()[:100])
    process = _runner("mnist", *RUN, f"--model_dir={workdir}")
    results = _succeeded(process, workdir)
    assert results["resumed_from_step"] == int(previous.name[-6:])
    warnings = [line for line in process.stderr.splitlines() if "Unreadable backup" in line]
    assert len(warnings) == 1 and str(weights) in warnings[0], process.stderr[-3000:]


def test_truncated_latest_metadata_falls_back_to_the_previous(interrupted, tmp_path):
    workdir = _copy(interrupted, tmp_path)
    latest, previous = reversed(_backups(workdir))
    metadata = workdir / "backup" / latest / "training_metadata.json"
    metadata.write_text(metadata.read_text()[:5])
    assert [backup.path.name for backup in backup_module.find_backups(workdir)] == [previous]


def test_every_backup_truncated_exits_1_and_restart_trains_from_scratch(
        interrupted, tmp_path):
    workdir = _copy(interrupted, tmp_path)
    for path in (workdir / "backup").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[:10])
    started = time.time()
    process = _runner("mnist", *RUN, f"--model_dir={workdir}")
    assert process.returncode == 1 and "Traceback" not in process.stderr
    line = process.stderr.strip().splitlines()[-1]
    backup = f"'{workdir}/backup'"
    assert line.startswith(f"error: no readable backup in {backup} (")
    assert line.endswith(
        f"): re-run with --restart to train from scratch, or remove {backup}"), line
    assert time.time() - started < 60

    results = _resumed(workdir, "--restart")
    assert (results["resumed_from_epoch"], results["resumed_from_step"]) == (0, 0)


# ------------------------------------------------------ garbled run files


@pytest.mark.parametrize("name,text,reason", [
    ("config.json", '{"dataset": "mni', "Unterminated string starting at: line 1 column 13 "
     "(char 12); it is the configuration of the backup in '{workdir}/backup': repair it, "
     "or re-run with --restart to train from scratch"),
    ("log.csv", "epoch,val_accuracy\n0,0.5\n1,0.4,7\n", "a row has more values than "
     "the header; remove it "
     "(resuming then logs the remaining epochs only) or re-run with --restart to train "
     "from scratch"),
])
def test_garbled_run_file_on_resume_is_one_line(interrupted, tmp_path, name, text, reason):
    workdir = _copy(interrupted, tmp_path)
    (workdir / name).write_text(text)
    process = _runner("mnist", *RUN, f"--model_dir={workdir}")
    _failed_with(process, f"error: cannot read '{workdir}/{name}': "
                          + reason.format(workdir=workdir))
    assert _backups(workdir) == _backups(interrupted[0])  # kept


# ------------------------------------------------------------- full disk

# Raises ENOSPC from the writer of `target` (a prelude for _driver).
_FULL_DISK = """
import errno, keras
from pde_keras import run_directory

def full(path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

TARGET = {target!r}
if TARGET == "backup":  # The second backup (step 10).
    save_weights, calls = keras.Model.save_weights, []
    def save_weights_full(self, filepath, *args, **kwargs):
        calls.append(filepath)
        if len(calls) == 2:
            full(filepath)
        return save_weights(self, filepath, *args, **kwargs)
    keras.Model.save_weights = save_weights_full
elif TARGET == "checkpoint":  # last.keras at the end of the epoch.
    keras.Model.save = lambda self, filepath, *args, **kwargs: full(filepath)
else:
    write_text = run_directory.write_text
    run_directory.write_text = lambda path, text: (
        full(path) if path.name == "results.json" else write_text(path, text))
"""


@pytest.mark.parametrize("target,kept", [
    ("backup", ["epoch00000-step000005"]),
    ("checkpoint", ["epoch00000-step000010", "epoch00000-step000015"]),
    ("results", ["epoch00000-step000015", "epoch00001-step000000"]),
])
def test_full_disk_is_one_line_and_keeps_the_backup(tmp_path, target, kept):
    process = _driver(_FULL_DISK.format(target=target), "mnist", *SHORT_RUN,
                      f"--model_dir={tmp_path}")
    path = {"backup": f"{tmp_path}/backup/.incomplete-", "checkpoint": f"{tmp_path}/last.keras",
            "results": f"{tmp_path}/results.json"}[target]
    assert process.returncode == 1 and "Traceback" not in process.stderr, process.stderr[-3000:]
    line = process.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write '{path}"), line
    assert line.endswith(
        ": No space left on device; the last complete backup (if any) is kept in "
        f"'{tmp_path}/backup': free space (or fix the directory) and re-run the same "
        "command to resume"), line
    assert _backups(tmp_path) == kept
    assert not list((tmp_path / "backup").glob(".incomplete-*"))
    assert [backup.error() for backup in backup_module.find_backups(tmp_path)] == [None] * len(kept)
    if target == "results":  # Nothing finished is lost: the re-run only evaluates.
        results = _succeeded(_runner("mnist", *SHORT_RUN, f"--model_dir={tmp_path}"),
                             tmp_path)
        assert results["resumed_from_epoch"] == results["epochs"] == 1


# ------------------------------------------------------ library, in-process

TINY = dict(dataset="mnist", model="mnist_conv", model_options={"channels": 1},
            data_source="synthetic", train_examples=512, test_examples=32,
            batch_size=32, verbose=0)  # 16 steps per epoch


class _Stop(Exception):
    pass


class _StopAt(keras.callbacks.Callback):
    """Raises `_Stop` at the beginning of step `step` of epoch `epoch` (0-based)."""

    def __init__(self, epoch, step=0):
        super().__init__()
        self.epoch, self.step, self.current = epoch, step, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch
        if epoch == self.epoch and self.step == 0:
            raise _Stop

    def on_train_batch_begin(self, batch, logs=None):
        if self.current == self.epoch and batch == self.step:
            raise _Stop


class _LearningRates(keras.callbacks.Callback):
    """Records {optimizer iteration: learning rate} of every trained step."""

    def __init__(self):
        super().__init__()
        self.rates = {}

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        self.iteration = int(keras.ops.convert_to_numpy(optimizer.iterations))
        self.rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        # A trained step advances the iterations (a skipped one does not).
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) > self.iteration:
            self.rates[self.iteration] = self.rate


@pytest.mark.multibackend
def test_learning_rate_after_a_mid_epoch_resume_equals_the_uninterrupted_runs(tmp_path):
    config = training.Config(**TINY, epochs=2, backup_every_steps=5, learning_rate=0.1)
    uninterrupted = _LearningRates()
    training.train_and_evaluate(config, tmp_path / "whole", callbacks=[uninterrupted])
    assert sorted(uninterrupted.rates) == list(range(32))

    # Stopped in the second epoch after 13 steps: the backup of step 10 remains.
    with pytest.raises(_Stop):
        training.train_and_evaluate(config, tmp_path / "resumed", callbacks=[_StopAt(1, 13)])
    assert _backups(tmp_path / "resumed")[-1] == "epoch00001-step000010"
    resumed = _LearningRates()
    results = training.train_and_evaluate(config, tmp_path / "resumed", callbacks=[resumed])
    assert (results["resumed_from_epoch"], results["resumed_from_step"]) == (1, 10)
    # Steps 26..31: the schedule goes on at the step of the backup, to the end.
    assert sorted(resumed.rates) == list(range(16 + 10, 32))
    assert resumed.rates == pytest.approx(
        {step: uninterrupted.rates[step] for step in resumed.rates}, rel=1e-6)


class _PreviousFormatBackup(keras.callbacks.BackupAndRestore):
    """The backups of pde-keras <= 0.2: Keras' own, in place, with `.bkp` copies."""

    diverged = signum = None

    def __init__(self, backup_dir, save_freq, backups):
        del save_freq, backups
        super().__init__(backup_dir, double_checkpoint=True)

    def restore(self, model):
        del model
        return 0, 0


def test_resumes_from_a_backup_of_the_previous_format(tmp_path, monkeypatch):
    config = training.Config(**TINY, epochs=3)
    with monkeypatch.context() as patch:
        patch.setattr(backup_module, "BackupAndRestore", _PreviousFormatBackup)
        with pytest.raises(_Stop):
            training.train_and_evaluate(config, tmp_path, callbacks=[_StopAt(2)])
    backup = tmp_path / "backup"
    assert sorted(path.name for path in backup.iterdir()) == [
        "latest.weights.h5", "latest.weights.h5.bkp", "training_metadata.json",
        "training_metadata.json.bkp"]
    assert [(b.epoch, b.step) for b in backup_module.find_backups(tmp_path)] == [(2, 0), (1, 0)]

    # A truncated latest falls back to the `.bkp` copy.
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path, copy)
    weights = copy / "backup" / "latest.weights.h5"
    weights.write_bytes(weights.read_bytes()[:64])
    assert [(b.epoch, b.step) for b in backup_module.find_backups(copy)] == [(1, 0)]

    results = training.train_and_evaluate(config, tmp_path)
    assert (results["resumed_from_epoch"], results["epochs"]) == (2, 3)
    assert run_directory.read_log(tmp_path / "log.csv")["epoch"] == [0.0, 1.0, 2.0]
    assert not backup.exists()
