"""The absl runners end to end, in subprocesses: tiny runs, bad flags, missing
data, kill and resume, and scale-out on two logical CPU devices."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
JPEG_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
if not JPEG_TARBALL.exists():
    JPEG_TARBALL = pathlib.Path("/work/shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz")


def extract_jpeg_subset(root, train_per_class, test_per_class):
    """The first images of each class of JPEG_TARBALL, as a train/ + test/ tree in `root`."""
    wanted = {"train": {f"{i:04d}.jpg" for i in range(train_per_class)},
              "test": {f"{i:04d}.jpg" for i in range(test_per_class)}}
    with tarfile.open(JPEG_TARBALL, "r:gz") as tar:
        members = [m for m in tar if m.isfile()
                   and m.name.rsplit("/", 1)[-1] in wanted.get(m.name.split("/")[-3], ())]
        tar.extractall(root, members=members, filter="data")
    return root
# The MNIST conv net with one channel on synthetic data: the cheapest run.
TINY_MNIST = ["--backbone=conv", "--channels=1", "--data_source=synthetic",
              "--train_examples=128", "--test_examples=32", "--epochs=1"]
SUMMARY = re.compile(
    r"^(\w+) on (\w+): test accuracy (\d\.\d{4}) \(best \d\.\d{4}\), test loss \S+, "
    r"[\d,]+ parameters, \S+M MACs, (\d+) epochs, \d+ s; results: (\S+)$")


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
           "KERAS_BACKEND": "tensorflow", **extra}
    return env


def _run(args, timeout=300, **env):
    """Runs `python args...` in the repository root; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(**env), capture_output=True,
        text=True, timeout=timeout)


def _runner(name, *flags, **kwargs):
    return _run(["-m", f"experiments.{name}", *flags], **kwargs)


def _driver(code, name, *flags, **kwargs):
    """Runs runner `name` after `code` (a Python prelude) in one process."""
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["{name}", *{list(flags)!r}]
        runpy.run_module("experiments.{name}", run_name="__main__", alter_sys=True)
    """)
    return _run(["-c", script], **kwargs)


def _succeeded(process, workdir):
    """Checks exit 0 and the summary line; returns results.json."""
    assert process.returncode == 0, process.stderr[-3000:]
    match = SUMMARY.match(process.stdout.strip().splitlines()[-1])
    assert match, process.stdout[-2000:]
    assert match.group(5) == f"{workdir}/results.json"
    results = json.loads((workdir / "results.json").read_text())
    assert match.group(3) == f"{results['test_accuracy']:.4f}"
    return results


def _failed_with(process, line):
    """Checks a one-line error: exit 1, `line` last on stderr, no traceback."""
    assert process.returncode == 1, (process.returncode, process.stderr[-3000:])
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1] == line
    assert process.stdout == ""


# ------------------------------------------------------------ end to end


def test_mnist_runner_synthetic(tmp_path):
    process = _runner("mnist", *TINY_MNIST, f"--model_dir={tmp_path}")
    results = _succeeded(process, tmp_path)
    assert results["model"] == "mnist_conv" and results["trainable_params"] == 522
    assert results["config"]["model_options"] == {"channels": 1}
    assert results["config"]["batch_size"] == 32  # the report's default
    assert results["config"]["schedule"] == "cosine"
    assert results["augmentation"] == "none"  # MNIST: no flips
    # Non-terminal output: one line per epoch, no progress bar.
    assert re.search(r"^4/4 - .* - val_accuracy: ", process.stdout, re.M)
    assert "━" not in process.stdout


def test_cifar_runner_tfds_mock_data(tmp_path):
    process = _driver(
        """
        import tensorflow_datasets as tfds
        MOCK = tfds.testing.mock_data(num_examples=64)  # Kept until the exit.
        MOCK.__enter__()
        """,
        "cifar", "--model=resnet32_global", "--steps=1", "--velocity=identity",
        "--diffusivity=constant", "--data_source=tfds", "--nodownload", "--epochs=1",
        f"--model_dir={tmp_path}", timeout=600)
    results = _succeeded(process, tmp_path)
    assert results["model"] == "resnet32_global" and results["dataset"] == "cifar10"
    assert results["config"]["model_options"] == {
        "diffusivity": "constant", "velocity": "identity", "steps": 1}
    assert results["train_examples"] == 64 and results["augmentation"] == "crop_flip"


def test_mnist_runner_real_subset_learns(tmp_path):
    """2000 bundled MNIST digits, one epoch of the PDE net: far above chance (0.1)."""
    results = _succeeded(_runner(
        "mnist", "--backbone=pde", "--train_examples=2000", "--test_examples=1000",
        "--epochs=1", f"--model_dir={tmp_path}"), tmp_path)
    assert results["data"]["source"] == "bundled"
    assert results["model"] == "mnist_pde" and results["trainable_params"] == 4612
    assert results["test_accuracy"] > 0.6, results["test_accuracy"]


@pytest.mark.slow
@pytest.mark.skipif(not JPEG_TARBALL.exists(), reason="no CIFAR-10 JPEG copy here")
def test_cifar_runner_real_jpeg_subset(tmp_path):
    """The acceptance command on 30 real images per class (a tree, no --data_source)."""
    data_dir = tmp_path / "data"
    wanted = {f"{i:04d}.jpg" for i in range(30)}
    with tarfile.open(JPEG_TARBALL, "r:gz") as tar:
        members = [m for m in tar if m.isfile() and m.name.rsplit("/", 1)[-1] in wanted]
        tar.extractall(data_dir, members=members, filter="data")
    process = _runner(
        "cifar", "--diffusivity=perona_malik", f"--data_dir={data_dir}", "--epochs=1",
        "--train_examples=200", f"--model_dir={tmp_path / 'run'}", timeout=600)
    results = _succeeded(process, tmp_path / "run")
    assert results["data"] == {"source": "local", "location": str(data_dir)}
    assert results["test_examples"] == 300
    assert results["config"]["model_options"] == {"diffusivity": "perona_malik"}


# ------------------------------------------------------------------ errors


FLAG_ERRORS = {
    "cifar": [
        (["--diffusivity=bogus"],
         "error: flag --diffusivity=bogus: value should be one of "
         "<depthwise|constant|perona_malik|residual|zero> (see --helpfull)"),
        (["--model=resnet18"],
         "error: flag --model=resnet18: value should be one of <resnet32|resnet32_4stage|"
         "resnet32_global|resnet56|resnet56_global> (see --helpfull)"),
        (["--model_dir="],
         "error: flag --model_dir=: --model_dir must not be empty (see --helpfull)"),
        ([],  # --model_dir is required.
         "error: flag --model_dir=None: Flag --model_dir must have a value other than "
         "None. (see --helpfull)"),
        (["--schedule=step", "--warmup_epochs=5", "--model_dir=x"],
         "error: Invalid value for argument `warmup_epochs`: expected 0 with "
         "schedule='step' (warm-up is part of the cosine schedule). Received: "
         "warmup_epochs=5"),
        (["--step_milestones=half", "--model_dir=x"],
         "error: Invalid value for argument `step_milestones`: expected comma-separated "
         "numbers. Received: step_milestones='half'"),
        (["--coefficient_epsilon=planes", "--model_dir=x"],
         "error: flag --coefficient_epsilon=planes: --coefficient_epsilon must be 'channels' "
         "or a positive number (see --helpfull)"),
        (["--coefficient_epsilon=0", "--model_dir=x"],
         "error: flag --coefficient_epsilon=0: --coefficient_epsilon must be 'channels' "
         "or a positive number (see --helpfull)"),
    ],
    "mnist": [
        (["--backbone=mlp"],
         "error: flag --backbone=mlp: value should be one of <conv|residual|pde> "
         "(see --helpfull)"),
        (["--epochs=0"], "error: flag --epochs=0: 0 is not a positive integer "
         "(see --helpfull)"),
        (["--learning_rate=fast"], "error: flag --learning_rate=fast: could not convert "
         "string to float: 'fast' (see --helpfull)"),
        (["--model_dir=x", "extra"], "error: unexpected arguments: extra"),
    ],
}


@pytest.mark.parametrize("runner", sorted(FLAG_ERRORS))
def test_flag_errors_are_one_line(runner):
    """Every case of FLAG_ERRORS[runner] through parse_flags + config_from_flags, in
    one process (the exit itself is checked in test_bad_flag_exits_with_one_line)."""
    cases = [flags for flags, _ in FLAG_ERRORS[runner]]
    process = _run(["-c", textwrap.dedent(f"""
        import json
        from experiments import runner_flags as flags
        from pde_keras import command_line
        flags.define_flags({runner!r})
        for argv in {cases!r}:
            flags.FLAGS.unparse_flags()  # Back to the defaults.
            try:
                command_line.parse_flags(["{runner}", *argv])
                flags.config_from_flags({runner!r})
            except SystemExit as exit:
                print(json.dumps(str(exit.code)))
            except ValueError as error:  # train_from_flags exits with this line.
                print(json.dumps(f"error: {{error}}"))
            except Exception as error:
                print(json.dumps(f"{{type(error).__name__}}: {{error}}"))
            else:
                print(json.dumps("no error"))
    """)], timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    messages = [json.loads(line) for line in process.stdout.strip().splitlines()]
    assert messages == [line for _, line in FLAG_ERRORS[runner]]


def test_coefficient_epsilon_flag_reaches_the_model_options():
    process = _run(["-c", textwrap.dedent("""
        from experiments import runner_flags as flags
        from pde_keras import command_line
        flags.define_flags("cifar")
        for value in ("channels", "1e-5", "16"):
            flags.FLAGS.unparse_flags()
            command_line.parse_flags(["cifar", f"--coefficient_epsilon={value}", "--model_dir=x"])
            print(flags.config_from_flags("cifar").model_options)
    """)], timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.splitlines() == [
        "{'coefficient_epsilon': 'channels'}", "{'coefficient_epsilon': 1e-05}",
        "{'coefficient_epsilon': 16.0}"]


def test_bad_flag_exits_with_one_line(tmp_path):
    """The acceptance case: `--diffusivity=bogus` exits 1 with one line."""
    _failed_with(
        _runner("cifar", "--diffusivity=bogus", f"--model_dir={tmp_path}", timeout=120),
        FLAG_ERRORS["cifar"][0][1])


def test_bad_model_option_exits_with_one_line(tmp_path):
    """A value only the model checks (in train_and_evaluate) also gives one line."""
    _failed_with(
        _runner("mnist", *TINY_MNIST, "--backbone=pde", "--dt=-1",
                f"--model_dir={tmp_path}", timeout=120),
        "error: Invalid value for argument `dt`: expected a positive finite number. "
        "Received: dt=-1.0")


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    _failed_with(
        _runner("mnist", f"--data_dir={missing}", f"--model_dir={tmp_path / 'run'}",
                timeout=120),
        f"error: Data directory '{missing}' does not exist: expected a directory "
        "holding the MNIST IDX files train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
        "t10k-labels-idx1-ubyte[.gz], or a class-per-folder image tree "
        "train/<class>/*.jpg and test/<class>/*.jpg (.bmp, .gif, .jpeg, .jpg, .png).")


def test_headline_command_without_network_stops_at_once(tmp_path):
    """`python -m experiments.cifar --diffusivity=perona_malik` with CIFAR-10 in no tfds
    directory and a download target that cannot resolve (every proxy is a
    `.invalid` host): one line naming what was tried and the ways on, exit 1,
    within seconds, and no run directory."""
    proxy = "http://proxy.invalid:3128"
    start = time.monotonic()
    process = _runner(
        "cifar", "--diffusivity=perona_malik", f"--model_dir={tmp_path / 'run'}", timeout=120,
        TFDS_DATA_DIR=str(tmp_path / "tfds"), http_proxy=proxy, https_proxy=proxy,
        HTTP_PROXY=proxy, HTTPS_PROXY=proxy, no_proxy="", NO_PROXY="")
    elapsed = time.monotonic() - start
    assert process.returncode == 1, process.stderr[-3000:]
    assert "Traceback" not in process.stderr and process.stdout == ""
    line = process.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"error: Cannot download CIFAR-10: tensorflow-datasets has no prepared copy in "
        f"'{tmp_path / 'tfds'}' and https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz "
        "is unreachable ("), line
    assert line.endswith("read it with download=False (--nodownload)."), line
    assert [l for l in process.stderr.splitlines() if l.startswith("error")] == [line]
    assert elapsed < 60, elapsed
    assert not (tmp_path / "run").exists() and not (tmp_path / "tfds").exists()


# -------------------------------------------------------- kill and resume


def test_sigkill_then_rerun_resumes_and_finishes(tmp_path):
    flags = ["--backbone=conv", "--channels=1", "--data_source=synthetic",
             "--train_examples=4096", "--test_examples=64", "--epochs=4",
             f"--model_dir={tmp_path}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.mnist", *flags], cwd=ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while (not list((tmp_path / "backup").glob("epoch*-step*")) and process.poll() is None
           and time.time() < deadline):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not (tmp_path / "results.json").exists()

    results = _succeeded(_runner("mnist", *flags), tmp_path)
    assert 1 <= results["resumed_from_epoch"] < 4
    assert results["epochs"] == 4
    epochs = [line.split(",")[0] for line in
              (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert sorted(set(epochs)) == ["0", "1", "2", "3"]
    assert not (tmp_path / "backup").exists()


# ---------------------------------------------------------------- scale-out


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    process = _driver(
        """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        """,
        "mnist", *TINY_MNIST, "--train_examples=130", "--test_examples=33",
        "--distribution=mirrored", f"--model_dir={tmp_path}")
    results = _succeeded(process, tmp_path)
    assert results["replicas"] == 2 and results["backend"] == "tensorflow"
    assert results["test_examples"] == 33


def test_data_parallel_on_two_jax_cpu_devices(tmp_path):
    process = _runner(
        "mnist", *TINY_MNIST, "--train_examples=130", "--test_examples=33",
        "--distribution=data_parallel", f"--model_dir={tmp_path}",
        KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    results = _succeeded(process, tmp_path)
    assert results["replicas"] == 2 and results["backend"] == "jax"
    # Padded to even shards, but every test example counted once.
    assert results["test_examples"] == 33
    assert round(results["test_accuracy"] * 33) == pytest.approx(
        results["test_accuracy"] * 33, abs=1e-3)


def test_data_parallel_needs_jax(tmp_path):
    _failed_with(
        _runner("mnist", *TINY_MNIST, "--distribution=data_parallel",
                f"--model_dir={tmp_path}", timeout=120),
        "error: Invalid value for argument `distribution`: expected 'none' or the jax "
        "backend's 'data_parallel' (the backend is tensorflow). Received: "
        "distribution='data_parallel'")
