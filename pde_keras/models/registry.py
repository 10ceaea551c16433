"""Model factories by name, with their options checked."""

import functools
import inspect

from pde_keras import validation

_FACTORIES = {}


def register(name, extra_options=()):
    """Registers `factory` under `name` for `create`.

    The wrapped factory accepts its own named parameters plus
    `extra_options` (collected by its `**options`), and rejects any other
    keyword with an error that lists the valid ones. The valid names are
    available as `factory.options`.
    """

    def decorator(factory):
        valid = tuple(dict.fromkeys(options_of(factory) + tuple(extra_options)))

        @functools.wraps(factory)
        def checked(*args, **options):
            unknown = {key: value for key, value in options.items() if key not in valid}
            if unknown:
                allowed = ", ".join(repr(option) for option in valid)
                raise validation.invalid(
                    "options", f"keyword arguments of model {name!r} among {allowed}", unknown)
            return factory(*args, **options)

        checked.options = valid
        _FACTORIES[name] = checked
        return checked

    return decorator


def options_of(callable_):
    """The named keyword parameters of a function, or of a class's `__init__`."""
    parameters = inspect.signature(callable_).parameters.values()
    return tuple(parameter.name for parameter in parameters
                 if parameter.name != "self"
                 and parameter.kind not in (inspect.Parameter.VAR_KEYWORD,
                                            inspect.Parameter.VAR_POSITIONAL))


def split_options(options, keys):
    """Splits the dict `options` into (those whose key is in `keys`, the rest)."""
    chosen = {key: value for key, value in options.items() if key in keys}
    rest = {key: value for key, value in options.items() if key not in keys}
    return chosen, rest


def names():
    """The registered model names, in registration order."""
    return tuple(_FACTORIES)


def options(name):
    """The keyword options that model `name` accepts."""
    return _factory(name).options


def create(name, **options):
    """Builds the model registered as `name`.

    Args:
        name: one of `pde_keras.models.names()`: `"mnist_conv"`,
            `"mnist_residual"`, `"mnist_pde"`, `"resnet32"`,
            `"resnet32_4stage"`, `"resnet32_global"`, `"resnet56"`,
            `"resnet56_global"`.
        **options: the factory's keyword options, e.g. `channels=8` for the
            MNIST nets, `num_classes=100` for the ResNets, and every
            `GlobalLayer` option for the Global models
            (`pde_keras.models.options(name)` lists them).

    Returns:
        A functional `keras.Model` that outputs logits (no softmax).

    Raises:
        ValueError: for an unknown name or option (the message lists the
            valid ones), or an invalid option value.

    Example:

    >>> import pde_keras
    >>> model = pde_keras.models.create("resnet32_global", velocity="identity",
    ...                                 diffusivity="constant")
    >>> model.output.shape
    (None, 10)
    """
    return _factory(name)(**options)


def _factory(name):
    return _FACTORIES[validation.check_choice("name", name, names())]
