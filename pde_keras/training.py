"""Training library: `train_and_evaluate(config, workdir)`.

The runners (`python -m experiments.mnist`, `python -m experiments.cifar`)
and the tests call this one function. It loads the data (`pde_keras.data`),
builds `pde_keras.models.create(config.model, **config.model_options)`
behind a per-channel normalisation, trains it with SGD (momentum 0.9,
Nesterov) under a learning-rate schedule, evaluates it on the test split
and writes into `workdir`:

- `config.json`: the configuration (written once the data is loaded);
- `log.csv`: one row per epoch (`keras.callbacks.CSVLogger`, appended to
  when a run resumes), with the epoch's training time (`EpochTimer`) and
  every PDE layer's Courant and diffusion numbers (`StabilityMonitor`);
- `tensorboard/`: TensorBoard event files;
- `last.keras` (after every epoch) and `best.keras` (best `val_accuracy`);
  both take raw pixel values 0-255 (the normalisation is inside);
- `backup/`: the training state (`BackupAndRestore`), after every epoch
  or every `backup_every_steps` steps, deleted once `results.json` is
  written. Re-running the same command after a kill resumes from the last
  backup (mid-epoch ones at their step); `restart=True` starts over. A
  SIGTERM or SIGINT during training writes a backup of the current step
  and raises `Interrupted`. When the loss turns NaN, training stops
  (`keras.callbacks.TerminateOnNaN`), the backup of the last good epoch is
  kept and `TrainingDivergedError` is raised;
- `results.json`: test accuracy and loss, parameters, MACs, wall time,
  epochs, the full config and the package version (written atomically);
- `maps/image{i}/` with `dump_maps`: the PDE layers' coefficient maps of
  test images 0-2 of the final model (`visualize.maps`).

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
- Augmentation, in the `tf.data` input pipeline, per image: `"crop_flip"`
  (4-pixel zero padding, random 32x32 crop, random horizontal flip: the
  CIFAR default), `"crop"`, or `"none"` (the MNIST default: flipping digits
  is wrong). Randomness is seeded (stateless ops).
"""

import contextlib
import csv
import dataclasses
import json
import math
import numbers
import os
import pathlib
import re
import shutil
import signal
import sys
import threading
import tempfile
import time

import keras
import numpy as np
from absl import logging

import pde_keras
from pde_keras import data, inspection, validation

SCHEDULES = ("cosine", "step", "constant")
AUGMENTATIONS = ("auto", "none", "crop", "crop_flip")
DISTRIBUTIONS = ("none", "mirrored", "data_parallel")
PAD = 4
# Test images on which the PDE layers' Courant and diffusion numbers are
# measured after every epoch (the first of the test split, always the same).
STABILITY_IMAGES = 64
# Config fields that must match for a run to resume from a workdir's backup.
_RESUME_FIELDS = ("dataset", "model", "model_options")
BACKUP_DIR = "backup"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good backup was kept."""


class UnreadableFileError(ValueError):
    """A file of a run directory (`config.json`, `results.json`, `log.csv`) is garbled.

    Attributes:
        path: the file.
        reason: what is wrong with it (one line).
    """

    def __init__(self, path, reason):
        super().__init__(f"cannot read {str(path)!r}: {reason}")
        self.path, self.reason = path, reason


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


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything `train_and_evaluate` needs; checked on construction.

    Attributes:
        dataset: `"mnist"`, `"cifar10"` or `"cifar100"`.
        model: a `pde_keras.models.names()` entry.
        model_options: keyword options for `pde_keras.models.create`
            (`num_classes` is added from the dataset).
        data_source: a `pde_keras.data.SOURCES` entry (`"auto"`: local if
            `data_dir` is set, else bundled MNIST / tfds CIFAR).
        data_dir: local data directory, or tfds' data directory.
        download: let tfds download a dataset missing from `data_dir`.
        train_examples: use this many training examples, a seeded random
            subset (0: all).
        test_examples: likewise for the test split (0: all).
        epochs: epochs to train.
        batch_size: global training batch size (split over the devices).
        eval_batch_size: batch size of evaluation.
        learning_rate: peak learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 weight decay (see the module docstring).
        decoupled_weight_decay: use Keras' decoupled weight decay instead.
        schedule: `"cosine"`, `"step"` or `"constant"`.
        warmup_epochs: linear warm-up epochs (cosine schedule only).
        step_milestones: fractions of `epochs` at which the step schedule
            multiplies the rate by `step_factor` (increasing, in (0, 1)).
        step_factor: the step schedule's factor.
        augmentation: `"auto"` (crop_flip for CIFAR, none for MNIST),
            `"none"`, `"crop"` or `"crop_flip"`.
        seed: seeds Python, NumPy, the backend, the subsets and the input
            pipeline.
        deterministic: also make TensorFlow ops deterministic
            (`tf.config.experimental.enable_op_determinism`; TF backend).
        mixed_precision: train under the `"mixed_float16"` policy.
        jit_compile: `"auto"`, True or False (`Model.compile`).
        distribution: `"none"`, `"mirrored"` (`tf.distribute.
            MirroredStrategy` over all local GPUs, else all logical CPUs;
            TF backend) or `"data_parallel"` (`keras.distribution.
            DataParallel` over `keras.distribution.list_devices()`; JAX
            backend).
        verbose: `Model.fit` verbosity: 0 silent, 1 progress bar, 2 one line
            per epoch, `"auto"` 1 on a terminal and 2 otherwise.
        dump_maps: at the end, draw the PDE layers' coefficient maps of a
            few fixed test images into `workdir/maps/` (`visualize.maps.
            dump_maps`; the model must have PDE layers).
        backup_every_steps: also back up the training state every this many
            training steps of an epoch (0: at the end of every epoch only).

    Example:

    >>> from pde_keras import training
    >>> config = training.Config(dataset="cifar10", model="resnet32_global",
    ...                          model_options={"diffusivity": "perona_malik"})
    >>> config.batch_size, config.learning_rate, config.schedule
    (32, 0.01, 'cosine')
    >>> training.Config(schedule="linear")
    Traceback (most recent call last):
    ...
    ValueError: Invalid value for argument `schedule`: expected one of 'cosine', 'step', 'constant'. Received: schedule='linear'
    """

    dataset: str = "mnist"
    model: str = "mnist_pde"
    model_options: dict = dataclasses.field(default_factory=dict)
    data_source: str = "auto"
    data_dir: str | None = None
    download: bool = True
    train_examples: int = 0
    test_examples: int = 0
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    decoupled_weight_decay: bool = False
    schedule: str = "cosine"
    warmup_epochs: int = 0
    step_milestones: tuple = (0.5, 0.75)
    step_factor: float = 0.1
    augmentation: str = "auto"
    seed: int = 0
    deterministic: bool = False
    mixed_precision: bool = False
    jit_compile: bool | str = "auto"
    distribution: str = "none"
    verbose: int | str = "auto"
    dump_maps: bool = False
    backup_every_steps: int = 0

    def __post_init__(self):
        validation.check_choice("dataset", self.dataset, data.DATASETS)
        validation.check_choice("model", self.model, _model_names())
        if not isinstance(self.model_options, dict) or not all(
                isinstance(key, str) for key in self.model_options):
            raise validation.invalid(
                "model_options", "a dict of keyword options", self.model_options)
        data.resolve_source(self.dataset, self.data_source, self.data_dir)
        for name in ("train_examples", "test_examples", "warmup_epochs", "seed",
                     "backup_every_steps"):
            validation.check_int(name, getattr(self, name), minimum=0)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            validation.check_positive_int(name, getattr(self, name))
        validation.check_float("learning_rate", self.learning_rate, positive=True)
        validation.check_float("momentum", self.momentum, non_negative=True, below_one=True)
        validation.check_float("weight_decay", self.weight_decay, non_negative=True)
        validation.check_float("step_factor", self.step_factor, positive=True)
        for name in ("download", "nesterov", "decoupled_weight_decay", "deterministic",
                     "mixed_precision", "dump_maps"):
            if not isinstance(getattr(self, name), bool):
                raise validation.invalid(name, "True or False", getattr(self, name))
        validation.check_choice("schedule", self.schedule, SCHEDULES)
        validation.check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        validation.check_choice("distribution", self.distribution, DISTRIBUTIONS)
        if self.jit_compile not in ("auto", True, False):
            raise validation.invalid("jit_compile", "'auto', True or False", self.jit_compile)
        if self.verbose not in ("auto", 0, 1, 2):
            raise validation.invalid("verbose", "'auto', 0, 1 or 2", self.verbose)
        milestones = self.step_milestones
        if (not isinstance(milestones, (tuple, list))
                or not all(isinstance(m, numbers.Real) and 0 < m < 1 for m in milestones)
                or list(milestones) != sorted(set(milestones))):
            raise validation.invalid(
                "step_milestones", "increasing fractions of the epochs in (0, 1)",
                milestones)
        object.__setattr__(self, "step_milestones", tuple(float(m) for m in milestones))
        if self.warmup_epochs and self.schedule != "cosine":
            raise validation.invalid(
                "warmup_epochs", f"0 with schedule={self.schedule!r} (warm-up is "
                "part of the cosine schedule)", self.warmup_epochs)
        if self.warmup_epochs >= self.epochs:
            raise validation.invalid(
                "warmup_epochs", f"fewer than epochs={self.epochs}", self.warmup_epochs)
        backend = keras.backend.backend()
        needs = {"mirrored": "tensorflow", "data_parallel": "jax"}.get(self.distribution)
        if needs and backend != needs:
            raise validation.invalid(
                "distribution", f"'none' or the {needs} backend's "
                f"{self.distribution!r} (the backend is {backend})", self.distribution)

    def to_json(self):
        """The config as a JSON-serialisable dict (options passed through `repr`
        when not JSON types)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=repr))


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
    backups = _check_resume(config, workdir, restart)
    dataset, train, test = load_splits(config)
    # Only once the data is there: a run that cannot start writes nothing.
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "config.json", config.to_json())
    mean, std = channel_stats(train[0])
    augmentation = config.augmentation
    if augmentation == "auto":
        augmentation = "none" if config.dataset == "mnist" else "crop_flip"

    with _runtime(config) as replicas:
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
        train_data = make_dataset(*train, config.batch_size, augmentation=augmentation,
                                  seed=config.seed, drop_remainder=replicas > 1)
        test_data = make_dataset(*test, config.eval_batch_size, pad_to=replicas)
        steps_per_epoch = int(train_data.cardinality())
        images_per_epoch = steps_per_epoch * config.batch_size if replicas > 1 else len(train[1])

        core = pde_keras.models.create(
            config.model, **{"num_classes": dataset.info.num_classes, **config.model_options})
        if config.dump_maps and not inspection.pde_layers(core):
            raise validation.invalid(
                "dump_maps", f"False for model {config.model!r}, which has no PDE layers "
                "(GlobalLayer, AdvectionDiffusion)", config.dump_maps)
        model = build_classifier(core, dataset.info.image_shape, mean, std)
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
                keras.metrics.SparseCategoricalCrossentropy(
                    from_logits=True, name="cross_entropy"),
            ],
            jit_compile=config.jit_compile,
        )
        backup = _BackupAndRestore(
            str(workdir / BACKUP_DIR), config.backup_every_steps or "epoch", backups)
        # Restored before fit: the loggers' resume state depends on it.
        initial_epoch, initial_step = backup.restore(model)
        # Before the loggers, which record what these add to the epoch's logs.
        measures = [EpochTimer(), StabilityMonitor(test[0][:STABILITY_IMAGES])]
        # The backup last: it runs once the epoch's checkpoints and logs are written.
        with _stop_on_signals(backup):
            history = model.fit(
                train_data, epochs=config.epochs, validation_data=test_data,
                callbacks=(measures + _callbacks(workdir, initial_epoch, resuming=bool(backups))
                           + list(callbacks) + [backup]),
                verbose=_fit_verbosity(config.verbose),
                shuffle=False,  # make_dataset shuffles
            )
        if backup.diverged is not None:
            raise TrainingDivergedError(
                f"Training diverged: the loss became {backup.diverged[1]} in epoch "
                f"{backup.diverged[0] + 1}; the backup of the last good epoch is kept in "
                f"{str(workdir / 'backup')!r} (re-running resumes from it; lower "
                "learning_rate first).")
        if history.epoch:  # The last epoch's validation evaluated the final model.
            test_metrics = {name: history.history[f"val_{name}"][-1]
                            for name in ("accuracy", "cross_entropy")}
        else:  # Resumed after the last epoch: nothing trained, evaluate.
            test_metrics = model.evaluate(test_data, return_dict=True, verbose=0)

    epochs_done = max((epoch + 1 for epoch in history.epoch), default=initial_epoch)
    best_accuracy, best_epoch = _best_epoch(workdir / "log.csv")
    log = read_log(workdir / "log.csv")
    train_time = [t for t in log.get(EpochTimer.KEY, []) if t is not None]
    if best_accuracy is None:  # No epoch logged (e.g. resumed after the last one).
        best_accuracy, best_epoch = float(test_metrics["accuracy"]), epochs_done
    macs = pde_keras.count_macs(core)
    if config.dump_maps:
        _maps().dump_maps(model, *test, dataset.info.class_names, workdir / "maps")
    results = {
        "dataset": config.dataset,
        "model": config.model,
        "test_accuracy": float(test_metrics["accuracy"]),
        "test_loss": float(test_metrics["cross_entropy"]),
        "best_test_accuracy": best_accuracy,
        "best_epoch": best_epoch,
        "trainable_params": int(sum(math.prod(v.shape) for v in core.trainable_variables)),
        "macs": {"paper": int(macs["paper"]), "total": int(macs["total"])},
        "wall_time_s": round(time.time() - start, 2),
        # Over every epoch in log.csv (resumed parts included): the fit loop
        # alone, without start-up and the per-epoch evaluation.
        "train_images_per_s": (
            round(len(train_time) * images_per_epoch / sum(train_time), 2)
            if train_time else None),
        # Per PDE layer, per epoch (log.csv): see StabilityMonitor.
        "stability": {
            layer.name: {number: log.get(f"{layer.name}_{number}", [])
                         for number in StabilityMonitor.NUMBERS}
            for layer in inspection.pde_layers(core)},
        "epochs": epochs_done,
        "resumed_from_epoch": initial_epoch,
        "resumed_from_step": initial_step,
        "train_examples": int(len(train[1])),
        "test_examples": int(len(test[1])),
        "replicas": replicas,
        "data": {"source": dataset.info.source, "location": dataset.info.location},
        "normalization": {"mean": mean.tolist(), "std": std.tolist()},
        "augmentation": augmentation,
        "checkpoints": {"last": str(workdir / "last.keras"),
                        "best": str(workdir / "best.keras")},
        "config": config.to_json(),
        "version": pde_keras.__version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
    }
    write_json(workdir / "results.json", results)
    # Only now: until results.json is written, a re-run resumes from it.
    shutil.rmtree(workdir / BACKUP_DIR, ignore_errors=True)
    return results


# ------------------------------------------------------------- model pieces


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


# --------------------------------------------------------------------- data


def channel_stats(images):
    """Per-channel mean and standard deviation of uint8 NHWC `images`.

    Exact (from per-channel histograms), without a float copy of the data.
    """
    values = np.arange(256, dtype=np.float64)
    counts = np.stack([
        np.bincount(images[..., c].ravel(), minlength=256) for c in range(images.shape[-1])
    ]).astype(np.float64)
    total = counts.sum(axis=1)
    mean = counts @ values / total
    variance = counts @ values**2 / total - mean**2
    return mean, np.sqrt(np.maximum(variance, 0.0))


def make_dataset(images, labels, batch_size, *, augmentation="none", seed=None,
                 drop_remainder=False, pad_to=1):
    """A batched `tf.data.Dataset` of (float32 pixels 0-255, int64 labels).

    With `seed` (training) the examples are shuffled every epoch and
    augmented per image: `"crop"` pads 4 zero pixels and crops back at a
    random offset, `"crop_flip"` also flips left-right with probability 1/2.
    Without `seed` (evaluation), the order is kept and nothing is random.
    With `pad_to` > 1, zero images are appended until the count is a
    multiple of `pad_to`, and the elements carry a third entry, the sample
    weight: 1 for the examples, 0 for the padding.
    """
    import tensorflow as tf

    validation.check_choice("augmentation", augmentation, AUGMENTATIONS[1:])
    tensors = (images, labels)
    padding = -len(labels) % pad_to
    if pad_to > 1:
        weights = np.concatenate([np.ones(len(labels)), np.zeros(padding)]).astype("float32")
        tensors = (np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)]),
                   np.concatenate([labels, np.zeros(padding, labels.dtype)]), weights)
    dataset = tf.data.Dataset.from_tensor_slices(tensors)
    shape = images.shape[1:]
    if seed is not None:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        if augmentation != "none":
            # One stateless seed pair per image, new every epoch.
            seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
            dataset = tf.data.Dataset.zip(dataset, seeds.batch(2))

            def augment(example, pair):
                image, label = example
                crop_seed, flip_seed = tf.unstack(tf.random.split(pair, 2))
                image = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]])
                image = tf.image.stateless_random_crop(image, shape, seed=crop_seed)
                if augmentation == "crop_flip":
                    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
                return image, label

            dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder).map(
        lambda x, *rest: (tf.cast(x, tf.float32), *rest),
        num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def load_splits(config):
    """The data a run of `config` trains and evaluates on.

    Args:
        config: a `Config` (its dataset, data source and directory, example
            counts and seed).

    Returns:
        `(dataset, (train_images, train_labels), (test_images,
        test_labels))`: the loaded `pde_keras.data.Dataset` and the seeded
        subsets of its splits that `train_and_evaluate` uses (uint8 pixels).
    """
    dataset = data.load(
        config.dataset, config.data_source, config.data_dir, download=config.download,
        synthetic_sizes=(config.train_examples or 2048, config.test_examples or 512),
    )
    rng = np.random.default_rng(config.seed)
    train = _subset(dataset.train_images, dataset.train_labels, config.train_examples,
                    "train_examples", rng)
    test = _subset(dataset.test_images, dataset.test_labels, config.test_examples,
                   "test_examples", rng)
    return dataset, train, test


def confusion_matrix(labels, predictions, num_classes):
    """`counts[i, j]`: how many examples of class `i` were predicted as `j` (NumPy)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def predict_classes(model, images, batch_size=256):
    """The predicted classes of uint8 `images`, fed as training evaluates them."""
    dataset = make_dataset(images, np.zeros(len(images), np.int64), batch_size)
    return np.argmax(model.predict(dataset, verbose=0), axis=-1)


def checkpoint_confusion(config, checkpoint):
    """The confusion matrix of the `.keras` `checkpoint` on `config`'s test split."""
    dataset, _, (images, labels) = load_splits(config)
    predictions = predict_classes(keras.saving.load_model(checkpoint), images,
                                  config.eval_batch_size)
    return confusion_matrix(labels, predictions, dataset.info.num_classes)


def _subset(images, labels, count, name, rng):
    """A seeded random subset of `count` examples (all when 0), order kept."""
    if not count:
        return images, labels
    if count > len(labels):
        raise validation.invalid(
            name, f"0 (all) or at most {len(labels)} (the split's size)", count)
    index = np.sort(rng.permutation(len(labels))[:count])
    return images[index], labels[index]


# ------------------------------------------------------- callbacks, runtime


class _BackupAndRestore(keras.callbacks.BackupAndRestore):
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
    loss)`. When `signum` is set (by `_stop_on_signals`), the next step's
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
            write_json(incomplete / _METADATA, {"epoch": epoch, "step": step})
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
def _stop_on_signals(backup):
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


class EpochTimer(keras.callbacks.Callback):
    """Logs each epoch's training time (before its evaluation) as `train_time_s`.

    Placed before `CSVLogger` and `TensorBoard` in the callback list, so
    that they record it with the epoch's other metrics.
    """

    KEY = "train_time_s"

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._train_time = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        # Within `fit`, evaluation follows the epoch's training steps.
        if self._train_time is None:
            self._train_time = time.perf_counter() - self._start

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            elapsed = self._train_time or time.perf_counter() - self._start
            logs[self.KEY] = round(elapsed, 3)


class StabilityMonitor(keras.callbacks.Callback):
    """Logs each PDE layer's largest Courant and diffusion numbers per epoch.

    Measured on a fixed batch of test images in inference mode
    (`pde_keras.inspection.stability_numbers`) and added to the epoch's logs
    as `<layer>_courant` and `<layer>_diffusion_number`, so that `CSVLogger`
    and `TensorBoard` placed after it record them. The scheme's leapfrog
    advection needs a Courant number below 1. Nothing is logged for models
    without PDE layers.

    Args:
        images: the batch, as the trained model takes it (raw pixels).
    """

    NUMBERS = ("courant", "diffusion_number")

    def __init__(self, images):
        super().__init__()
        self.images = np.asarray(images, dtype="float32")

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for layer, measured in inspection.stability_numbers(self.model, self.images).items():
            for number in self.NUMBERS:
                logs[f"{layer}_{number}"] = measured[number]


def _callbacks(workdir, initial_epoch, resuming):
    best_accuracy, _ = _best_epoch(workdir / "log.csv") if resuming else (None, None)
    return [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(str(workdir / "log.csv"), append=resuming),
        keras.callbacks.ModelCheckpoint(str(workdir / "last.keras")),
        keras.callbacks.ModelCheckpoint(
            str(workdir / "best.keras"), monitor="val_accuracy", mode="max",
            save_best_only=True, initial_value_threshold=best_accuracy),
        keras.callbacks.TensorBoard(str(workdir / "tensorboard"), write_graph=False),
    ]


def _check_resume(config, workdir, restart):
    """The readable backups `workdir` resumes from, newest first ([] if none).

    With `restart`, deletes the backup directory and returns [].

    Raises:
        ValueError: the backup belongs to another dataset or model, or the
            run's `config.json` is unreadable.
        BackupError: there are backups and none is readable.
    """
    if restart:
        shutil.rmtree(workdir / BACKUP_DIR, ignore_errors=True)
        return []
    backups = find_backups(workdir)
    if not backups:
        return []
    try:
        previous = read_json(workdir / "config.json")
    except FileNotFoundError:
        previous = {}
    except UnreadableFileError as error:
        raise UnreadableFileError(
            error.path, f"{error.reason}; it is the configuration of the backup in "
            f"{str(workdir / BACKUP_DIR)!r}: repair it, or re-run with --restart to train "
            "from scratch") from None
    try:  # The log too: resuming appends to it and reads its best epoch.
        _best_epoch(workdir / "log.csv")
    except UnreadableFileError as error:
        raise UnreadableFileError(
            error.path, f"{error.reason}; remove it (resuming then logs the remaining "
            "epochs only) or re-run with --restart to train from scratch") from None
    current = config.to_json()
    for name in _RESUME_FIELDS:
        if previous.get(name) != current[name]:
            raise validation.invalid(
                "workdir", f"a new directory, or the one of a run with "
                f"{name}={previous.get(name)!r} to resume it (it holds that run's backup, "
                f"and this run has {name}={current[name]!r})", str(workdir))
    return backups


def _best_epoch(log_path):
    """(best val_accuracy, its 1-based epoch) in the CSV log, or (None, None)."""
    log = read_log(log_path)
    rows = [(accuracy, int(epoch) + 1)
            for accuracy, epoch in zip(log.get("val_accuracy", []), log.get("epoch", []))
            if accuracy is not None and epoch is not None]
    # The first of equal accuracies, as ModelCheckpoint keeps it.
    return max(rows, key=lambda row: row[0]) if rows else (None, None)


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


# -------------------------------------------------------------------- misc


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


def _fit_verbosity(verbose):
    """`"auto"`: a progress bar on a terminal, one line per epoch otherwise."""
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return verbose


def _model_names():
    return pde_keras.models.names()


def _maps():
    """`visualize.maps`, imported late: matplotlib only for runs that draw."""
    from visualize import maps

    return maps
