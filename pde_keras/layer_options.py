"""The construction settings shared by every convolution and batch normalisation.

One `LayerOptions` holds the kernel initializer, the kernel regularizer and
the batch-norm momentum and epsilon, checks them once, and makes the
sub-layers that use them. The model families (`pde_keras.models.blocks`),
`GlobalLayer` and `BasicResidualBlock` all take these four settings, under
the names of `LAYER_OPTIONS`, and build their layers through it.

This module imports no other layer or model module, so that every one of
them can import it.
"""

import weakref

import keras
from keras import layers

from pde_keras import validation

# The four settings, in the order of the constructors' arguments.
LAYER_OPTIONS = ("kernel_initializer", "kernel_regularizer", "batchnorm_momentum",
                 "batchnorm_epsilon")
# Their defaults: `he_normal`, and PyTorch's batch-norm defaults in Keras'
# convention (PyTorch's momentum 0.1 is Keras' 0.9).
KERNEL_INITIALIZER = "he_normal"
KERNEL_REGULARIZER = None
BATCHNORM_MOMENTUM = 0.9
BATCHNORM_EPSILON = 1e-5
# Initializer objects already given to a kernel (see `LayerOptions._initializer`).
_GIVEN_OUT = weakref.WeakSet()


class LayerOptions:
    """Initializer, regularizer and batch-norm settings of a model or a layer.

    Args:
        kernel_initializer: initializer of every convolution kernel.
            Defaults to `"he_normal"`.
        kernel_regularizer: optional regularizer of every convolution
            kernel (training usually relies on the optimizer's weight decay
            instead). Defaults to `None`.
        batchnorm_momentum: momentum of every batch normalisation, in
            [0, 1). Defaults to 0.9 (PyTorch's 0.1).
        batchnorm_epsilon: epsilon of every batch normalisation (> 0).
            Defaults to 1e-5 (PyTorch's default).

    Raises:
        ValueError: for a momentum or epsilon out of range.

    The initializer and regularizer are kept as given. A layer that
    serialises them in its config takes `LayerOptions.resolved(...)`
    instead (Keras objects). Either way every convolution made by `conv` or
    `depthwise_conv` gets its own initializer object: Keras' unseeded
    initializer draws its seed once per object, so sharing one would give
    every kernel of a shape the same initial values, where PyTorch (the
    authors' code) draws each independently. The first kernel an object
    initialises takes the object itself, later ones a new object of its
    configuration, so that a layer with one convolution draws what it always
    drew. An initializer seeded by the user keeps its seed in every copy (the
    same values, Keras' rule).

    Example:

    >>> from pde_keras.layer_options import LayerOptions
    >>> options = LayerOptions(batchnorm_momentum=0.99)
    >>> options.norm("stem_bn").momentum
    0.99
    >>> options.conv(16, 3, "stem_conv").use_bias
    False
    """

    def __init__(self, kernel_initializer=KERNEL_INITIALIZER,
                 kernel_regularizer=KERNEL_REGULARIZER,
                 batchnorm_momentum=BATCHNORM_MOMENTUM, batchnorm_epsilon=BATCHNORM_EPSILON):
        self.kernel_initializer = kernel_initializer
        self.kernel_regularizer = kernel_regularizer
        self.batchnorm_momentum = validation.check_float(
            "batchnorm_momentum", batchnorm_momentum, non_negative=True, below_one=True)
        self.batchnorm_epsilon = validation.check_float(
            "batchnorm_epsilon", batchnorm_epsilon, positive=True)

    @classmethod
    def resolved(cls, kernel_initializer, kernel_regularizer, batchnorm_momentum,
                 batchnorm_epsilon):
        """The settings with the initializer and regularizer as Keras objects.

        For layers: `get_config` serialises the objects.
        """
        return cls(keras.initializers.get(kernel_initializer),
                   keras.regularizers.get(kernel_regularizer),
                   batchnorm_momentum, batchnorm_epsilon)

    def as_dict(self):
        """The four settings as keyword arguments (e.g. for `GlobalLayer`)."""
        return {name: getattr(self, name) for name in LAYER_OPTIONS}

    def get_config(self):
        """The four settings for a layer's `get_config`, the initializer and
        regularizer serialised."""
        return {
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "batchnorm_momentum": self.batchnorm_momentum,
            "batchnorm_epsilon": self.batchnorm_epsilon,
        }

    def conv(self, filters, kernel_size, name, strides=1, padding="same", dtype=None):
        """A bias-free `Conv2D` named `name` (`dtype`: a layer's dtype policy)."""
        return layers.Conv2D(
            filters, kernel_size, strides=strides, padding=padding, use_bias=False,
            kernel_initializer=self._initializer(),
            kernel_regularizer=self.kernel_regularizer, dtype=dtype, name=name)

    def depthwise_conv(self, kernel_size, depth_multiplier, name, dtype=None):
        """A bias-free, 'same'-padded `DepthwiseConv2D` named `name`."""
        return layers.DepthwiseConv2D(
            kernel_size, padding="same", use_bias=False, depth_multiplier=depth_multiplier,
            depthwise_initializer=self._initializer(),
            depthwise_regularizer=self.kernel_regularizer, dtype=dtype, name=name)

    def _initializer(self):
        """The initializer of one new kernel: the configured object for its
        first kernel, a new object of the same configuration for every later
        one (so a layer with one convolution draws what it always drew)."""
        initializer = self.kernel_initializer
        if not isinstance(initializer, keras.initializers.Initializer):
            return initializer  # A name: each layer resolves its own object.
        if initializer in _GIVEN_OUT:
            return keras.initializers.deserialize(keras.initializers.serialize(initializer))
        _GIVEN_OUT.add(initializer)
        return initializer

    def norm(self, name, epsilon=None, dtype=None):
        """A `BatchNormalization` named `name`; `epsilon` overrides
        `batchnorm_epsilon` (e.g. the GlobalLayer's coefficient BNs)."""
        return layers.BatchNormalization(
            momentum=self.batchnorm_momentum,
            epsilon=self.batchnorm_epsilon if epsilon is None else epsilon,
            dtype=dtype, name=name)


def _setting(name):
    """A read-only property: the layer's `layer_options.<name>`."""
    return property(lambda layer: getattr(layer.layer_options, name),
                    doc=f"The layer's `{name}` (kept in `layer_options`).")


class HasLayerOptions:
    """For a layer whose `layer_options` (a `LayerOptions`) hold its settings:
    reads the four of them under their argument names, e.g.
    `layer.batchnorm_momentum`, as Keras layers keep their arguments."""

    kernel_initializer = _setting("kernel_initializer")
    kernel_regularizer = _setting("kernel_regularizer")
    batchnorm_momentum = _setting("batchnorm_momentum")
    batchnorm_epsilon = _setting("batchnorm_epsilon")
