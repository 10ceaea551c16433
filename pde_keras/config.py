"""`Config`: everything a training run needs, checked on construction.

`pde_keras.training.train_and_evaluate(config, workdir)` trains as a
`Config` says; the runners' flags (`experiments.runner_flags`) take their
defaults from it, and a run directory's `config.json` records it.
"""

import dataclasses
import json
import numbers

import keras

from pde_keras import data, input_pipeline, models, validation

SCHEDULES = ("cosine", "step", "constant")
DISTRIBUTIONS = ("none", "mirrored", "data_parallel")


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
        weight_decay: L2 weight decay (see `pde_keras.training`).
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
        backup_every_steps: also back up the training state every this many
            training steps of an epoch (0: at the end of every epoch only).

    Example:

    >>> from pde_keras.config import Config
    >>> config = Config(dataset="cifar10", model="resnet32_global",
    ...                 model_options={"diffusivity": "perona_malik"})
    >>> config.batch_size, config.learning_rate, config.schedule
    (32, 0.01, 'cosine')
    >>> Config(schedule="linear")
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
    backup_every_steps: int = 0

    def __post_init__(self):
        validation.check_choice("dataset", self.dataset, data.DATASETS)
        validation.check_choice("model", self.model, models.names())
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
                     "mixed_precision"):
            if not isinstance(getattr(self, name), bool):
                raise validation.invalid(name, "True or False", getattr(self, name))
        validation.check_choice("schedule", self.schedule, SCHEDULES)
        validation.check_choice("augmentation", self.augmentation,
                                input_pipeline.AUGMENTATIONS)
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


def defaults():
    """`{field: default}` of every `Config` field (the flags' defaults)."""
    return {field.name: (field.default_factory() if field.default is dataclasses.MISSING
                         else field.default)
            for field in dataclasses.fields(Config)}
