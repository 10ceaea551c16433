"""The runners' shared absl flags, their translation to a training Config,
and the runners' common `main`.

`define_flags(runner)` defines every flag of `python -m experiments.mnist`
(`runner="mnist"`) or `python -m experiments.cifar` (`runner="cifar"`):
the model (`--backbone`/`--channels` or `--model`), every PDE layer option
(default: the model's own), data, optimisation and run flags.
`train_from_flags(runner)` builds a `pde_keras.training.Config` from them
and calls `pde_keras.training.train_and_evaluate`; `run()` is
`absl.app.run(main)` with flag errors reported on one line.
"""

import sys

from absl import app, flags, logging

from pde_keras import advection_diffusion, data, global_layer, models, solver, training
from pde_keras import validation

FLAGS = flags.FLAGS
RUNNERS = ("mnist", "cifar")
MNIST_BACKBONES = tuple(n[len("mnist_"):] for n in models.names() if n.startswith("mnist_"))
CIFAR_MODELS = tuple(n for n in models.names() if not n.startswith("mnist_"))
# Flags passed to pde_keras.models.create when defined and set (default None:
# the model's own default). PDE options apply to the PDE models only; the
# MNIST runner has no --velocity and --init (mnist_pde's velocity is its g).
MODEL_OPTION_FLAGS = (
    "diffusivity", "velocity", "init", "steps", "dt", "dx", "dy", "boundary",
    "diffusivity_constant", "perona_malik_lambda", "kernel_initializer",
    "batchnorm_momentum", "batchnorm_epsilon", "coefficient_epsilon",
)
# Flags copied to the training Config field of the same name.
CONFIG_FLAGS = (
    "dataset", "data_source", "data_dir", "download", "train_examples", "test_examples",
    "epochs", "batch_size", "eval_batch_size", "learning_rate", "weight_decay",
    "decoupled_weight_decay", "schedule", "warmup_epochs", "step_factor",
    "augmentation", "seed", "deterministic", "mixed_precision", "distribution",
    "dump_maps", "backup_every_steps",
)
_JIT_COMPILE = {"auto": "auto", "true": True, "false": False}


_RUNNER = []  # The runner whose flags define_flags defined.


def define_flags(runner):
    """Defines the flags of runner `"mnist"` or `"cifar"` on `absl.flags.FLAGS`."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    _RUNNER.append(runner)
    mnist = runner == "mnist"

    # Model.
    if mnist:
        flags.DEFINE_enum(
            "backbone", "pde", MNIST_BACKBONES,
            "Feature layer of the MNIST illustrative net (models mnist_conv, "
            "mnist_residual, mnist_pde).")
        flags.DEFINE_integer(
            "channels", 8, "Channels of the feature layer: 1 as the paper (~65% in the "
            "report), 8 as the report's second half (~95%).", lower_bound=1)
        flags.DEFINE_enum("dataset", "mnist", ("mnist",), "Dataset.")
    else:
        flags.DEFINE_enum(
            "model", "resnet32_global", CIFAR_MODELS, "Model (pde_keras.models name).")
        flags.DEFINE_enum("dataset", "cifar10", ("cifar10", "cifar100"), "Dataset.")

    # PDE layer options: GlobalLayer's (CIFAR), AdvectionDiffusion's (mnist_pde).
    model_default = "Default: the model's own."
    flags.DEFINE_enum(
        "diffusivity", None,
        advection_diffusion.DIFFUSIVITIES if mnist else global_layer.DIFFUSIVITIES,
        f"How the PDE layers make the diffusivity D. {model_default}")
    if not mnist:
        flags.DEFINE_enum(
            "velocity", None, global_layer.VELOCITIES,
            f"How the Global layers make the velocity (u, v). {model_default}")
        flags.DEFINE_enum(
            "init", None, global_layer.INITS, f"H^0 of the Global layers. {model_default}")
        flags.DEFINE_string(
            "coefficient_epsilon", None,
            "Epsilon of the Global layers' coefficient batch norms (in front of the ReLUs "
            f"that make u, v, Dx, Dy): '{global_layer.CHANNELS}' (the layer's channel count, "
            "as the authors' code) or a positive number (1e-5: pde-keras 0.1.0, unstable). "
            f"{model_default}")
        flags.register_validator(
            "coefficient_epsilon",
            lambda value: value is None or _coefficient_epsilon(value) is not None,
            f"--coefficient_epsilon must be '{global_layer.CHANNELS}' or a positive number")
    flags.DEFINE_integer("steps", None, f"PDE solver steps K. {model_default}")
    flags.DEFINE_float("dt", None, f"PDE time step. {model_default}")
    flags.DEFINE_float("dx", None, f"PDE grid spacing along the height. {model_default}")
    flags.DEFINE_float("dy", None, f"PDE grid spacing along the width. {model_default}")
    flags.DEFINE_enum(
        "boundary", None, solver.BOUNDARIES, f"PDE boundary condition. {model_default}")
    flags.DEFINE_float(
        "diffusivity_constant", None, f"D for --diffusivity=constant. {model_default}")
    flags.DEFINE_float(
        "perona_malik_lambda", None,
        f"lambda for --diffusivity=perona_malik. {model_default}")
    flags.DEFINE_string(
        "kernel_initializer", None,
        f"Initializer of every convolution kernel (a Keras name). {model_default}")
    flags.DEFINE_float(
        "batchnorm_momentum", None, f"Momentum of every batch norm. {model_default}")
    flags.DEFINE_float(
        "batchnorm_epsilon", None, f"Epsilon of every batch norm. {model_default}")

    # Data.
    flags.DEFINE_enum(
        "data_source", "auto", data.SOURCES,
        "Where the data comes from: auto (local if --data_dir is set, else "
        "bundled MNIST / tfds CIFAR), bundled (MNIST shipped with the package), "
        "tfds (tensorflow-datasets), local (--data_dir), synthetic (smoke tests).")
    flags.DEFINE_string(
        "data_dir", None,
        "Local data: MNIST IDX files, CIFAR python batches (folder or .tar.gz) or a "
        "train/<class>/*.jpg + test/<class>/*.jpg tree; or tfds' data directory.")
    flags.DEFINE_bool(
        "download", True, "Let tfds download a dataset missing from its data directory.")
    flags.DEFINE_integer(
        "train_examples", 0, "Train on a seeded random subset of this many examples "
        "(0: all).", lower_bound=0)
    flags.DEFINE_integer(
        "test_examples", 0, "Evaluate on a seeded random subset of this many test "
        "examples (0: all).", lower_bound=0)
    flags.DEFINE_enum(
        "augmentation", "auto", training.AUGMENTATIONS,
        "Training augmentation: auto (crop_flip for CIFAR, none for MNIST), none, crop "
        "(4-pixel pad + random crop) or crop_flip (and random horizontal flip).")

    # Optimisation.
    flags.DEFINE_integer(
        "epochs", 100 if mnist else 200, "Training epochs (the report's).", lower_bound=1)
    flags.DEFINE_integer(
        "batch_size", 32, "Global training batch size (the report's).", lower_bound=1)
    flags.DEFINE_integer(
        "eval_batch_size", 256, "Evaluation batch size.", lower_bound=1)
    flags.DEFINE_float(
        "learning_rate", 0.01, "Peak learning rate of SGD (momentum 0.9, Nesterov).")
    flags.DEFINE_float(
        "weight_decay", 5e-5, "Weight decay as PyTorch's SGD (L2 gradient through the "
        "momentum; the authors' default 5e-5).")
    flags.DEFINE_bool(
        "decoupled_weight_decay", False,
        "Use Keras' decoupled SGD weight_decay instead of PyTorch's coupled L2.")
    flags.DEFINE_enum(
        "schedule", "cosine", training.SCHEDULES,
        "Learning-rate schedule: cosine (CosineDecay to 0, as the report), step (the "
        "authors' MultiStepLR, see --step_milestones) or constant.")
    flags.DEFINE_integer(
        "warmup_epochs", 0, "Linear warm-up epochs (cosine schedule).", lower_bound=0)
    flags.DEFINE_list(
        "step_milestones", ["0.5", "0.75"],
        "Step schedule: fractions of --epochs at which the rate is multiplied by "
        "--step_factor (the authors' CIFAR code: 0.5,0.75 of 300 epochs).")
    flags.DEFINE_float("step_factor", 0.1, "Step schedule factor.")

    # Run.
    flags.DEFINE_string(
        "model_dir", None, "Output directory: results.json, log.csv, tensorboard/, "
        "best.keras, last.keras, backup/, maps/ (--dump_maps). Re-running with the same "
        "directory resumes.",
        required=True)
    flags.register_validator(
        "model_dir", lambda value: value is None or bool(value.strip()),
        "--model_dir must not be empty")
    flags.DEFINE_integer("seed", 0, "Random seed.", lower_bound=0)
    flags.DEFINE_integer(
        "backup_every_steps", 0, "Also back up the training state into MODEL_DIR/backup/ "
        "every this many steps of an epoch (0: at the end of every epoch only); a re-run "
        "resumes at the step of the last backup.", lower_bound=0)
    flags.DEFINE_bool(
        "restart", False, "Delete MODEL_DIR/backup/ and train from scratch instead of "
        "resuming from it.")
    flags.DEFINE_bool(
        "dump_maps", False, "At the end, draw the PDE layers' coefficient maps (Dx, Dy, u, "
        "v, ux, vy, input, output) of test images 0-2 into MODEL_DIR/maps/ "
        "(python -m visualize.pde_maps draws others).")
    flags.DEFINE_bool(
        "deterministic", False, "Deterministic TensorFlow ops (slower; TF backend).")
    flags.DEFINE_bool("mixed_precision", False, "Train under the mixed_float16 policy.")
    flags.DEFINE_enum(
        "jit_compile", "auto", tuple(_JIT_COMPILE), "XLA compilation (Model.compile).")
    flags.DEFINE_enum(
        "distribution", "none", training.DISTRIBUTIONS,
        "Scale-out: none, mirrored (tf.distribute.MirroredStrategy over the local GPUs; "
        "TensorFlow backend) or data_parallel (keras.distribution.DataParallel; JAX "
        "backend).")


def _coefficient_epsilon(text):
    """'channels', a positive number from the flag's text, or None when invalid."""
    if text == global_layer.CHANNELS:
        return text
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < float("inf") else None


def config_from_flags(runner):
    """The `pde_keras.training.Config` the parsed flags describe."""
    if runner == "mnist":
        model, options = f"mnist_{FLAGS.backbone}", {"channels": FLAGS.channels}
    else:
        model, options = FLAGS.model, {}
    for name in MODEL_OPTION_FLAGS:
        if name in FLAGS and FLAGS[name].value is not None:
            options[name] = FLAGS[name].value
    if "coefficient_epsilon" in options:
        options["coefficient_epsilon"] = _coefficient_epsilon(options["coefficient_epsilon"])
    try:
        milestones = tuple(float(m) for m in FLAGS.step_milestones)
    except ValueError:
        raise validation.invalid(
            "step_milestones", "comma-separated numbers",
            ",".join(FLAGS.step_milestones)) from None
    return training.Config(
        model=model, model_options=options, step_milestones=milestones,
        jit_compile=_JIT_COMPILE[FLAGS.jit_compile],
        **{name: FLAGS[name].value for name in CONFIG_FLAGS
           if name != "data_dir"}, data_dir=FLAGS.data_dir or None,
    )


def train_from_flags(runner):
    """Trains and evaluates as the flags say; prints a one-line summary.

    A bad value (of a flag, an option, the data or the run directory), an
    unreadable backup or a file that cannot be written (a full disk) ends
    the program with one line on stderr and exit status 1; a SIGTERM or
    SIGINT during training with one line (where the backup is) and status
    128 + the signal's number (143, 130).
    """
    try:
        config = config_from_flags(runner)
        logging.info("Config: %s", config)
        results = training.train_and_evaluate(config, FLAGS.model_dir, restart=FLAGS.restart)
    except training.Interrupted as interruption:
        print(interruption, file=sys.stderr, flush=True)
        sys.exit(128 + interruption.signum)
    except (ValueError, training.TrainingDivergedError, training.BackupError) as error:
        logging.debug("Error details:", exc_info=True)
        sys.exit(f"error: {error}")
    except OSError as error:  # Writing: a full disk, a read-only directory.
        logging.debug("Error details:", exc_info=True)
        sys.exit(f"error: {write_error(error, FLAGS.model_dir)}")
    print(summary(results, f"{FLAGS.model_dir.rstrip('/')}/results.json"))
    return results


def write_error(error, model_dir):
    """One line on an `OSError` while writing the outputs of a run in `model_dir`."""
    what = f"cannot write {error.filename!r}" if error.filename else "cannot write"
    reason = error.strerror or (str(error).strip().splitlines() or [repr(error)])[0]
    backup = f"{model_dir.rstrip('/')}/{training.BACKUP_DIR}"
    return (f"{what}: {reason}; the last complete backup (if any) is kept in {backup!r}: "
            "free space (or fix the directory) and re-run the same command to resume")


def summary(results, path):
    """One line: model, dataset, accuracy, size, cost, time, results path."""
    return (
        f"{results['model']} on {results['dataset']}: test accuracy "
        f"{results['test_accuracy']:.4f} (best {results['best_test_accuracy']:.4f}), test "
        f"loss {results['test_loss']:.4f}, {results['trainable_params']:,} parameters, "
        f"{results['macs']['paper'] / 1e6:.2f}M MACs, {results['epochs']} epochs, "
        f"{results['wall_time_s']:.0f} s; results: {path}"
    )


def parse_flags(argv):
    """absl flag parsing that reports a bad flag on one line of stderr."""
    try:
        rest = FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {str(error).splitlines()[0]} (see --helpfull)")
    if len(rest) > 1:
        sys.exit(f"error: unexpected arguments: {' '.join(rest[1:])}")
    return rest


def main(argv):
    """The runners' main: trains as the flags of the defined runner say."""
    del argv  # Checked by parse_flags.
    train_from_flags(_RUNNER[-1])


def run():
    """`absl.app.run(main)` with one-line flag errors."""
    app.run(main, flags_parser=parse_flags)
