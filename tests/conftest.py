"""Test-wide settings: quiet TensorFlow, deterministic seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


# The solver paths a TensorFlow run tests: the compiled kernel and the
# keras.ops reference (JAX has only the reference).
SOLVER_PATHS = (("compiled", "reference") if keras.backend.backend() == "tensorflow"
                else ("reference",))


@pytest.fixture(params=SOLVER_PATHS)
def both_solver_paths(request, monkeypatch):
    """Runs a test once per solver path (`PDE_KERAS_SOLVER`); forcing `compiled`
    makes a kernel that cannot be built an error, not a silent fallback."""
    monkeypatch.setenv("PDE_KERAS_SOLVER", request.param)
    return request.param


@pytest.fixture(scope="module")
def build():
    """`build(name, **options)`: `pde_keras.models.create`, once per module and call."""
    from pde_keras import models

    cache = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = models.create(name, **options)
        return cache[key]

    return get
