"""The figure commands' absl flags and their common `main`.

`define_flags(command)` defines the flags of `python -m visualize.<command>`
(`pde_maps`, `mnist_features`, `confusion`, `curves`); `run(draw)` is the
command's `absl.app.run`: flag errors (parsed as the runners parse theirs,
`pde_keras.command_line.parse_flags`) and every `ValueError` the drawing
raises (a directory without a model, an image index out of range, ...)
end the program with one line `error: ...` on stderr and exit status 1.
"""

from absl import flags

from pde_keras import command_line
from visualize import evaluation_figures, trained_runs

FLAGS = flags.FLAGS
COMMANDS = ("pde_maps", "mnist_features", "confusion", "curves")


def define_flags(command):
    """Defines the flags of figure command `command` on `absl.flags.FLAGS`."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    if command == "pde_maps":
        command_line.define_run_dir_flag(
            "A run directory of python -m experiments.mnist / experiments.cifar (config.json, "
            "last.keras, best.keras).")
    else:
        flags.DEFINE_list(
            "model_dirs", None, "Comma-separated run directories of python -m "
            "experiments.mnist / experiments.cifar, one panel or curve each.", required=True)
        flags.DEFINE_list(
            "labels", None, "Names of the runs in the figure, one per --model_dirs entry "
            "(default: each run's model and options).")
    if command != "curves":
        flags.DEFINE_enum(
            "checkpoint", "last", trained_runs.CHECKPOINTS,
            "Which saved model: last (the final model of results.json) or best (best "
            "per-epoch test accuracy).")
        flags.DEFINE_string(
            "data_dir", None, "Where the runs' data is now, if it moved since training "
            "(default: the data_dir in the run's config).")
    if command in ("pde_maps", "mnist_features"):
        flags.DEFINE_integer(
            "image_index", 0, "Test image to draw: an index into the (first) run's test "
            "split, the seeded subset training evaluated on.")
        flags.DEFINE_string(
            "image", None, "An image file (PNG, JPEG, ...) to draw instead of a test image; "
            "converted to the model's channels and resized to its input size.")
    if command == "pde_maps":
        flags.DEFINE_string(
            "out_dir", None, "Output directory (default: MODEL_DIR/maps/image<INDEX>, or "
            "MODEL_DIR/maps/<file stem> with --image).")
    else:
        flags.DEFINE_string("out", None, "The PNG to write.", required=True)
    if command == "confusion":
        flags.DEFINE_list(
            "pair", [str(c) for c in evaluation_figures.DEFAULT_PAIR],
            "The two classes whose confusion is counted (the paper's 3 and 5; for "
            "CIFAR-10 those are cat and dog).")
        flags.DEFINE_integer("batch_size", 256, "Prediction batch size.", lower_bound=1)


def run(draw):
    """Runs `draw()` (it reads FLAGS) as the program, with one-line errors."""
    command_line.run_reporting_errors(draw)
