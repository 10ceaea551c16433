"""`python -m experiments.sweep`: planning, dry runs, a tiny real sweep that skips
finished runs, the markdown table, and one-line flag errors."""

import json
import shlex
import subprocess
import sys
import textwrap

import pytest
from absl import flags

from experiments import sweep, tables
from pde_keras import command_line, training
from test_runners import ROOT, _env, _run

TINY = {"data_source": "synthetic", "train_examples": 64, "test_examples": 32, "epochs": 1}


def _sweep(*flags, **kwargs):
    return _run(["-m", "experiments.sweep", *flags], **kwargs)


@pytest.fixture
def main(capsys):
    """`main(*flags)`: the sweep's flag parsing and main in this process; returns
    (exit status, stdout, stderr)."""

    def run(*argv):
        status = 0
        try:
            command_line.parse_flags(["sweep", *argv])
            sweep.main(["sweep"])
        except SystemExit as exit:
            status = exit.code
        finally:
            flags.FLAGS.unparse_flags()
        out, err = capsys.readouterr()
        return status, out, err

    return run


# ------------------------------------------------------------------ planning


def test_rows_are_the_report_tables():
    mnist = [(row.name, row.options) for row in tables.TABLES["mnist"]]
    assert mnist == [(f"mnist_{backbone}", {"channels": channels, **diffusivity})
                     for channels in (1, 8)
                     for backbone, diffusivity in (("conv", {}), ("residual", {}), ("pde", {}),
                                                   ("pde", {"diffusivity": "perona_malik"}))]
    cifar = tables.TABLES["cifar"]
    assert cifar[0].name == "resnet32_4stage" and cifar[0].report_accuracy == 93.92
    assert [row.name for row in cifar[1:]] == ["resnet32_global"] * 7
    slugs = [row.slug for row in tables.ROWS]
    assert len(set(slugs)) == len(slugs) and all(slugs)


def test_plan_mnist_settings(tmp_path):
    runs = sweep.plan("mnist", tmp_path)
    assert len(runs) == 8 * 3
    assert [run.seed for run in runs[:4]] == [0, 1, 2, 0]
    config = runs[0].config
    assert (config.epochs, config.batch_size, config.learning_rate, config.momentum,
            config.nesterov, config.weight_decay, config.schedule) == (
        30, 128, 0.01, 0.9, True, 5e-4, "cosine")
    assert runs[-1].workdir == tmp_path / "mnist" / "pde-pm-c8" / "seed2"


def test_plan_cifar_budget_settings(tmp_path):
    runs = sweep.plan("cifar-budget", tmp_path, data_dir="/data/jpeg")
    assert [(run.row.slug, run.config.model, run.config.model_options) for run in runs] == [
        ("resnet32", "resnet32", {}),
        ("global", "resnet32_global", {}),
        ("global-perona-malik", "resnet32_global", {"diffusivity": "perona_malik"}),
        ("global-k1", "resnet32_global", {"steps": 1}),
    ]
    config = runs[0].config
    assert (config.dataset, config.epochs, config.batch_size, config.learning_rate,
            config.weight_decay, config.schedule, config.warmup_epochs, config.train_examples) == (
        "cifar10", 10, 128, 0.1, 5e-4, "cosine", 1, 0)
    assert shlex.join(runs[-1].command) == (
        "python -m experiments.cifar --model=resnet32_global --steps=1 --dataset=cifar10 "
        "--epochs=10 --batch_size=128 --learning_rate=0.1 --weight_decay=0.0005 "
        "--schedule=cosine --warmup_epochs=1 --data_dir=/data/jpeg --seed=0 "
        f"--model_dir={tmp_path}/cifar-budget/global-k1/seed0")


def test_cifar_table_shows_test_loss_and_speed(tmp_path):
    runs = sweep.plan("cifar-budget", tmp_path, rows=["resnet32", "global-k1"])
    runs[0].workdir.mkdir(parents=True)
    training.write_json(runs[0].workdir / "results.json", {
        "config": runs[0].config.to_json(), "epochs": 10, "test_accuracy": 0.8512,
        "test_loss": 0.4567, "train_images_per_s": 81.26, "wall_time_s": 7200,
        "trainable_params": 466906, "macs": {"paper": 69_120_000, "total": 69_590_000}})
    header, _, done, untrained = sweep.render_table("cifar-budget", runs).splitlines()
    assert header.split(" | ")[-4:] == ["test loss", "train img/s", "paper %", "report % |"]
    assert done.split(" | ")[6:] == ["85.12", "1/1", "10", "120.0 min", "0.457", "81.3",
                                     "92.49", "- |"]
    assert untrained.split(" | ")[6:11] == ["-", "0/1", "-", "-", "-"]


def test_results_without_a_newer_config_field_count_as_its_default(tmp_path):
    """Runs recorded before a Config field existed stay finished (and resumable)."""
    run = sweep.plan("cifar-budget", tmp_path, rows=["resnet32"])[0]
    run.workdir.mkdir(parents=True)
    recorded = run.config.to_json()
    del recorded["warmup_epochs"]  # As if recorded before the field existed: default 0.
    training.write_json(run.workdir / "results.json", {"config": recorded, "epochs": 10})
    with pytest.raises(ValueError, match="holds a run with warmup_epochs=0, this sweep plans "
                                         "warmup_epochs=1"):
        sweep.finished_results(run)
    recorded["warmup_epochs"] = 1
    del recorded["deterministic"]  # Default False, as planned.
    training.write_json(run.workdir / "results.json", {"config": recorded, "epochs": 10})
    assert sweep.finished_results(run)["epochs"] == 10


def test_dry_run_prints_runner_commands(tmp_path, main):
    status, out, err = main("--table=cifar", "--dry_run", "--epochs=3", "--data_dir=/data/c10",
                            f"--results_dir={tmp_path}")
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == 8
    assert lines[0] == (
        "python -m experiments.cifar --model=resnet32_4stage --dataset=cifar10 --epochs=3 "
        "--batch_size=32 --learning_rate=0.01 --weight_decay=5e-05 --schedule=cosine "
        f"--data_dir=/data/c10 --seed=0 --model_dir={tmp_path}/cifar/resnet32/seed0")
    assert "--velocity=residual --diffusivity=residual" in lines[3]
    assert lines[-1].endswith(f"--model_dir={tmp_path}/cifar/global-d0/seed0")
    assert "--diffusivity=zero" in lines[-1]
    assert not (tmp_path / "cifar.md").exists()  # A dry run writes nothing.

    lines = main("--table=mnist", "--dry_run", f"--results_dir={tmp_path}")[1].splitlines()
    assert len(lines) == 24
    assert lines[-1] == (
        "python -m experiments.mnist --backbone=pde --channels=8 --diffusivity=perona_malik "
        "--dataset=mnist --epochs=30 --batch_size=128 --learning_rate=0.01 "
        "--weight_decay=0.0005 --schedule=cosine --seed=2 "
        f"--model_dir={tmp_path}/mnist/pde-pm-c8/seed2")


@pytest.mark.parametrize("table, row", [("mnist", "pde-pm-c1"), ("cifar", "global-residual-vd"),
                                        ("cifar-budget", "global-k1")])
def test_command_builds_the_same_config(tmp_path, table, row):
    """The printed runner command parses to the Config the sweep trains."""
    # 2 epochs: the budget table's 1-epoch warm-up needs more than one.
    run = sweep.plan(table, tmp_path, rows=[row], seeds=2, **{**TINY, "epochs": 2})[1]
    runner = run.command[2].split(".")[1]
    script = textwrap.dedent(f"""
        import json, sys
        from absl import flags
        from experiments import {runner}, runner_flags
        flags.FLAGS({[runner, *run.command[3:]]!r})
        print(json.dumps(runner_flags.config_from_flags({runner!r}).to_json()))
    """)
    process = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-2000:]
    assert json.loads(process.stdout) == run.config.to_json()


# ----------------------------------------------------------------- a real sweep


def test_tiny_sweep_skips_finished_runs_and_writes_table(tmp_path):
    runs = sweep.plan("mnist", tmp_path, rows=["conv-c1", "pde-c1"], seeds=2, **TINY)
    assert len(runs) == 4
    logs = []
    assert sweep.sweep(runs, log=logs.append) == (runs, [])
    mtimes = [(run.workdir / "results.json").stat().st_mtime_ns for run in runs]
    for run in runs:
        matrix = json.loads((run.workdir / sweep.CONFUSION_FILE).read_text())["matrix"]
        assert sum(map(sum, matrix)) == 32

    # Re-running trains nothing; an unfinished run (no results.json) trains again.
    (runs[3].workdir / "results.json").unlink()
    assert sweep.sweep(runs, log=logs.append) == ([runs[3]], [])
    assert [(run.workdir / "results.json").stat().st_mtime_ns for run in runs[:3]] == mtimes[:3]
    assert sum("finished, skipped" in line for line in logs) == 3

    # The table: every MNIST row; trained rows with mean ± std over 2 seeds.
    all_runs = sweep.plan("mnist", tmp_path, seeds=2, **TINY)
    path = sweep.write_table("mnist", all_runs, tmp_path, "python -m experiments.sweep")
    text = path.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 8
    conv = rows[0].split(" | ")
    accuracy = [100 * json.loads((run.workdir / "results.json").read_text())["test_accuracy"]
                for run in runs[:2]]
    mean, std = (sum(accuracy) / 2, abs(accuracy[0] - accuracy[1]) / 2**0.5)
    assert conv[3:7] == ["522", "14.6K", "17.0K", f"{mean:.2f} ± {std:.2f}"]
    assert conv[7:9] == ["2/2", "1"]
    wall = [json.loads((run.workdir / "results.json").read_text())["wall_time_s"] / 60
            for run in runs[:2]]
    assert conv[9] == f"{sum(wall) / 2:.1f} ± {abs(wall[0] - wall[1]) / 2**0.5:.1f} min"
    assert conv[-2:] == ["92.01", "64.59 |"]
    # Not trained: the factory's params and MACs, "-" for the results.
    untrained = rows[-1].split(" | ")
    assert untrained[3:5] == ["4,612", "512.0K"]
    assert untrained[6:11] == ["-", "0/2", "-", "-", "-"]

    # A resumed run's wall time (only its last part) is left out of the mean.
    resumed = runs[1].workdir / "results.json"
    resumed.write_text(json.dumps({**json.loads(resumed.read_text()), "resumed_from_epoch": 1}))
    conv = sweep.render_table("mnist", all_runs).splitlines()[2].split(" | ")
    assert conv[9] == f"{wall[0]:.1f} min (1 of 2 runs)"
    assert conv[6] == f"{mean:.2f} ± {std:.2f}"

    # Without checkpoint and cached confusions, the confusions are unknown.
    (runs[0].workdir / sweep.CONFUSION_FILE).unlink()
    (runs[0].workdir / "last.keras").unlink()
    assert sweep.confusion(runs[0]) is None
    assert sweep.confusion(runs[1]) is not None

    # A run directory with another configuration's results is an error.
    other = sweep.plan("mnist", tmp_path, rows=["conv-c1"], seeds=1, **{**TINY, "epochs": 2})
    with pytest.raises(ValueError, match="holds a run with epochs=1, this sweep plans epochs=2"):
        sweep.sweep(other)

    # A garbled results.json: one line naming it, and the sweep goes on with the others.
    (runs[0].workdir / "results.json").write_text('{"test_accuracy": 0.9')
    logs = []
    assert sweep.sweep(runs, log=logs.append) == ([], [runs[0]])
    assert logs[0].startswith(
        f"[1/4] left out: cannot read '{runs[0].workdir}/results.json': Expecting ")
    assert sum("finished, skipped" in line for line in logs) == 3 and len(logs) == 4
    conv = sweep.render_table("mnist", all_runs).splitlines()[2].split(" | ")
    assert conv[7] == "1/2"


def test_table_only_cifar_without_runs(tmp_path):
    """End to end in a subprocess: the module's entry point."""
    process = _sweep("--table=cifar", "--table_only", f"--results_dir={tmp_path}",
                     "--rows=global,global-identity-constant")
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.strip() == f"table: {tmp_path}/cifar.md"
    text = (tmp_path / "cifar.md").read_text()
    assert "Written by `python -m experiments.sweep --table=cifar --table_only" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `")]
    assert [row[0] for row in rows] == ["| `global`", "| `global-identity-constant`"]
    assert rows[0][-2:] == ["91.93", "91.27 |"]
    assert rows[1][-2:] == ["-", "90.03 |"]
    assert all(row[6] == "-" and row[7] == "0/1" for row in rows)


# ---------------------------------------------------------------- bad flags


@pytest.mark.parametrize("argv, line", [
    (["--table=imagenet"], "error: flag --table=imagenet: value should be one of "
                           "<mnist|cifar|cifar-budget> "
                           "(see --helpfull)"),
    ([], "error: Invalid value for argument `table`: expected one of 'mnist', 'cifar', "
         "'cifar-budget'. Received: table=None"),
    (["--table=mnist", "--seeds=0"], "error: flag --seeds=0: 0 is not a bound "
                                     "(see --helpfull)"),
    (["--table=mnist", "--rows=conv-c1,bogus", "--dry_run"],
     "error: Invalid value for argument `rows`: expected one of 'conv-c1', 'residual-c1', "
     "'pde-c1', 'pde-pm-c1', 'conv-c8', 'residual-c8', 'pde-c8', 'pde-pm-c8'. "
     "Received: rows='bogus'"),
])
def test_bad_flags_one_line(main, argv, line):
    status, out, _ = main(*argv)
    assert out == ""
    if "bound" in line:  # absl's wording of bounds varies between versions.
        assert status.startswith("error: flag --seeds=0: ")
    else:
        assert status == line


def test_command_quotes_paths(tmp_path):
    run = sweep.plan("mnist", tmp_path / "a b", rows=["conv-c1"], seeds=1)[0]
    assert shlex.split(shlex.join(run.command))[-1] == f"--model_dir={tmp_path}/a b/mnist/" \
                                                       "conv-c1/seed0"
    assert isinstance(run.config, training.Config)
