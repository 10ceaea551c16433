r"""Trains every row of a paper table for several seeds; writes the table in markdown.

    python -m experiments.sweep --table=mnist                 # Table 1: 8 rows x 3 seeds
    python -m experiments.sweep --table=cifar --data_dir=D    # Table 2: 8 rows x 1 seed
    python -m experiments.sweep --table=cifar --dry_run       # print the runner commands
    python -m experiments.sweep --table=mnist --table_only    # rewrite the table only
    python -m experiments.sweep --table=cifar-budget --data_dir=D  # same-budget CIFAR-10

A table expands into runs (row x seed). Each run trains in this process with
`pde_keras.training.train_and_evaluate` into
`<results_dir>/<table>/<row slug>/seed<k>/`, exactly as the printed runner
command (`python -m experiments.mnist|cifar ...`) would. In-process rather
than subprocesses of the runners: TensorFlow starts once, a failed run is a
Python exception with a one-line message, and the tests can watch which runs
train; the runner commands remain the reference (`--dry_run`), and the tests
check that they build the same `Config`.

A run whose `results.json` records the planned configuration and all its
epochs is skipped; an interrupted one resumes from its backup; a directory
holding another configuration's results is an error (choose another
`--results_dir`). So a sweep can be split across sessions or machines
(`--rows`, `--seeds`) and merged by copying the run directories.

After the runs (or with `--table_only`), `<results_dir>/<table>.md` gets the
table: per row the final test accuracy, mean ± sample standard deviation over
the finished seeds, trainable parameters and MACs (from the model factory
when no run has finished), epochs, wall time per run, for MNIST the 3<->5
confusions of the final model (`last.keras`) on the test set, and the
paper's and the report's accuracies (`experiments.tables`).

Settings: MNIST as the authors' illustrative example: SGD with Nesterov
momentum 0.9, learning rate 0.01, weight decay 5e-4 (PyTorch-style L2),
batch 128, 30 epochs, with the report's cosine decay to 0 (the authors'
step decay x0.2 at epochs 60/120/160 never fires in 30 epochs, so taken
literally it is a constant rate; cosine anneals within the budget and needs
no invented milestones). CIFAR as the report's Table 2: the CIFAR runner's
defaults (batch 32, 200 epochs, learning rate 0.01, cosine, weight decay
5e-5, crop + flip augmentation). The same-budget CIFAR-10 comparison
(`cifar-budget`: ResNet32 against three ResNet32-Global rows) uses a short
schedule that converges far within 10 epochs on 2 CPU cores: batch 128 (391
steps per epoch: a quarter of batch 32's per-step overhead), learning rate
0.1 (the rate He et al. use at batch 128), a 1-epoch linear warm-up (the
first steps at full rate on an untrained network are where batch statistics
and the PDE coefficients swing most), cosine decay to 0 over the rest, weight
decay 5e-4 (the usual value for short CIFAR schedules; the authors' 5e-5 is
tuned for 300 epochs).
"""

import dataclasses
import pathlib
import shlex
import statistics
import sys

from absl import flags, logging

from experiments import runner_flags
from experiments import tables
from pde_keras import backup, command_line, config as config_module, data, evaluation
from pde_keras import run_directory, training, validation

TABLES = tuple(tables.TABLES)


@dataclasses.dataclass(frozen=True)
class Setting:
    """How a table trains: its runner, dataset, seeds and Config fields."""

    runner: str
    dataset: str
    seeds: int
    config: dict


SETTINGS = {
    "mnist": Setting("mnist", "mnist", 3, {
        "epochs": 30, "batch_size": 128, "learning_rate": 0.01, "weight_decay": 5e-4,
        "schedule": "cosine"}),
    "cifar": Setting("cifar", "cifar10", 1, {
        "epochs": 200, "batch_size": 32, "learning_rate": 0.01, "weight_decay": 5e-5,
        "schedule": "cosine"}),
    "cifar-budget": Setting("cifar", "cifar10", 1, {
        "epochs": 10, "batch_size": 128, "learning_rate": 0.1, "weight_decay": 5e-4,
        "schedule": "cosine", "warmup_epochs": 1}),
}
CONFUSION_FILE = "confusion.json"


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One training run of a sweep."""

    table: str
    row: tables.Row
    seed: int
    config: config_module.Config
    workdir: pathlib.Path

    @property
    def command(self):
        """The equivalent runner command line (a list of arguments)."""
        setting = SETTINGS[self.table]
        config = self.config
        if setting.runner == "mnist":
            options = dict(config.model_options)
            argv = [f"--backbone={config.model[len('mnist_'):]}",
                    f"--channels={options.pop('channels')}"]
        else:
            options, argv = config.model_options, [f"--model={config.model}"]
        argv += [f"--{name}={value}" for name, value in options.items()]
        argv.append(f"--dataset={config.dataset}")
        argv += [f"--{name}={getattr(config, name)}" for name in setting.config]
        if config.data_source != "auto":
            argv.append(f"--data_source={config.data_source}")
        if config.data_dir:
            argv.append(f"--data_dir={config.data_dir}")
        for name in ("train_examples", "test_examples"):
            if getattr(config, name):
                argv.append(f"--{name}={getattr(config, name)}")
        argv += [f"--seed={self.seed}", f"--model_dir={self.workdir}"]
        return ["python", "-m", f"experiments.{setting.runner}", *argv]


def plan(table, results_dir, *, rows=None, seeds=None, epochs=None, dataset=None,
         data_source="auto", data_dir=None, train_examples=0, test_examples=0):
    """The runs of `table` (a `TABLES` entry), row by row, seed by seed.

    Args:
        table: a `TABLES` entry.
        results_dir: the sweep's output directory.
        rows: row slugs to keep (None: all rows of the table).
        seeds: seeds per row, 0 to seeds - 1 (None: the table's).
        epochs, dataset: override the table's (None: keep).
        data_source, data_dir, train_examples, test_examples: as the
            `pde_keras.config.Config` fields.

    Returns:
        A list of `SweepRun`s. Raises ValueError on a bad argument.
    """
    validation.check_choice("table", table, TABLES)
    setting = SETTINGS[table]
    slugs = [row.slug for row in tables.TABLES[table]]
    for slug in rows or ():
        validation.check_choice("rows", slug, slugs)
    seeds = validation.check_positive_int("seeds", setting.seeds if seeds is None else seeds)
    fields = dict(setting.config)
    if epochs is not None:
        fields["epochs"] = epochs
    runs = []
    for row in tables.TABLES[table]:
        if rows and row.slug not in rows:
            continue
        for seed in range(seeds):
            config = config_module.Config(
                dataset=dataset or setting.dataset, model=row.name,
                model_options=dict(row.options), data_source=data_source,
                data_dir=data_dir or None, train_examples=train_examples,
                test_examples=test_examples, seed=seed, **fields)
            workdir = pathlib.Path(results_dir) / table / row.slug / f"seed{seed}"
            runs.append(SweepRun(table, row, seed, config, workdir))
    return runs


def finished_results(run):
    """`run`'s results.json if the run finished, else None.

    Raises:
        ValueError: the directory holds the results of another configuration
            (they are never overwritten).
        pde_keras.run_directory.UnreadableFileError: its results.json is garbled.
    """
    try:
        results = run_directory.read_json(run.workdir / run_directory.RESULTS_FILE)
    except FileNotFoundError:
        return None
    planned = run.config.to_json()
    difference = run_directory.differing_field(
        run_directory.recorded_config(results), planned, run_directory.result_fields(planned))
    if difference:
        name, recorded, planned_value = difference
        raise validation.invalid(
            "results_dir", f"a directory without results of another configuration "
            f"({run.workdir} holds a run with {name}={recorded!r}, this sweep "
            f"plans {name}={planned_value!r})", str(run.workdir.parents[2]))
    return results if results.get("epochs", 0) >= run.config.epochs else None


def sweep(runs, log=print):
    """Trains the unfinished `runs` (resuming interrupted ones).

    A run whose directory cannot be read (a garbled `results.json`,
    `config.json` or `log.csv`, or only unreadable backups) is reported in
    one line and left; the sweep goes on with the others.

    Returns:
        `(trained, failed)`: the runs trained, and those left.
    """
    import keras

    trained, failed = [], []
    for index, run in enumerate(runs, 1):
        try:
            if finished_results(run) is not None:
                log(f"[{index}/{len(runs)}] finished, skipped: {run.workdir}")
                continue
            log(f"[{index}/{len(runs)}] training: {shlex.join(run.command)}")
            results = training.train_and_evaluate(run.config, run.workdir)
        except (run_directory.UnreadableFileError, backup.BackupError) as error:
            log(f"[{index}/{len(runs)}] left out: {error}")
            failed.append(run)
            continue
        except OSError as error:  # Writing (a full disk): the next runs would fail too.
            raise ValueError(runner_flags.write_error(error, str(run.workdir))) from None
        if run.table == "mnist":
            confusion(run)
        results_path = run.workdir / run_directory.RESULTS_FILE
        log(f"[{index}/{len(runs)}] {runner_flags.summary(results, results_path)}")
        trained.append(run)
        keras.backend.clear_session()
    return trained, failed


def _readable_results(run):
    """`finished_results(run)`, None when its results.json is garbled (the sweep says so)."""
    try:
        return finished_results(run)
    except run_directory.UnreadableFileError:
        return None


def confusion(run):
    """The confusion matrix of `run`'s final model (`last.keras`) on its test split.

    Cached in `<workdir>/confusion.json`; computed (and cached) when missing
    or unreadable; None when neither the cache nor the checkpoint exists.
    """
    path = run.workdir / CONFUSION_FILE
    try:
        return run_directory.read_json(path)["matrix"]
    except (FileNotFoundError, run_directory.UnreadableFileError, KeyError):
        if not (run.workdir / run_directory.CHECKPOINTS["last"]).exists():
            return None
    last = run_directory.CHECKPOINTS["last"]
    matrix = evaluation.checkpoint_confusion(run.config, run.workdir / last).tolist()
    run_directory.write_json(path, {"checkpoint": last, "split": "test", "matrix": matrix})
    return matrix


def _mean_std(values, digits=2):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _published(value):
    return "-" if value is None else f"{value:.2f}"


def _wall_time(minutes, finished):
    if not minutes:
        return "-"
    cell = f"{_mean_std(minutes, 1)} min"
    return cell if len(minutes) == finished else f"{cell} ({len(minutes)} of {finished} runs)"


def render_table(table, runs):
    """The markdown table of `table`'s rows over `runs` (finished or not)."""
    mnist = table == "mnist"
    header = ["row", "model", "variant", "params", "MACs paper", "MACs total",
              "accuracy % (mean ± std)", "seeds done", "epochs", "wall time / run"]
    header += ["3<->5 confusions"] if mnist else ["test loss", "train img/s"]
    header += ["paper %", "report %"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    by_row = {}
    for run in runs:
        by_row.setdefault(run.row.slug, []).append(run)
    for slug, row_runs in by_row.items():
        row, config = row_runs[0].row, row_runs[0].config
        done = [(run, results) for run in row_runs
                if (results := _readable_results(run)) is not None]
        if done:
            first = done[0][1]
            params, macs = first["trainable_params"], first["macs"]
        else:
            num_classes = 100 if config.dataset == "cifar100" else 10
            params, _, macs = tables.measure(row, num_classes=num_classes)
        accuracy = [100 * results["test_accuracy"] for _, results in done]
        # A resumed run's wall time covers only its last part: left out.
        wall = [results["wall_time_s"] / 60 for _, results in done
                if not (results.get("resumed_from_epoch") or results.get("resumed_from_step"))]
        epochs = sorted({results["epochs"] for _, results in done})
        cells = [f"`{slug}`", f"`{row.name}`", row.variant, f"{params:,}",
                 tables.format_macs(macs["paper"]), tables.format_macs(macs["total"]),
                 _mean_std(accuracy) if done else "-", f"{len(done)}/{len(row_runs)}",
                 ", ".join(map(str, epochs)) or "-",
                 _wall_time(wall, len(done))]
        if mnist:
            matrices = [m for run, _ in done if (m := confusion(run)) is not None]
            counts = [m[3][5] + m[5][3] for m in matrices]
            cells.append(_mean_std(counts, 1) if counts else "-")
        else:
            losses = [results["test_loss"] for _, results in done]
            speeds = [s for _, results in done if (s := results.get("train_images_per_s"))]
            cells += [_mean_std(losses, 3) if losses else "-",
                      _mean_std(speeds, 1) if speeds else "-"]
        cells += [_published(row.paper_accuracy), _published(row.report_accuracy)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(table, runs, results_dir, command):
    """Writes `<results_dir>/<table>.md` (atomically); returns its path."""
    setting = SETTINGS[table]
    notes = [
        f"# {table} sweep", "",
        f"Written by `{command}`.", "",
        "Accuracy: the final model's test accuracy, mean ± sample standard deviation over the "
        "finished seeds (one value when one seed). Params: trainable parameters. MACs per "
        "image: \"paper\" counts conv, depth-wise conv and dense layers (the authors' "
        "counter), \"total\" adds the PDE arithmetic, batch norms, additions and pooling. "
        "Rows not trained yet show the model factory's params and MACs and \"-\". "
        "Wall time: over the runs not resumed from a backup (a resumed run's `wall_time_s` "
        "counts only its last part).",
        f"Settings: {setting.runner} runner, "
        + ", ".join(f"{k}={v}" for k, v in runs[0].config.to_json().items()
                    if k in setting.config or k in ("dataset", "data_source",
                                                    "train_examples", "test_examples"))
        + " (runs may override epochs: see the epochs column).",
    ]
    if table == "mnist":
        notes.append("3<->5 confusions: test images of 3 predicted as 5 plus 5 predicted as 3, "
                     "by the final model (`last.keras`), mean over the seeds whose "
                     "checkpoint or confusion.json exists.")
        notes.append("Published: the paper's 1-channel accuracies (its Conv / Residual / "
                     "Global nets, 524 params); the report's Table 1.")
    elif table == "cifar-budget":
        notes.append("Data: this project's runs use the JPEG quality-75 copy of CIFAR-10 "
                     "(`shared/data/cifar10-jpeg`, all 50,000 / 10,000 images): lossy, so accuracies "
                     "are lower than on the original pixels. Published: converged accuracies (the "
                     "paper's ResNet-32 and ResNet-Global, 300 epochs; the report's rows, 200 "
                     "epochs), not comparable with this short budget. Train img/s: training images "
                     "per second of the fit loop (evaluation and start-up excluded) over all epochs, "
                     "on whatever machine and load the run had.")
    else:
        baseline = next(row for row in tables.ROWS if row.slug == "resnet32-3stage")
        notes.append(f"Published: the report's Table 2. The paper's ResNet-32 has 3 stages "
                     f"({baseline.paper}, {baseline.paper_accuracy}%); its ResNet-Global "
                     "row is the `global` row.")
    path = pathlib.Path(results_dir) / f"{table}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    run_directory.write_text(path, "\n".join(notes) + "\n\n" + render_table(table, runs))
    return path


# ------------------------------------------------------------------- flags

# Required (checked by `plan`), but not marked so: a validator on the global
# FLAGS would fail the parsing of other programs that import this module.
_TABLE = flags.DEFINE_enum("table", None, TABLES, "Required. The table to reproduce: mnist "
                           "(the report's Table 1), cifar (its Table 2) or cifar-budget "
                           "(ResNet32 against ResNet32-Global, 10 epochs at batch 128).")
_RESULTS_DIR = flags.DEFINE_string(
    "results_dir", "results", "Sweep output: <results_dir>/<table>/<row>/seed<k>/ per run "
    "and <results_dir>/<table>.md.")
_ROWS = flags.DEFINE_list(
    "rows", [], "Row slugs to run (default: all). MNIST: "
    + ",".join(row.slug for row in tables.TABLES["mnist"]) + "; CIFAR: "
    + ",".join(row.slug for row in tables.TABLES["cifar"]) + "; CIFAR budget: "
    + ",".join(row.slug for row in tables.TABLES["cifar-budget"]) + ".")
_SEEDS = flags.DEFINE_integer(
    "seeds", None,
    "Seeds per row, 0 to seeds-1 (default: 3 for mnist, 1 for cifar and cifar-budget).",
    lower_bound=1)
_EPOCHS = flags.DEFINE_integer(
    "epochs", None,
    "Epochs per run (default: 30 for mnist, 200 for cifar, 10 for cifar-budget).",
    lower_bound=1)
_DATASET = flags.DEFINE_enum(
    "dataset", None, data.DATASETS,
    "Dataset (default: mnist for the mnist table, cifar10 for the CIFAR tables).")
_DATA_SOURCE = flags.DEFINE_enum(
    "data_source", "auto", data.SOURCES, "Where the data comes from (as the runners' flag).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Local data directory (as the runners').")
_TRAIN_EXAMPLES = flags.DEFINE_integer(
    "train_examples", 0, "Train on a seeded subset of this many examples (0: all).",
    lower_bound=0)
_TEST_EXAMPLES = flags.DEFINE_integer(
    "test_examples", 0, "Test on a seeded subset of this many examples (0: all).",
    lower_bound=0)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the runner command of every run (finished ones commented out); "
    "train and write nothing.")
_TABLE_ONLY = flags.DEFINE_bool(
    "table_only", False, "Train nothing; rewrite <results_dir>/<table>.md from the finished runs.")


def main(argv):
    del argv  # Checked by parse_flags.
    try:
        if _DRY_RUN.value and _TABLE_ONLY.value:
            raise validation.invalid("dry_run", "False with --table_only", True)
        runs = plan(
            _TABLE.value, _RESULTS_DIR.value, rows=_ROWS.value, seeds=_SEEDS.value,
            epochs=_EPOCHS.value, dataset=_DATASET.value, data_source=_DATA_SOURCE.value,
            data_dir=_DATA_DIR.value, train_examples=_TRAIN_EXAMPLES.value,
            test_examples=_TEST_EXAMPLES.value)
        if _DRY_RUN.value:
            for run in runs:
                prefix = "# finished: " if _readable_results(run) is not None else ""
                print(prefix + shlex.join(run.command))
            return
        failed = []
        try:
            if not _TABLE_ONLY.value:
                _, failed = sweep(runs, log=logging.info)
        finally:
            command = shlex.join(["python", "-m", "experiments.sweep", *sys.argv[1:]])
            path = write_table(_TABLE.value, runs, _RESULTS_DIR.value, command)
            print(f"table: {path}")
        if failed:
            raise ValueError(
                f"{len(failed)} of {len(runs)} runs left out, their directories unreadable "
                f"(see the 'left out' lines above): {', '.join(str(r.workdir) for r in failed)}")
    except backup.Interrupted as interruption:  # SIGTERM, SIGINT: the run is backed up.
        print(interruption, file=sys.stderr, flush=True)
        sys.exit(128 + interruption.signum)
    except (ValueError, training.TrainingDivergedError) as error:
        logging.debug("Error details:", exc_info=True)
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    command_line.run(main)
