"""Named building blocks shared by the model families.

Every model assembles its functional graph from these helpers, so all
convolutions (no bias, `he_normal` by default) and batch normalisations
(momentum 0.9, epsilon 1e-5: PyTorch's defaults in Keras' convention) of a
model share one `LayerOptions` (`pde_keras.layer_options`, re-exported
here), and each layer gets a readable name `f"{name}_conv"`, `f"{name}_bn"`,
... for `model.summary()`.
"""

from keras import layers

from pde_keras import validation
from pde_keras.layer_options import LAYER_OPTIONS, LayerOptions

__all__ = ["LAYER_OPTIONS", "LayerOptions", "basic_block", "bn_relu_conv", "conv_bn", "logits"]


def conv_bn(x, filters, options, name, kernel_size=3, strides=1, suffix=""):
    """`{name}_conv{suffix}` (bias-free) -> `{name}_bn{suffix}`.

    A strided convolution pads symmetrically (`{name}_pad{suffix}`, then
    'valid'), as PyTorch's `padding=k // 2` does: Keras' 'same' would pad
    only the bottom and right, sampling other pixels than the 1x1 strided
    shortcut beside it.
    """
    padding = "same"
    if strides != 1 and kernel_size > 1:
        x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad{suffix}")(x)
        padding = "valid"
    x = options.conv(filters, kernel_size, f"{name}_conv{suffix}", strides=strides,
                     padding=padding)(x)
    return options.norm(f"{name}_bn{suffix}")(x)


def bn_relu_conv(x, filters, options, name):
    """Pre-activation 3x3 conv: `{name}_bn` -> `{name}_relu` -> `{name}_conv`."""
    x = options.norm(f"{name}_bn")(x)
    x = layers.ReLU(name=f"{name}_relu")(x)
    return options.conv(filters, 3, f"{name}_conv")(x)


def basic_block(x, filters, options, name, strides=1):
    """The ResNet basic block (He et al., 2016), post-activation.

    `{name}_conv1` (3x3, `strides`) -> `_bn1` -> `_relu1` -> `_conv2` (3x3)
    -> `_bn2`, plus the shortcut (`_add`), -> `_relu`. The shortcut is the
    identity when the shape is kept, else a strided 1x1 conv -> BN
    projection (`{name}_shortcut_conv`, `{name}_shortcut_bn`).
    """
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_bn(x, filters, options, f"{name}_shortcut", kernel_size=1,
                           strides=strides)
    x = conv_bn(x, filters, options, name, strides=strides, suffix="1")
    x = layers.ReLU(name=f"{name}_relu1")(x)
    x = conv_bn(x, filters, options, name, suffix="2")
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.ReLU(name=f"{name}_relu")(x)


def logits(x, num_classes, name="logits"):
    """The classifier: `Dense(num_classes)` in float32 (also under mixed precision)."""
    num_classes = validation.check_positive_int("num_classes", num_classes)
    return layers.Dense(num_classes, dtype="float32", name=name)(x)
