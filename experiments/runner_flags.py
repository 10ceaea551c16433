"""The runners' shared absl flags, their translation to a training Config,
and the runners' common `main`.

`define_flags(runner)` defines every flag of `python -m experiments.mnist`
(`runner="mnist"`) or `python -m experiments.cifar` (`runner="cifar"`):
the model (`--backbone`/`--channels` or `--model`), every PDE layer option
(default: the model's own), data, optimisation and run flags.
`train_from_flags(runner)` builds a `pde_keras.config.Config` from them,
calls `pde_keras.training.train_and_evaluate` and, with `--dump_maps`, draws
the maps of the trained model (`visualize.map_figures`); `run()` is
`absl.app.run(main)` with flag errors reported on one line.

Every flag named after a `Config` field sets that field and takes its
default from `Config` (the runners' `--epochs` excepted: the report's 100
and 200); every flag named after a model option (`pde_keras.models.options`)
is passed to the model when set (default None: the model's own default).
"""

import sys

from absl import flags, logging

from pde_keras import advection_diffusion, backup, command_line, config, data, global_layer
from pde_keras import input_pipeline, models, run_directory, solver, training, validation

FLAGS = flags.FLAGS
RUNNERS = ("mnist", "cifar")
MNIST_BACKBONES = tuple(n[len("mnist_"):] for n in models.names() if n.startswith("mnist_"))
CIFAR_MODELS = tuple(n for n in models.names() if not n.startswith("mnist_"))
DEFAULTS = config.defaults()
# The model options of any model: a flag of that name is passed to the model.
# (PDE options apply to the PDE models only; the MNIST runner has no
# --velocity and --init: mnist_pde's velocity is its g.)
MODEL_OPTIONS = frozenset(option for name in models.names() for option in models.options(name))
# Config fields that are not set from the flag of the same name.
_CONFIG_FIELDS_SET_APART = ("model", "model_options", "step_milestones", "jit_compile",
                            "data_dir")
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
        "data_source", DEFAULTS["data_source"], data.SOURCES,
        "Where the data comes from: auto (local if --data_dir is set, else "
        "bundled MNIST / tfds CIFAR), bundled (MNIST shipped with the package), "
        "tfds (tensorflow-datasets), local (--data_dir), synthetic (smoke tests).")
    flags.DEFINE_string(
        "data_dir", None,
        "Local data: MNIST IDX files, CIFAR python batches (folder or .tar.gz) or a "
        "train/<class>/*.jpg + test/<class>/*.jpg tree; or tfds' data directory.")
    flags.DEFINE_bool(
        "download", DEFAULTS["download"],
        "Let tfds download a dataset missing from its data directory.")
    flags.DEFINE_integer(
        "train_examples", DEFAULTS["train_examples"],
        "Train on a seeded random subset of this many examples (0: all).", lower_bound=0)
    flags.DEFINE_integer(
        "test_examples", DEFAULTS["test_examples"],
        "Evaluate on a seeded random subset of this many test examples (0: all).",
        lower_bound=0)
    flags.DEFINE_enum(
        "augmentation", DEFAULTS["augmentation"], input_pipeline.AUGMENTATIONS,
        "Training augmentation: auto (crop_flip for CIFAR, none for MNIST), none, crop "
        "(4-pixel pad + random crop) or crop_flip (and random horizontal flip).")

    # Optimisation.
    flags.DEFINE_integer(
        "epochs", 100 if mnist else 200, "Training epochs (the report's).", lower_bound=1)
    flags.DEFINE_integer(
        "batch_size", DEFAULTS["batch_size"], "Global training batch size (the report's).",
        lower_bound=1)
    flags.DEFINE_integer(
        "eval_batch_size", DEFAULTS["eval_batch_size"], "Evaluation batch size.", lower_bound=1)
    flags.DEFINE_float(
        "learning_rate", DEFAULTS["learning_rate"],
        "Peak learning rate of SGD (momentum 0.9, Nesterov).")
    flags.DEFINE_float(
        "weight_decay", DEFAULTS["weight_decay"], "Weight decay as PyTorch's SGD (L2 gradient "
        "through the momentum; the authors' default 5e-5).")
    flags.DEFINE_bool(
        "decoupled_weight_decay", DEFAULTS["decoupled_weight_decay"],
        "Use Keras' decoupled SGD weight_decay instead of PyTorch's coupled L2.")
    flags.DEFINE_enum(
        "schedule", DEFAULTS["schedule"], config.SCHEDULES,
        "Learning-rate schedule: cosine (CosineDecay to 0, as the report), step (the "
        "authors' MultiStepLR, see --step_milestones) or constant.")
    flags.DEFINE_integer(
        "warmup_epochs", DEFAULTS["warmup_epochs"], "Linear warm-up epochs (cosine schedule).",
        lower_bound=0)
    flags.DEFINE_list(
        "step_milestones", [str(m) for m in DEFAULTS["step_milestones"]],
        "Step schedule: fractions of --epochs at which the rate is multiplied by "
        "--step_factor (the authors' CIFAR code: 0.5,0.75 of 300 epochs).")
    flags.DEFINE_float("step_factor", DEFAULTS["step_factor"], "Step schedule factor.")

    # Run.
    command_line.define_run_dir_flag(
        "Output directory: results.json, log.csv, tensorboard/, best.keras, last.keras, "
        "backup/, maps/ (--dump_maps). Re-running with the same directory resumes.")
    flags.DEFINE_integer("seed", DEFAULTS["seed"], "Random seed.", lower_bound=0)
    flags.DEFINE_integer(
        "backup_every_steps", DEFAULTS["backup_every_steps"],
        "Also back up the training state into MODEL_DIR/backup/ every this many steps of an "
        "epoch (0: at the end of every epoch only); a re-run resumes at the step of the last "
        "backup.", lower_bound=0)
    flags.DEFINE_bool(
        "restart", False, "Delete MODEL_DIR/backup/ and train from scratch instead of "
        "resuming from it.")
    flags.DEFINE_bool(
        "dump_maps", False, "At the end, draw the PDE layers' coefficient maps (Dx, Dy, u, "
        "v, ux, vy, input, output) of test images 0-2 into MODEL_DIR/maps/ "
        "(python -m visualize.pde_maps draws others).")
    flags.DEFINE_bool(
        "deterministic", DEFAULTS["deterministic"],
        "Deterministic TensorFlow ops (slower; TF backend).")
    flags.DEFINE_bool(
        "mixed_precision", DEFAULTS["mixed_precision"], "Train under the mixed_float16 policy.")
    flags.DEFINE_enum(
        "jit_compile", str(DEFAULTS["jit_compile"]).lower(), tuple(_JIT_COMPILE),
        "XLA compilation (Model.compile).")
    flags.DEFINE_enum(
        "distribution", DEFAULTS["distribution"], config.DISTRIBUTIONS,
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
    """The `pde_keras.config.Config` the parsed flags describe."""
    if runner == "mnist":
        model, options = f"mnist_{FLAGS.backbone}", {"channels": FLAGS.channels}
    else:
        model, options = FLAGS.model, {}
    for name in sorted(MODEL_OPTIONS - {"channels"}):
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
    return config.Config(
        model=model, model_options=options, step_milestones=milestones,
        jit_compile=_JIT_COMPILE[FLAGS.jit_compile], data_dir=FLAGS.data_dir or None,
        **{name: FLAGS[name].value for name in DEFAULTS
           if name in FLAGS and name not in _CONFIG_FIELDS_SET_APART},
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
        run_config = config_from_flags(runner)
        logging.info("Config: %s", run_config)
        results = train(run_config, FLAGS.model_dir, restart=FLAGS.restart,
                        dump_maps=FLAGS.dump_maps)
    except backup.Interrupted as interruption:
        print(interruption, file=sys.stderr, flush=True)
        sys.exit(128 + interruption.signum)
    except (ValueError, training.TrainingDivergedError, backup.BackupError) as error:
        logging.debug("Error details:", exc_info=True)
        sys.exit(f"error: {error}")
    except OSError as error:  # Writing: a full disk, a read-only directory.
        logging.debug("Error details:", exc_info=True)
        sys.exit(f"error: {write_error(error, FLAGS.model_dir)}")
    print(summary(results, f"{FLAGS.model_dir.rstrip('/')}/{run_directory.RESULTS_FILE}"))
    return results


def train(run_config, model_dir, restart=False, dump_maps=False):
    """`train_and_evaluate`, then with `dump_maps` the coefficient maps of the
    final model for test images `map_figures.DUMP_INDICES` into
    `model_dir/maps/image<i>/` (checked before training: the model must have
    PDE layers)."""
    if not isinstance(dump_maps, bool):
        raise validation.invalid("dump_maps", "True or False", dump_maps)
    if dump_maps:
        from visualize import map_figures  # Late: matplotlib only for runs that draw.

        map_figures.check_dump_maps(run_config)
    results = training.train_and_evaluate(run_config, model_dir, restart=restart)
    if dump_maps:
        map_figures.dump_maps(model_dir)
    return results


def write_error(error, model_dir):
    """One line on an `OSError` while writing the outputs of a run in `model_dir`."""
    what = f"cannot write {error.filename!r}" if error.filename else "cannot write"
    reason = error.strerror or (str(error).strip().splitlines() or [repr(error)])[0]
    backup_dir = f"{model_dir.rstrip('/')}/{run_directory.BACKUP_DIR}"
    return (f"{what}: {reason}; the last complete backup (if any) is kept in {backup_dir!r}: "
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


def main(argv):
    """The runners' main: trains as the flags of the defined runner say."""
    del argv  # Checked by command_line.parse_flags.
    train_from_flags(_RUNNER[-1])


def run():
    """`absl.app.run(main)` with one-line flag errors."""
    command_line.run(main)
