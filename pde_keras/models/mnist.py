"""The MNIST illustrative nets of Kag & Saligrama (CVPR 2022, Figure 2).

All three share the layout of the authors' `train_mnist_illustrative_example.py`:

    input 28x28x1 -> BN -> ReLU -> conv3x3 (1 -> channels) = f
    -> feature layer -> ReLU -> 4x4 average pool -> flatten -> Dense

and differ only in the feature layer:

- `mnist_conv`: h = conv3x3(ReLU(BN(f))).
- `mnist_residual`: h = BN(f + conv3x3(ReLU(BN(f)))).
- `mnist_pde`: g = conv3x3(ReLU(BN(f))), h = BN(H^K) where H^K are K = 5
  solver steps with u = v = g, D_x = D_y = 1 (or Perona-Malik), dt = 0.2,
  H^{-1} = H^0 = f (`pde_keras.AdvectionDiffusion`).

Trainable parameters (10 classes): channels=1: conv 522, residual 524,
pde 524; channels=8: conv 4596, residual 4612, pde 4612. The paper quotes
524 for all three: the authors' conv net creates an output batch
normalisation (2 parameters per channel) that its forward pass never uses,
so their parameter counter includes it; `mnist_conv` leaves it out.
"""

import keras
from keras import layers

from pde_keras import validation
from pde_keras.advection_diffusion import AdvectionDiffusion
from pde_keras.layer_options import LAYER_OPTIONS, LayerOptions
from pde_keras.models import blocks
from pde_keras.models.registry import options_of, register, split_options

MNIST_SHAPE = (28, 28, 1)
# Every option of the PDE feature layer (diffusivity, steps, dt, ...).
PDE_OPTIONS = options_of(AdvectionDiffusion)


def _mnist_net(feature_layer, channels, num_classes, input_shape, name, layer_options):
    """Input stem, then `feature_layer(f, options)`, then the classifier head."""
    channels = validation.check_positive_int("channels", channels)
    options = LayerOptions(**layer_options)
    inputs = keras.Input(input_shape, name="image")
    f = blocks.bn_relu_conv(inputs, channels, options, "input")
    h = layers.ReLU(name="output_relu")(feature_layer(f, options))
    h = layers.AveragePooling2D(4, name="pool")(h)
    h = layers.Flatten(name="flatten")(h)
    return keras.Model(inputs, blocks.logits(h, num_classes), name=name)


@register("mnist_conv", extra_options=LAYER_OPTIONS)
def mnist_conv(channels=1, num_classes=10, input_shape=MNIST_SHAPE, name="mnist_conv",
               **layer_options):
    """The illustrative net with a convolutional feature layer.

    h = conv3x3(ReLU(BN(f))), then ReLU -> pool -> Dense. 522 trainable
    parameters at `channels=1` (4596 at 8): the authors' output batch
    normalisation, created but never used, is left out.

    Args:
        channels: channels of f and h (the paper: 1; the report also 8).
        num_classes: number of logits. Defaults to 10.
        input_shape: image shape. Defaults to `(28, 28, 1)`.
        name: model name.
        **layer_options: `kernel_initializer`, `kernel_regularizer`,
            `batchnorm_momentum`, `batchnorm_epsilon` of every layer (see
            `pde_keras.layer_options.LayerOptions`).

    Returns:
        A functional `keras.Model` from images to logits.
    """

    def feature_layer(f, options):
        return blocks.bn_relu_conv(f, channels, options, "feature")

    return _mnist_net(feature_layer, channels, num_classes, input_shape, name, layer_options)


@register("mnist_residual", extra_options=LAYER_OPTIONS)
def mnist_residual(channels=1, num_classes=10, input_shape=MNIST_SHAPE, name="mnist_residual",
                   **layer_options):
    """The illustrative net with a residual feature layer.

    h = BN(f + conv3x3(ReLU(BN(f)))), then ReLU -> pool -> Dense. 524
    trainable parameters at `channels=1` (4612 at 8).

    Args: as `mnist_conv`.

    Returns:
        A functional `keras.Model` from images to logits.
    """

    def feature_layer(f, options):
        g = blocks.bn_relu_conv(f, channels, options, "feature")
        h = layers.Add(name="feature_add")([f, g])
        return options.norm("output_bn")(h)

    return _mnist_net(feature_layer, channels, num_classes, input_shape, name, layer_options)


@register("mnist_pde", extra_options=LAYER_OPTIONS + PDE_OPTIONS)
def mnist_pde(channels=1, num_classes=10, input_shape=MNIST_SHAPE, name="mnist_pde",
              **options):
    """The illustrative net with the PDE feature layer.

    g = conv3x3(ReLU(BN(f))) (a full convolution), then K steps of the
    advection-diffusion solver with source f, H^{-1} = H^0 = f, u = v = g
    and D_x = D_y = 1 (or the Perona-Malik diffusivity of f), then
    BN -> ReLU -> pool -> Dense. 524 trainable parameters at `channels=1`
    (4612 at 8), whatever the diffusivity.

    Args:
        channels, num_classes, input_shape, name: as `mnist_conv`.
        **options: every `pde_keras.AdvectionDiffusion` option
            (`diffusivity="constant"` or `"perona_malik"`,
            `diffusivity_constant=1.0`, `perona_malik_lambda=2.0`,
            `steps=5`, `dt=0.2`, `dx`, `dy`, `boundary`) and the layer
            options of `mnist_conv`.

    Returns:
        A functional `keras.Model` from images to logits.

    Example:

    >>> import pde_keras
    >>> model = pde_keras.models.create("mnist_pde", channels=8, diffusivity="perona_malik")
    >>> model.output.shape
    (None, 10)
    """
    pde_options, layer_options = split_options(options, PDE_OPTIONS)

    def feature_layer(f, layer_settings):
        g = blocks.bn_relu_conv(f, channels, layer_settings, "velocity")
        h = AdvectionDiffusion(name="pde", **pde_options)([f, g])
        return layer_settings.norm("output_bn")(h)

    return _mnist_net(feature_layer, channels, num_classes, input_shape, name, layer_options)
