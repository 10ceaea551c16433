"""The basic residual block used inside the Global layer's branches."""

import keras
from keras import ops

from pde_keras.layer_options import (BATCHNORM_EPSILON, BATCHNORM_MOMENTUM, KERNEL_INITIALIZER,
                                     KERNEL_REGULARIZER, HasLayerOptions, LayerOptions)


@keras.saving.register_keras_serializable(package="pde_keras")
class BasicResidualBlock(HasLayerOptions, keras.layers.Layer):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the input, -> ReLU.

    The block keeps the input's shape (stride 1, as many filters as input
    channels); its convolutions have no bias.

    Args:
        kernel_initializer: initializer of both convolutions. Defaults to
            `"he_normal"`.
        kernel_regularizer: optional regularizer of both convolutions.
        batchnorm_momentum: momentum of both batch normalisations, in
            [0, 1). Defaults to 0.9.
        batchnorm_epsilon: epsilon of both batch normalisations (> 0).
            Defaults to 1e-5.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    The four settings are checked and kept as one
    `pde_keras.layer_options.LayerOptions`, `layer_options`.

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        Same as the input.
    """

    def __init__(self, kernel_initializer=KERNEL_INITIALIZER,
                 kernel_regularizer=KERNEL_REGULARIZER, batchnorm_momentum=BATCHNORM_MOMENTUM,
                 batchnorm_epsilon=BATCHNORM_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.layer_options = LayerOptions.resolved(
            kernel_initializer, kernel_regularizer, batchnorm_momentum, batchnorm_epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        options, dtype = self.layer_options, self.dtype_policy
        self.conv1 = options.conv(channels, 3, "conv1", dtype=dtype)
        self.bn1 = options.norm("bn1", dtype=dtype)
        self.conv2 = options.conv(channels, 3, "conv2", dtype=dtype)
        self.bn2 = options.norm("bn2", dtype=dtype)
        for layer in (self.conv1, self.bn1, self.conv2, self.bn2):
            layer.build(input_shape)

    def call(self, inputs, training=None):
        h = ops.relu(self.bn1(self.conv1(inputs), training=training))
        h = self.bn2(self.conv2(h), training=training)
        return ops.relu(h + inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(self.layer_options.get_config())
        return config
