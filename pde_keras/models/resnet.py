"""CIFAR ResNets (He et al., 2016) and their Global versions (Kag & Saligrama, 2022).

    image 32x32x3 -> conv3x3 (16) -> BN -> ReLU
    -> stages of basic blocks (the first block of a stage has the stage's
       stride; a strided 1x1 conv -> BN shortcut where the shape changes),
       a `GlobalLayer` after some stages
    -> global average pooling -> Dense

| name | stages (filters, stride) | blocks per stage | GlobalLayer after | params | MACs |
|---|---|---|---|---|---|
| `resnet32` | (16, 1) (32, 2) (64, 2) | 5 | - | 466,906 | 69.1M |
| `resnet32_4stage` | (16, 1) (32, 2) (64, 2) (64, 2) | 5 | - | 841,050 | 75.1M |
| `resnet32_global` | (16, 1) (32, 2) (64, 2) (64, 2) | 1 | stages 1, 2, 3 | 161,402 | 14.8M |
| `resnet56` | (16, 1) (32, 2) (64, 2) | 9 | - | 855,770 | 125.7M |
| `resnet56_global` | (16, 1) (32, 2) (64, 2) (64, 2) | 2 | stages 1, 2, 3 | 332,602 | 30.1M |

(Trainable parameters at 10 classes; conv + depth-wise + dense MACs per
image, as `pde_keras.count_macs(model)["paper"]`.)

`resnet32` is the authors' baseline (`resnet_original`), `resnet32_4stage`
the report's baseline; `resnet32_global` is the paper's ResNet32-Global
(the authors' `pdenet` with m = 1), `resnet56_global` their default m = 2.
The Global models take every `GlobalLayer` option, so each row of the
report's Table 2 is one `create("resnet32_global", velocity=...,
diffusivity=..., init=...)` call.
"""

import keras
from keras import layers

from pde_keras import validation
from pde_keras.global_layer import GlobalLayer
from pde_keras.layer_options import LAYER_OPTIONS, LayerOptions
from pde_keras.models import blocks
from pde_keras.models.registry import options_of, register, split_options

CIFAR_SHAPE = (32, 32, 3)
THREE_STAGES = ((16, 1), (32, 2), (64, 2))
FOUR_STAGES = THREE_STAGES + ((64, 2),)
# Every GlobalLayer option (it includes the four `LAYER_OPTIONS`).
GLOBAL_OPTIONS = options_of(GlobalLayer)


def resnet(stages, blocks_per_stage, global_after=(), num_classes=10, input_shape=CIFAR_SHAPE,
           name="resnet", **options):
    """Builds a CIFAR ResNet, with a `GlobalLayer` after the chosen stages.

    Args:
        stages: `(filters, strides)` of each stage, e.g. `THREE_STAGES`.
        blocks_per_stage: basic blocks in every stage (integer >= 1).
        global_after: the 1-based stages followed by a `GlobalLayer`
            (named `stage{i}_global`).
        num_classes: number of logits. Defaults to 10.
        input_shape: image shape. Defaults to `(32, 32, 3)`.
        name: model name.
        **options: `kernel_initializer`, `kernel_regularizer`,
            `batchnorm_momentum`, `batchnorm_epsilon` for every layer,
            GlobalLayers included; with `global_after`, also any other
            `GlobalLayer` option (`velocity`, `diffusivity`, `init`,
            `steps`, `dt`, `boundary`, ...), given to every GlobalLayer.

    Returns:
        A functional `keras.Model` from images to logits.
    """
    blocks_per_stage = validation.check_positive_int("blocks_per_stage", blocks_per_stage)
    layer_options, global_options = split_options(options, LAYER_OPTIONS)
    settings = LayerOptions(**layer_options)
    if global_after:
        # Built once here so that bad options fail before any layer is made.
        GlobalLayer(**settings.as_dict(), **global_options)
    elif global_options:
        raise validation.invalid("options", "only layer options without `global_after`",
                                 global_options)
    inputs = keras.Input(input_shape, name="image")
    x = layers.ReLU(name="stem_relu")(blocks.conv_bn(inputs, stages[0][0], settings, "stem"))
    for stage, (filters, strides) in enumerate(stages, start=1):
        for block in range(1, blocks_per_stage + 1):
            x = blocks.basic_block(x, filters, settings, f"stage{stage}_block{block}",
                                   strides=strides if block == 1 else 1)
        if stage in global_after:
            x = GlobalLayer(name=f"stage{stage}_global", **settings.as_dict(),
                            **global_options)(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, blocks.logits(x, num_classes), name=name)


def _variant(model_name, stages, blocks_per_stage, global_after, summary):
    """Registers the factory of one named ResNet; `summary` opens its docstring."""

    def factory(num_classes=10, input_shape=CIFAR_SHAPE, name=model_name, **options):
        return resnet(stages, blocks_per_stage, global_after, num_classes=num_classes,
                      input_shape=input_shape, name=name, **options)

    factory.__name__ = factory.__qualname__ = model_name
    factory.__doc__ = summary + (_GLOBAL_ARGS if global_after else _ARGS)
    return register(model_name, GLOBAL_OPTIONS if global_after else LAYER_OPTIONS)(factory)


_ARGS = """

    Args:
        num_classes: number of logits (10 or 100 for CIFAR). Defaults to 10.
        input_shape: image shape. Defaults to `(32, 32, 3)`.
        name: model name.
        **options: `kernel_initializer`, `kernel_regularizer`,
            `batchnorm_momentum`, `batchnorm_epsilon` of every layer.

    Returns:
        A functional `keras.Model` from images to logits.
    """
_GLOBAL_ARGS = """

    Args:
        num_classes: number of logits (10 or 100 for CIFAR). Defaults to 10.
        input_shape: image shape. Defaults to `(32, 32, 3)`.
        name: model name.
        **options: every `GlobalLayer` option (`velocity`, `diffusivity`,
            `init`, `steps`, `dt`, `dx`, `dy`, `boundary`,
            `diffusivity_constant`, `perona_malik_lambda`, ...), given to
            each GlobalLayer; `kernel_initializer`, `kernel_regularizer`,
            `batchnorm_momentum` and `batchnorm_epsilon` apply to every
            layer of the model.

    Returns:
        A functional `keras.Model` from images to logits.

    Example:

    >>> import pde_keras
    >>> model = pde_keras.models.create("resnet32_global", velocity="identity",
    ...                                 diffusivity="constant")
    >>> model.get_layer("stage1_global").velocity
    'identity'
    """

resnet32 = _variant("resnet32", THREE_STAGES, 5, (), """ResNet32, the authors' CIFAR baseline.

    3 stages (16, 32, 64) of 5 basic blocks: 466,906 trainable parameters
    and 69.1M MACs at 10 classes (the paper rounds to 460K / 70M).""")

resnet32_4stage = _variant("resnet32_4stage", FOUR_STAGES, 5, (), """The report's ResNet32 baseline.

    4 stages (16, 32, 64, 64) of 5 basic blocks: 841,050 trainable
    parameters and 75.1M MACs at 10 classes (the report: 844K / 75M,
    counting the batch norms' moving statistics).""")

resnet32_global = _variant("resnet32_global", FOUR_STAGES, 1, (1, 2, 3), """ResNet32-Global.

    4 stages (16, 32, 64, 64) of 1 basic block, a GlobalLayer after stages
    1-3: 161,402 trainable parameters and 14.8M conv + dense MACs with the
    GlobalLayer defaults (the paper: 162K / 15M).""")

resnet56 = _variant("resnet56", THREE_STAGES, 9, (), """ResNet56.

    3 stages (16, 32, 64) of 9 basic blocks: 855,770 trainable parameters
    and 125.7M MACs at 10 classes.""")

resnet56_global = _variant("resnet56_global", FOUR_STAGES, 2, (1, 2, 3), """ResNet56-Global.

    4 stages (16, 32, 64, 64) of 2 basic blocks (the authors' `pdenet`
    default, m = 2), a GlobalLayer after stages 1-3: 332,602 trainable
    parameters and 30.1M conv + dense MACs with the GlobalLayer
    defaults.""")
