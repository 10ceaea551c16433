"""The basic residual block used inside the Global layer's branches."""

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="pde_keras")
class BasicResidualBlock(keras.layers.Layer):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the input, -> ReLU.

    The block keeps the input's shape (stride 1, as many filters as input
    channels); its convolutions have no bias.

    Args:
        kernel_initializer: initializer of both convolutions.
        kernel_regularizer: optional regularizer of both convolutions.
        batchnorm_momentum: momentum of both batch normalisations.
        batchnorm_epsilon: epsilon of both batch normalisations.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        Same as the input.
    """

    def __init__(self, kernel_initializer="he_normal", kernel_regularizer=None,
                 batchnorm_momentum=0.9, batchnorm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.batchnorm_momentum = batchnorm_momentum
        self.batchnorm_epsilon = batchnorm_epsilon

    def build(self, input_shape):
        channels = input_shape[-1]

        def conv(name):
            return layers.Conv2D(
                channels, 3, padding="same", use_bias=False,
                kernel_initializer=self.kernel_initializer,
                kernel_regularizer=self.kernel_regularizer,
                dtype=self.dtype_policy, name=name)

        def norm(name):
            return layers.BatchNormalization(
                momentum=self.batchnorm_momentum, epsilon=self.batchnorm_epsilon,
                dtype=self.dtype_policy, name=name)

        self.conv1, self.bn1 = conv("conv1"), norm("bn1")
        self.conv2, self.bn2 = conv("conv2"), norm("bn2")
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
        config.update({
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "batchnorm_momentum": self.batchnorm_momentum,
            "batchnorm_epsilon": self.batchnorm_epsilon,
        })
        return config
