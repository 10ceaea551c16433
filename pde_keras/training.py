"""Training library: `train_and_evaluate(config, workdir)`.

The runners (`python -m experiments.mnist`, `python -m experiments.cifar`)
and the tests call this one function. It loads the data
(`pde_keras.input_pipeline`), builds `pde_keras.models.create(config.model,
**config.model_options)` behind a per-channel normalisation, trains it with
SGD (momentum 0.9, Nesterov) under a learning-rate schedule, evaluates it on
the test split and writes the run directory (`pde_keras.run_directory`):

- `config.json`: the `pde_keras.config.Config` (once the data is loaded);
- `log.csv`: one row per epoch (`keras.callbacks.CSVLogger`, appended to
  when a run resumes), with the epoch's training time (`EpochTimer`) and
  every PDE layer's Courant and diffusion numbers (`StabilityMonitor`);
- `tensorboard/`: TensorBoard event files;
- `last.keras` (after every epoch) and `best.keras` (best `val_accuracy`);
  both take raw pixel values 0-255 (the normalisation is inside);
- `backup/`: the training state (`pde_keras.backup`), after every epoch
  or every `backup_every_steps` steps, deleted once `results.json` is
  written. Re-running the same command after a kill resumes from the last
  backup (mid-epoch ones at their step); `restart=True` starts over. A
  SIGTERM or SIGINT during training writes a backup of the current step
  and raises `Interrupted`. When the loss turns NaN, training stops
  (`keras.callbacks.TerminateOnNaN`), the backup of the last good epoch is
  kept and `TrainingDivergedError` is raised;
- `results.json`: test accuracy and loss, parameters, MACs, wall time,
  epochs, the full config and the package version (written atomically).

The "validation" metrics of the logs and of `best.keras` are measured on
the test split (there is no separate validation split, as in the paper);
`results.json` reports the final model's test accuracy and, separately,
the best per-epoch test accuracy.

Optimisation:

- Weight decay is PyTorch's (the authors' code): an L2 penalty whose
  gradient `weight_decay * w` is added to the gradient of every trainable
  variable (BN scales and biases included) and goes through the momentum.
  It is implemented as a `keras.regularizers.L2(weight_decay / 2)` on every
  trainable variable, so the logged training `loss` includes the penalty
  (the `cross_entropy` metric does not). `decoupled_weight_decay=True` uses
  Keras' own `SGD(weight_decay=...)` instead, which is decoupled (AdamW
  style, `w -= lr * weight_decay * w` outside the momentum).
- Schedules, stepped every batch: `"cosine"` (`keras.optimizers.schedules.
  CosineDecay` to 0 over all epochs, as the report), with an optional
  linear warm-up over `warmup_epochs`; `"step"` (the authors' code:
  `MultiStepLR`, the rate multiplied by `step_factor` at the epochs
  `step_milestones * epochs`, by default x0.1 at 50% and 75% of training,
  i.e. epochs 150 and 225 of 300; `step_milestones=(0.3, 0.6, 0.8),
  step_factor=0.2` gives the classic x0.2 at 60/120/160 of 200); and
  `"constant"`.
- Augmentation: see `pde_keras.input_pipeline`.

The names of the modules it is built from stay importable from here
(`training.Config`, `training.load_splits`, `training.read_log`, ...).
"""

import contextlib
import dataclasses
import pathlib
import sys
import time

import keras
import numpy as np

import pde_keras
from pde_keras import backup, callbacks as run_callbacks, inspection, input_pipeline
from pde_keras import run_directory, validation
# The public names of the modules training is built from, importable from here as before.
from pde_keras.backup import BACKUP_DIR, BackupError, Interrupted, find_backups  # noqa: F401
from pde_keras.callbacks import STABILITY_IMAGES, EpochTimer, StabilityMonitor  # noqa: F401
from pde_keras.config import DISTRIBUTIONS, SCHEDULES, Config  # noqa: F401
from pde_keras.evaluation import (  # noqa: F401
    checkpoint_confusion, confusion_matrix, predict_classes)
from pde_keras.input_pipeline import (  # noqa: F401
    AUGMENTATIONS, PAD, channel_stats, load_splits, make_dataset)
from pde_keras.run_directory import (  # noqa: F401
    UnreadableFileError, read_json, read_log, write_json, write_text)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good backup was kept."""


@dataclasses.dataclass(frozen=True)
class _Pipeline:
    """The input pipeline of one run, as `_make_pipeline` built it."""

    train_data: object  # tf.data.Dataset
    test_data: object
    images_per_epoch: int
    augmentation: str
    mean: np.ndarray
    std: np.ndarray


def train_and_evaluate(config, workdir, callbacks=(), restart=False):
    """Trains `config.model` on `config.dataset`, evaluates it, writes results.

    Args:
        config: a `Config`.
        workdir: output directory (created). Re-running with the same
            `workdir` after an interruption resumes from its backup.
        callbacks: extra `keras.callbacks.Callback`s for `Model.fit`.
        restart: delete the backup in `workdir` (if any) and train from
            scratch instead of resuming.

    Returns:
        The dict written to `workdir/results.json`.

    Raises:
        ValueError: invalid options (including the model's), or a workdir
            whose backup belongs to another dataset/model.
        pde_keras.data.DataError: missing or unreadable data.
        TrainingDivergedError: the loss became NaN or infinite.
        BackupError: `workdir` holds backups and none can be read.
        Interrupted: a SIGTERM or SIGINT stopped training (after a backup).
        OSError: a file could not be written (e.g. a full disk); the
            previous backup is intact.
    """
    start = time.time()
    if not isinstance(config, Config):
        raise validation.invalid("config", "a pde_keras.training.Config", config)
    workdir = pathlib.Path(workdir)
    backups = backup.resumable_backups(config, workdir, restart)
    dataset, train, test = input_pipeline.load_splits(config)
    # Only once the data is there: a run that cannot start writes nothing.
    workdir.mkdir(parents=True, exist_ok=True)
    run_directory.write_json(workdir / run_directory.CONFIG_FILE, config.to_json())
    with _runtime(config) as replicas:
        pipeline = _make_pipeline(config, train, test, replicas)
        core = pde_keras.models.create(
            config.model, **{"num_classes": dataset.info.num_classes, **config.model_options})
        model = build_classifier(core, dataset.info.image_shape, pipeline.mean, pipeline.std)
        _compile(model, config, int(pipeline.train_data.cardinality()))
        test_metrics, resumed_from = _fit(model, config, workdir, pipeline, backups,
                                          test[0][:run_callbacks.STABILITY_IMAGES], callbacks)
    results = _results(config, workdir, core, dataset, train, test, pipeline, replicas,
                       test_metrics, resumed_from, start)
    run_directory.write_json(workdir / run_directory.RESULTS_FILE, results)
    # Only now: until results.json is written, a re-run resumes from the backup.
    backup.delete_backups(workdir)
    return results


def _make_pipeline(config, train, test, replicas):
    """The training and test `tf.data` pipelines of a run on `replicas` devices."""
    # Distributed batches must split evenly over the devices (JAX sharding;
    # Keras' MirroredStrategy evaluation fails on uneven splits): training
    # drops the last partial batch, evaluation pads it with weight-0 examples.
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % replicas:
            raise validation.invalid(
                name, f"a multiple of the {replicas} devices of "
                f"distribution={config.distribution!r}", getattr(config, name))
    if replicas > 1 and len(train[1]) < config.batch_size:
        raise validation.invalid(
            "batch_size", f"at most the {len(train[1])} training examples when "
            "distributed (partial batches are dropped)", config.batch_size)
    augmentation = config.augmentation
    if augmentation == "auto":
        augmentation = "none" if config.dataset == "mnist" else "crop_flip"
    train_data = input_pipeline.make_dataset(
        *train, config.batch_size, augmentation=augmentation, seed=config.seed,
        drop_remainder=replicas > 1)
    test_data = input_pipeline.make_dataset(*test, config.eval_batch_size, pad_to=replicas)
    steps_per_epoch = int(train_data.cardinality())
    images_per_epoch = steps_per_epoch * config.batch_size if replicas > 1 else len(train[1])
    mean, std = input_pipeline.channel_stats(train[0])
    return _Pipeline(train_data, test_data, images_per_epoch, augmentation, mean, std)


def _compile(model, config, steps_per_epoch):
    """SGD under the schedule, the (weighted) loss and metrics, weight decay."""
    _apply_weight_decay(model, config)
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=make_schedule(config, steps_per_epoch),
            momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay if config.decoupled_weight_decay else None),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # Weighted: the padding make_dataset adds has sample weight 0.
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="cross_entropy"),
        ],
        jit_compile=config.jit_compile,
    )


def _fit(model, config, workdir, pipeline, backups, stability_images, callbacks):
    """Fits `model` (resuming from `backups`) and evaluates the final model.

    Returns:
        `(test metrics, (epoch resumed from, its step, epochs done))`.
    """
    saver = backup.BackupAndRestore(
        str(workdir / run_directory.BACKUP_DIR), config.backup_every_steps or "epoch", backups)
    # Restored before fit: the loggers' resume state depends on it.
    initial_epoch, initial_step = saver.restore(model)
    # Before the loggers, which record what these add to the epoch's logs.
    measures = [run_callbacks.EpochTimer(), run_callbacks.StabilityMonitor(stability_images)]
    # The backup last: it runs once the epoch's checkpoints and logs are written.
    with backup.stop_on_signals(saver):
        history = model.fit(
            pipeline.train_data, epochs=config.epochs, validation_data=pipeline.test_data,
            callbacks=(measures + run_callbacks.run_callbacks(workdir, resuming=bool(backups))
                       + list(callbacks) + [saver]),
            verbose=_fit_verbosity(config.verbose),
            shuffle=False,  # make_dataset shuffles
        )
    if saver.diverged is not None:
        raise TrainingDivergedError(
            f"Training diverged: the loss became {saver.diverged[1]} in epoch "
            f"{saver.diverged[0] + 1}; the backup of the last good epoch is kept in "
            f"{str(workdir / run_directory.BACKUP_DIR)!r} (re-running resumes from it; lower "
            "learning_rate first).")
    if history.epoch:  # The last epoch's validation evaluated the final model.
        metrics = {name: history.history[f"val_{name}"][-1]
                   for name in ("accuracy", "cross_entropy")}
    else:  # Resumed after the last epoch: nothing trained, evaluate.
        metrics = model.evaluate(pipeline.test_data, return_dict=True, verbose=0)
    epochs_done = max((epoch + 1 for epoch in history.epoch), default=initial_epoch)
    return metrics, (initial_epoch, initial_step, epochs_done)


def _results(config, workdir, core, dataset, train, test, pipeline, replicas, test_metrics,
             resumed_from, start):
    """The contents of `results.json`."""
    initial_epoch, initial_step, epochs_done = resumed_from
    log_path = workdir / run_directory.LOG_FILE
    log = run_directory.read_log(log_path)
    best_accuracy, best_epoch = run_directory.best_of(log)
    train_time = [t for t in log.get(run_callbacks.EpochTimer.KEY, []) if t is not None]
    if best_accuracy is None:  # No epoch logged (e.g. resumed after the last one).
        best_accuracy, best_epoch = float(test_metrics["accuracy"]), epochs_done
    macs = pde_keras.count_macs(core)
    return {
        "dataset": config.dataset,
        "model": config.model,
        "test_accuracy": float(test_metrics["accuracy"]),
        "test_loss": float(test_metrics["cross_entropy"]),
        "best_test_accuracy": best_accuracy,
        "best_epoch": best_epoch,
        "trainable_params": inspection.trainable_params(core),
        "macs": {"paper": int(macs["paper"]), "total": int(macs["total"])},
        "wall_time_s": round(time.time() - start, 2),
        # Over every epoch in log.csv (resumed parts included): the fit loop
        # alone, without start-up and the per-epoch evaluation.
        "train_images_per_s": (
            round(len(train_time) * pipeline.images_per_epoch / sum(train_time), 2)
            if train_time else None),
        # Per PDE layer, per epoch (log.csv): see StabilityMonitor.
        "stability": {
            layer.name: {number: log.get(f"{layer.name}_{number}", [])
                         for number in run_callbacks.StabilityMonitor.NUMBERS}
            for layer in inspection.pde_layers(core)},
        "epochs": epochs_done,
        "resumed_from_epoch": initial_epoch,
        "resumed_from_step": initial_step,
        "train_examples": int(len(train[1])),
        "test_examples": int(len(test[1])),
        "replicas": replicas,
        "data": {"source": dataset.info.source, "location": dataset.info.location},
        "normalization": {"mean": pipeline.mean.tolist(), "std": pipeline.std.tolist()},
        "augmentation": pipeline.augmentation,
        "checkpoints": {name: str(workdir / file)
                        for name, file in run_directory.CHECKPOINTS.items()},
        "config": config.to_json(),
        "version": pde_keras.__version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
    }


def build_classifier(core, image_shape, mean, std):
    """Wraps `core` (normalised images -> logits) to take raw pixels 0-255.

    Returns a functional model: per-channel `Normalization(mean, std**2)`,
    `core`, then the logits cast to float32 (for mixed precision).
    """
    inputs = keras.Input(image_shape, name="pixels")
    x = keras.layers.Normalization(
        mean=np.asarray(mean), variance=np.square(std), name="normalize")(inputs)
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(core(x))
    return keras.Model(inputs, logits, name=f"{core.name}_classifier")


def make_schedule(config, steps_per_epoch):
    """The learning rate (a schedule or a float) for `config`, per batch."""
    rate = config.learning_rate
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        warmup = config.warmup_epochs * steps_per_epoch
        if warmup:
            return keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=total - warmup, warmup_target=rate, warmup_steps=warmup)
        return keras.optimizers.schedules.CosineDecay(rate, decay_steps=total)
    if config.schedule == "step":
        # Epoch e (0-based) uses rate * factor^(milestones passed); the
        # schedule changes value after step `boundary`, so the first step of
        # a milestone epoch is epoch * steps_per_epoch = boundary + 1.
        epochs = [max(1, round(m * config.epochs)) for m in config.step_milestones]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries=[e * steps_per_epoch - 1 for e in epochs],
            values=[rate * config.step_factor**i for i in range(len(epochs) + 1)])
    return rate


def _apply_weight_decay(model, config):
    """PyTorch-style (coupled) L2 on every trainable variable, unless decoupled."""
    if config.weight_decay and not config.decoupled_weight_decay:
        regularizer = keras.regularizers.L2(config.weight_decay / 2)
        for variable in model.trainable_variables:
            variable.regularizer = regularizer


@contextlib.contextmanager
def _runtime(config):
    """Seeds, determinism, dtype policy and distribution scope of one run.

    Yields the number of replicas; restores the global dtype policy and
    Keras distribution afterwards.
    """
    policy = keras.config.dtype_policy()
    distribution = keras.distribution.distribution()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    if config.mixed_precision:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        if config.distribution == "mirrored":
            import tensorflow as tf

            devices = (tf.config.list_logical_devices("GPU")
                       or tf.config.list_logical_devices("CPU"))
            strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
            with strategy.scope():
                yield strategy.num_replicas_in_sync
        elif config.distribution == "data_parallel":
            devices = keras.distribution.list_devices()
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(devices=devices))
            yield len(devices)
        else:
            yield 1
    finally:
        keras.config.set_dtype_policy(policy)
        keras.distribution.set_distribution(distribution)


def _fit_verbosity(verbose):
    """`"auto"`: a progress bar on a terminal, one line per epoch otherwise."""
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return verbose
