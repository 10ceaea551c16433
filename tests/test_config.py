"""`pde_keras.config.Config`: every field checked, one message each (backend-agnostic)."""

import re

import keras
import pytest

from pde_keras import config
from pde_keras.config import Config

from run_helpers import invalid_argument

pytestmark = pytest.mark.multibackend



# ------------------------------------------------------------------ config


@pytest.mark.parametrize("options,name,expected,received", [
    (dict(dataset="svhn"), "dataset", "one of 'mnist', 'cifar10', 'cifar100'", "'svhn'"),
    (dict(epochs=0), "epochs", "an integer >= 1", "0"),
    (dict(batch_size=2.5), "batch_size", "an integer >= 1", "2.5"),
    (dict(train_examples=-1), "train_examples", "an integer >= 0", "-1"),
    (dict(learning_rate=float("nan")), "learning_rate", "a positive finite number", "nan"),
    (dict(momentum=1.0), "momentum", "a finite number >= 0 below 1", "1.0"),
    (dict(weight_decay=-1e-4), "weight_decay", "a finite number >= 0", "-0.0001"),
    (dict(schedule="linear"), "schedule", "one of 'cosine', 'step', 'constant'",
     "'linear'"),
    (dict(augmentation="flip"), "augmentation",
     "one of 'auto', 'none', 'crop', 'crop_flip'", "'flip'"),
    (dict(distribution="tpu"), "distribution",
     "one of 'none', 'mirrored', 'data_parallel'", "'tpu'"),
    (dict(distribution="data_parallel"), "distribution",
     "'none' or the jax backend's 'data_parallel' (the backend is tensorflow)",
     "'data_parallel'"),
    (dict(distribution="mirrored"), "distribution",
     "'none' or the tensorflow backend's 'mirrored' (the backend is jax)", "'mirrored'"),
    (dict(step_milestones=(0.75, 0.5)), "step_milestones",
     "increasing fractions of the epochs in (0, 1)", "(0.75, 0.5)"),
    (dict(schedule="step", warmup_epochs=1, epochs=5), "warmup_epochs",
     "0 with schedule='step' (warm-up is part of the cosine schedule)", "1"),
    (dict(warmup_epochs=2, epochs=2), "warmup_epochs", "fewer than epochs=2", "2"),
    (dict(jit_compile="yes"), "jit_compile", "'auto', True or False", "'yes'"),
    (dict(data_source="local"), "data_dir", "a directory for source='local'", "None"),
    (dict(model_options=["channels"]), "model_options", "a dict of keyword options",
     "['channels']"),
])
def test_config_rejects(options, name, expected, received):
    backend = keras.backend.backend()
    if "(the backend is" in expected and f"(the backend is {backend})" not in expected:
        pytest.skip(f"valid on {backend}")
    with invalid_argument(name, expected, received):
        Config(**options)


def test_config_rejects_unknown_model():
    with pytest.raises(ValueError, match=re.escape(
            "Invalid value for argument `model`: expected one of 'mnist_conv'")):
        Config(model="vgg16")


def test_defaults_are_the_fields_defaults():
    defaults = config.defaults()
    assert list(defaults) == [field for field in Config.__dataclass_fields__]
    assert defaults["learning_rate"] == Config().learning_rate == 0.01
    assert defaults["model_options"] == {} and defaults["step_milestones"] == (0.5, 0.75)
