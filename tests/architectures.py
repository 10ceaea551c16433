"""Independent counts of the paper's architectures, from their definitions.

Written from the architecture descriptions of issue 3 and the paper, layer by
layer, with no pde_keras code: trainable parameters and conv + depth-wise +
dense MACs (batch 1) of the MNIST illustrative nets, the CIFAR ResNets and
their Global versions, and the Global layer's PDE arithmetic per cell.
"""

import math

CIFAR_SIDE = 32
MNIST_SIDE = 28
THREE_STAGES = ((16, 1), (32, 2), (64, 2))
FOUR_STAGES = THREE_STAGES + ((64, 2),)


def trainable_params(model):
    """What the formulas below are compared with: the model's trainable weights' sizes."""
    return sum(math.prod(weight.shape) for weight in model.trainable_weights)


def conv_params(c_in, c_out, k=3):
    return k * k * c_in * c_out  # no bias


def bn_params(c):
    return 2 * c  # gamma and beta (the moving statistics are not trainable)


def dense_params(c_in, classes):
    return c_in * classes + classes


def conv_macs(side_out, c_in, c_out, k=3):
    return side_out * side_out * c_out * k * k * c_in


# -- MNIST illustrative nets ---------------------------------------------------


def mnist_params(feature_layer, channels, classes=10):
    """BN(1) -> conv 1->C; BN(C) -> conv C->C; output BN unless `conv`; Dense."""
    c = channels
    stem = bn_params(1) + conv_params(1, c)
    feature = bn_params(c) + conv_params(c, c)
    output_bn = 0 if feature_layer == "conv" else bn_params(c)
    pooled = (MNIST_SIDE // 4) ** 2 * c
    return stem + feature + output_bn + dense_params(pooled, classes)


def mnist_paper_macs(channels, classes=10):
    c = channels
    pooled = (MNIST_SIDE // 4) ** 2 * c
    return conv_macs(MNIST_SIDE, 1, c) + conv_macs(MNIST_SIDE, c, c) + pooled * classes


# -- Global layer -------------------------------------------------------------

MAPS_PER_BRANCH = 2  # (u, v) for the velocity, (D_x, D_y) for the diffusivity


def residual_block_params(c):
    return 2 * (conv_params(c, c) + bn_params(c))


def branch_params(kind, c):
    """One coefficient map's sub-layers, with its BN before the ReLU."""
    return {"depthwise": 9 * c + bn_params(c),
            "residual": residual_block_params(c) + bn_params(c),
            "identity": bn_params(c)}.get(kind, 0)


def global_params(c, velocity="depthwise", diffusivity="depthwise", init="identity", **_):
    init_params = residual_block_params(c) if init == "residual" else 0
    return (MAPS_PER_BRANCH * (branch_params(velocity, c) + branch_params(diffusivity, c))
            + init_params + bn_params(c))


def branch_paper_macs(kind, c, side):
    return {"depthwise": side * side * c * 9,
            "residual": 2 * conv_macs(side, c, c)}.get(kind, 0)


def global_paper_macs(c, side, velocity="depthwise", diffusivity="depthwise", init="identity",
                      **_):
    init_macs = 2 * conv_macs(side, c, c) if init == "residual" else 0
    return (MAPS_PER_BRANCH * (branch_paper_macs(velocity, c, side)
                               + branch_paper_macs(diffusivity, c, side)) + init_macs)


def pde_macs(cells, steps=5, diffusivity="depthwise"):
    """The solver's own arithmetic (pde_keras.macs' documented per-cell costs).

    Per step 6 products per cell; coefficients 18 per cell (11 when D is a
    constant); Perona-Malik's Sobel map 10 per cell.
    """
    constant = diffusivity in ("constant", "zero")
    return {"stencil": 6 * steps * cells,
            "coefficients": (11 if constant else 18) * cells,
            "sobel": 10 * cells if diffusivity == "perona_malik" else 0}


# -- CIFAR ResNets ----------------------------------------------------------------


def _resnet_layers(stages, blocks):
    """Yields (c_in, c_out, stride, side_out, projection, last_block_of_stage, stage)."""
    c_in, side = 16, CIFAR_SIDE
    for stage, (c_out, stride) in enumerate(stages, start=1):
        for block in range(blocks):
            s = stride if block == 0 else 1
            side //= s
            yield c_in, c_out, s, side, (s != 1 or c_in != c_out), block == blocks - 1, stage
            c_in = c_out


def resnet_params(stages, blocks, global_after=(), classes=10, **global_options):
    total = conv_params(3, 16) + bn_params(16)
    for c_in, c_out, _, _, projection, last, stage in _resnet_layers(stages, blocks):
        total += conv_params(c_in, c_out) + conv_params(c_out, c_out) + 2 * bn_params(c_out)
        if projection:
            total += conv_params(c_in, c_out, k=1) + bn_params(c_out)
        if last and stage in global_after:
            total += global_params(c_out, **global_options)
    return total + dense_params(stages[-1][0], classes)


def resnet_paper_macs(stages, blocks, global_after=(), classes=10, **global_options):
    total = conv_macs(CIFAR_SIDE, 3, 16)
    for c_in, c_out, _, side, projection, last, stage in _resnet_layers(stages, blocks):
        total += conv_macs(side, c_in, c_out) + conv_macs(side, c_out, c_out)
        if projection:
            total += conv_macs(side, c_in, c_out, k=1)
        if last and stage in global_after:
            total += global_paper_macs(c_out, side, **global_options)
    return total + stages[-1][0] * classes


def global_cells(stages, global_after):
    """Cells (pixels x channels) seen by the Global layers of a ResNet."""
    side, cells = CIFAR_SIDE, 0
    for stage, (c, stride) in enumerate(stages, start=1):
        side //= stride
        if stage in global_after:
            cells += side * side * c
    return cells


# name -> (stages, blocks per stage, stages followed by a GlobalLayer)
RESNETS = {
    "resnet32": (THREE_STAGES, 5, ()),
    "resnet32_4stage": (FOUR_STAGES, 5, ()),
    "resnet32_global": (FOUR_STAGES, 1, (1, 2, 3)),
    "resnet56": (THREE_STAGES, 9, ()),
    "resnet56_global": (FOUR_STAGES, 2, (1, 2, 3)),
}

# The rows of the report's Table 2 (ResNet32-Global ablations) as options.
TABLE2_VARIANTS = {
    "depthwise v and D": {},
    "identity v, constant D": {"velocity": "identity", "diffusivity": "constant"},
    "residual v and D": {"velocity": "residual", "diffusivity": "residual"},
    "Perona-Malik D": {"diffusivity": "perona_malik"},
    "residual init": {"init": "residual"},
    "v = 0 (diffusion)": {"velocity": "zero"},
    "D = 0 (advection)": {"diffusivity": "zero"},
}


def within(value, reference, tolerance):
    return math.isclose(value, reference, rel_tol=tolerance)
