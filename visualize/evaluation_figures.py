"""Confusion matrices and training curves of trained trained_runs.

Confusion matrices (`python -m visualize.confusion`): each run's model
predicts its test split (the seeded subset training evaluated on, fed by
`pde_keras.input_pipeline.make_dataset` as in training), rows are the true class,
columns the predicted one; cells are coloured by the fraction of the true
class and annotated with counts. The paper's 3<->5 confusion (any pair of
classes: for CIFAR-10, 3 and 5 are cat and dog) is counted as the 3s
predicted as 5 plus the 5s predicted as 3, and as a percentage of the test
3s and 5s (the blog's "Confusion b/w 3 and 5 (%)").

Training curves (`python -m visualize.curves`): loss and accuracy against
the epoch from each run's `log.csv`, train dashed and test solid, one
colour per run. The loss is the cross-entropy (`cross_entropy` column),
without the L2 penalty that the logged `loss` includes.
"""

import pathlib

import numpy as np
from matplotlib.ticker import MaxNLocator

from pde_keras import evaluation, run_directory, validation
from visualize import plots, trained_runs

CONFUSION_PANEL_PX = (560, 520)
CURVES_PX = (1200, 460)
# With the PDE layers' Courant numbers as a third panel.
CURVES_COURANT_PX = (1700, 460)
COURANT_SUFFIX = "_courant"
DEFAULT_PAIR = (3, 5)
# Counts are written in the cells up to this many classes (CIFAR-10, MNIST).
ANNOTATE_UP_TO = 20


# ---------------------------------------------------------------- confusion


def pair_confusion(matrix, first, second):
    """How often classes `first` and `second` are taken for each other.

    Returns:
        A dict: `classes`, `first_as_second`, `second_as_first`, `total`
        (their sum), `examples` (test examples of the two classes) and
        `percent` (100 * total / examples).
    """
    first_as_second, second_as_first = int(matrix[first, second]), int(matrix[second, first])
    total = first_as_second + second_as_first
    examples = int(matrix[first].sum() + matrix[second].sum())
    return {
        "classes": [int(first), int(second)],
        "first_as_second": first_as_second,
        "second_as_first": second_as_first,
        "total": total,
        "examples": examples,
        "percent": 100.0 * total / examples if examples else 0.0,
    }


def check_pair(pair, num_classes):
    """`pair` as two different class indices below `num_classes`."""
    try:
        first, second = (int(value) for value in pair)
    except (TypeError, ValueError):
        first = second = None
    if first is None or first == second or not (
            0 <= first < num_classes and 0 <= second < num_classes):
        raise trained_runs.VisualizeError(str(validation.invalid(
            "pair", f"two different class indices in [0, {num_classes - 1}]",
            ",".join(str(value) for value in pair) if isinstance(pair, (list, tuple))
            else pair)))
    return first, second


def pair_summary(label, entry, class_names):
    """One line: accuracy and the pair's confusions of one run."""
    pair = entry["pair"]
    first, second = (class_names[index] for index in pair["classes"])
    return (f"{label}: accuracy {entry['accuracy']:.4f} on {entry['test_examples']} test "
            f"images; {first}<->{second} confusions: {pair['total']} ({first} as {second}: "
            f"{pair['first_as_second']}, {second} as {first}: {pair['second_as_first']}), "
            f"{pair['percent']:.2f}% of the {pair['examples']} test {first}s and {second}s")


def confusion_figure(panels, class_names, pair):
    """One matrix per run: `panels` is `[(title, matrix)]`; `pair` is outlined."""
    count = len(panels)
    fig = plots.figure(CONFUSION_PANEL_PX[0] * count, CONFUSION_PANEL_PX[1])
    axes = fig.subplots(1, count, squeeze=False)[0]
    num_classes = len(class_names)
    ticks = np.arange(num_classes)
    for ax, (title, matrix) in zip(axes, panels):
        rows = matrix.sum(axis=1, keepdims=True)
        fractions = matrix / np.maximum(rows, 1)
        image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
        bar.set_label("fraction of the true class", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        if num_classes <= ANNOTATE_UP_TO:
            for (true, predicted), value in np.ndenumerate(matrix):
                colour = "white" if fractions[true, predicted] > 0.5 else "black"
                ax.text(predicted, true, str(value), ha="center", va="center", fontsize=7,
                        color=colour)
            ax.set_xticks(ticks, class_names, rotation=90, fontsize=8)
            ax.set_yticks(ticks, class_names, fontsize=8)
        for true, predicted in (pair, pair[::-1]):
            ax.add_patch(_cell_outline(true, predicted))
        ax.set_xlabel("predicted", fontsize=9)
        ax.set_ylabel("true", fontsize=9)
        ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.1 / count, right=1 - 0.04 / count, bottom=0.18, top=0.88,
                        wspace=0.35)
    return fig


def write_confusion(model_dirs, out, labels=None, pair=DEFAULT_PAIR, checkpoint="last",
                    data_dir=None, batch_size=256):
    """`python -m visualize.confusion`: the confusion matrices of trained_runs.

    Writes `out` (PNG) and beside it the same name with `.json`: per run
    its label, model directory, checkpoint, accuracy, test examples, the
    matrix and the pair's counts (`pair_confusion`).

    Args:
        model_dirs: run directories (one panel each).
        out: the PNG to write.
        labels: optional names of the trained_runs.
        pair: the two classes whose confusion is counted (the paper's 3, 5).
        checkpoint: `"last"` or `"best"`.
        data_dir: where the runs' data is now, if it moved.
        batch_size: prediction batch size.

    Returns:
        `(png_path, json_path, lines)`, `lines` one summary line per run
        (`pair_summary`).
    """
    trained_runs.check_model_dirs(model_dirs, labels)
    labels = trained_runs.labels_for(model_dirs, labels)
    loaded = [trained_runs.TrainedRun(model_dir, checkpoint, data_dir) for model_dir in model_dirs]
    class_names = loaded[0].test_split.class_names
    pair = check_pair(pair, len(class_names))
    report, panels, lines = {}, [], []
    for label, run in zip(labels, loaded):
        split = run.test_split
        if split.class_names != class_names:
            raise trained_runs.VisualizeError(
                f"The runs have different classes ({str(run.model_dir)!r}: "
                f"{len(split.class_names)} classes): expected runs on one dataset.")
        predictions = evaluation.predict_classes(run.model, split.images, batch_size)
        matrix = evaluation.confusion_matrix(split.labels, predictions, len(class_names))
        entry = {
            "model_dir": str(run.model_dir),
            "checkpoint": run.model_path.name,
            "accuracy": float(np.trace(matrix) / matrix.sum()),
            "test_examples": int(matrix.sum()),
            "pair": pair_confusion(matrix, *pair),
            "matrix": matrix.tolist(),
        }
        report[label] = entry
        lines.append(pair_summary(label, entry, class_names))
        first, second = (class_names[index] for index in pair)
        panels.append((f"{label}\naccuracy {entry['accuracy']:.2%}; {first}<->{second}: "
                       f"{entry['pair']['total']} ({entry['pair']['percent']:.2f}%)", matrix))
    out = plots.save(confusion_figure(panels, class_names, pair), out)
    report_path = out.with_suffix(".json")
    run_directory.write_json(report_path, {"class_names": list(class_names), "runs": report})
    return out, report_path, lines


def _cell_outline(row, column):
    from matplotlib.patches import Rectangle

    return Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red",
                     linewidth=1.5)


# ------------------------------------------------------------------- curves


def read_log(model_dir):
    """A run's `log.csv` as `{column: float array}`, one row per epoch (1-based `epoch`).

    A resumed run may log an epoch twice; the last row counts
    (`pde_keras.run_directory.epoch_log`). Missing values are NaN.
    """
    path = pathlib.Path(model_dir) / run_directory.LOG_FILE
    if not path.is_file():
        raise trained_runs.VisualizeError(
            f"No training log in {str(path.parent)!r}: expected {path.name}, "
            f"{trained_runs.WRITTEN_BY}.")
    try:
        columns = run_directory.epoch_log(path)
    except run_directory.UnreadableFileError as error:
        raise trained_runs.VisualizeError(f"Cannot read {str(path)!r}: {error.reason}") from None
    if not columns:
        raise trained_runs.VisualizeError(f"The training log {str(path)!r} has no epochs yet.")
    return {name: np.array([np.nan if value is None else value for value in values])
            for name, values in columns.items()}


def curves_figure(logs):
    """Loss and accuracy against the epoch; `logs` is `[(label, read_log(...))]`.

    One colour per run, train dashed and test solid; the legend (right)
    names the runs and the two line styles. When runs logged their PDE
    layers' Courant numbers (`<layer>_courant`), a third panel draws them,
    one marker per layer (the scheme's advection needs them below 1).
    """
    from matplotlib.lines import Line2D

    layers = list(dict.fromkeys(name[:-len(COURANT_SUFFIX)] for _, log in logs
                                for name in log if name.endswith(COURANT_SUFFIX)))
    fig = plots.figure(*(CURVES_COURANT_PX if layers else CURVES_PX))
    axes = fig.subplots(1, 3 if layers else 2)
    colours = [f"C{i % 10}" for i in range(len(logs))]
    markers = dict(zip(layers, "os^vD<>pP*"))
    last_epoch = max(int(log["epoch"][-1]) for _, log in logs)
    if layers:
        for colour, (_, log) in zip(colours, logs):
            for layer in layers:
                if layer + COURANT_SUFFIX in log:
                    axes[2].plot(log["epoch"], log[layer + COURANT_SUFFIX],
                                 "-" + markers.get(layer, "o"), color=colour, markersize=4)
        axes[2].axhline(1.0, color="red", linewidth=0.8, linestyle=":")
        axes[2].set_title("largest Courant number (test images, inference)", fontsize=10)
    for ax, metric, title in ((axes[0], "cross_entropy", "loss (cross-entropy)"),
                              (axes[1], "accuracy", "accuracy")):
        for colour, (_, log) in zip(colours, logs):
            for prefix, style in (("", "--o"), ("val_", "-o")):
                # Logs without the cross_entropy metric: the loss (with the L2 term).
                values = log.get(prefix + metric)
                if values is None and metric == "cross_entropy":
                    values = log.get(prefix + "loss")
                if values is not None:
                    ax.plot(log["epoch"], values, style, color=colour, markersize=3)
        ax.set_title(title, fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colour, label=label)
               for colour, (label, _) in zip(colours, logs)]
    handles += [Line2D([], [], color="black", linestyle="--", label="train"),
                Line2D([], [], color="black", label="test")]
    handles += [Line2D([], [], color="black", marker=markers[layer], label=layer)
                for layer in layers]
    right = 0.78 if layers else 0.69
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(right + 0.01, 0.5),
               fontsize=8, handlelength=3, frameon=False)
    fig.subplots_adjust(left=0.05 if layers else 0.06, right=right, bottom=0.12, top=0.9,
                        wspace=0.25)
    return fig


def write_curves(model_dirs, out, labels=None):
    """`python -m visualize.curves`: the runs' training curves in one PNG.

    Returns:
        The path written.
    """
    trained_runs.check_model_dirs(model_dirs, labels)
    labels = trained_runs.labels_for(model_dirs, labels)
    logs = [(label, read_log(model_dir)) for label, model_dir in zip(labels, model_dirs)]
    return plots.save(curves_figure(logs), out)

