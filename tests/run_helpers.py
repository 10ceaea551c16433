"""What the training-side tests share: the smallest run, and the exact
`validation.invalid` message as a `pytest.raises` context."""

import re

import pytest

# The smallest model: the MNIST conv net with one channel (522 parameters).
TINY = dict(dataset="mnist", model="mnist_conv", model_options={"channels": 1},
            data_source="synthetic", train_examples=128, test_examples=32,
            batch_size=32, verbose=0)


def invalid_argument(name, expected, received):
    """Expects the ValueError of `pde_keras.validation.invalid(name, expected, ...)`,
    `received` being the repr of the value."""
    return pytest.raises(ValueError, match="^" + re.escape(
        f"Invalid value for argument `{name}`: expected {expected}. Received: "
        f"{name}={received}") + "$")
