"""Tests of pde_keras.count_macs against hand-written counts and TF's profiler.

Expected MACs come from `architectures.py` (formulas written from the
architectures' definitions) and, for convolutions, depth-wise convolutions
and dense layers, from TensorFlow's graph profiler (FLOPs / 2).
"""

import itertools
import math
import re

import keras
import numpy as np
import pytest

import architectures as arch
import pde_keras
from pde_keras import solver
from pde_keras import models
from pde_keras.global_layer import DIFFUSIVITIES, INITS, VELOCITIES

pytestmark = pytest.mark.multibackend

TENSORFLOW = keras.backend.backend() == "tensorflow"


# -- pinned paper-comparable MACs ---------------------------------------------------

PINNED_PAPER_MACS = {
    "resnet32": 69_124_736,  # the issue: ~69.1M (paper: 70M)
    "resnet32_4stage": 75_088_512,  # ~75.1M (report: 75M)
    "resnet32_global": 14_779_008,  # ~14.8M (paper: 15M)
    "resnet56": 125_747_840,
    "resnet56_global": 30_114_432,
}


@pytest.mark.parametrize("name", list(PINNED_PAPER_MACS))
def test_resnet_paper_macs(build, name):
    expected = PINNED_PAPER_MACS[name]
    assert arch.resnet_paper_macs(*arch.RESNETS[name]) == expected
    macs = pde_keras.count_macs(build(name))
    assert macs["paper"] == expected
    assert macs["paper"] == macs["conv"] + macs["depthwise"] + macs["dense"]
    assert macs["dense"] == 64 * 10


def test_resnet32_global_depthwise_share(build):
    """4 depth-wise 3x3 maps per GlobalLayer: 36 C H W each, nothing else depth-wise."""
    macs = pde_keras.count_macs(build("resnet32_global"))
    assert macs["depthwise"] == 36 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8) == 1_032_192
    assert macs["conv"] == 13_746_176


@pytest.mark.parametrize("name", ["mnist_conv", "mnist_residual", "mnist_pde"])
@pytest.mark.parametrize("channels", [1, 8])
def test_mnist_paper_macs(build, name, channels):
    macs = pde_keras.count_macs(build(name, channels=channels))
    assert macs["paper"] == arch.mnist_paper_macs(channels) == {1: 14_602, 8: 511_952}[channels]


# -- the acceptance check: Table 2 against an independent count ----------------------


@pytest.mark.parametrize("variant", list(arch.TABLE2_VARIANTS))
def test_table2_variants_match_independent_count(build, variant):
    options = arch.TABLE2_VARIANTS[variant]
    model = build("resnet32_global", **options)
    stages, blocks, global_after = arch.RESNETS["resnet32_global"]
    expected_params = arch.resnet_params(stages, blocks, global_after, **options)
    expected_macs = arch.resnet_paper_macs(stages, blocks, global_after, **options)
    assert arch.trainable_params(model) == expected_params
    paper = pde_keras.count_macs(model)["paper"]
    assert arch.within(paper, expected_macs, 0.01)  # the acceptance criterion...
    assert paper == expected_macs  # ...and in fact to the multiply


def test_table2_counts_pinned(build):
    """The variants' trainable parameters and paper MACs, as the README reports them."""
    counts = {variant: (arch.trainable_params(build("resnet32_global", **options)),
                        pde_keras.count_macs(build("resnet32_global", **options))["paper"])
              for variant, options in arch.TABLE2_VARIANTS.items()}
    assert counts == {
        "depthwise v and D": (161_402, 14_779_008),
        "identity v, constant D": (156_922, 13_746_816),
        "residual v and D": (546_234, 70_369_920),
        "Perona-Malik D": (158_938, 14_262_912),
        "residual init": (258_618, 28_934_784),
        "v = 0 (diffusion)": (158_938, 14_262_912),
        "D = 0 (advection)": (158_938, 14_262_912),
    }


# -- PDE arithmetic ---------------------------------------------------------------------

RESNET32_GLOBAL_CELLS = arch.global_cells(arch.FOUR_STAGES, (1, 2, 3))


@pytest.mark.parametrize("options", [
    {}, {"diffusivity": "constant", "velocity": "identity"}, {"diffusivity": "perona_malik"},
    {"diffusivity": "zero", "steps": 2}, {"velocity": "zero", "steps": 1},
], ids=lambda o: "-".join(map(str, o.values())) or "defaults")
def test_global_pde_arithmetic(build, options):
    macs = pde_keras.count_macs(build("resnet32_global", **options))
    expected = arch.pde_macs(RESNET32_GLOBAL_CELLS, options.get("steps", 5),
                             options.get("diffusivity", "depthwise"))
    assert {kind: macs[kind] for kind in expected} == expected
    assert macs["stencil_per_step"] == 6 * RESNET32_GLOBAL_CELLS == 172_032
    assert macs["pde"] == sum(expected.values())
    assert macs["total"] == macs["paper"] + macs["pde"] + macs["other"]


def test_resnet32_global_totals_pinned(build):
    macs = pde_keras.count_macs(build("resnet32_global"))
    assert (macs["stencil"], macs["coefficients"], macs["sobel"]) == (860_160, 516_096, 0)
    # BN: stem 16K + 4 stages x (2 or 3 BNs) + 5 per GlobalLayer; adds: 1 per block.
    assert macs["other"] == 263_168
    assert macs["total"] == 16_418_432


def test_mnist_pde_arithmetic(build):
    cells = 28 * 28 * 8
    constant = pde_keras.count_macs(build("mnist_pde", channels=8))
    assert {k: constant[k] for k in arch.pde_macs(cells, 5, "constant")} == arch.pde_macs(
        cells, 5, "constant")
    perona_malik = pde_keras.count_macs(build("mnist_pde", channels=8, diffusivity="perona_malik"))
    assert {k: perona_malik[k] for k in ("stencil", "coefficients", "sobel")} == arch.pde_macs(
        cells, 5, "perona_malik")
    assert pde_keras.count_macs(build("mnist_conv", channels=8))["pde"] == 0


def test_per_layer_breakdown(build):
    macs = pde_keras.count_macs(build("resnet32_global"))
    rows = {row["name"]: row for row in macs["layers"]}
    assert len(rows) == len(macs["layers"])
    for kind in pde_keras.macs.KINDS + ("paper", "pde", "total"):
        assert sum(row[kind] for row in macs["layers"]) == macs[kind], kind
    stage1 = rows["stage1_global"]
    cells = 32 * 32 * 16
    assert stage1["class_name"] == "GlobalLayer"
    assert stage1["output_shape"] == (32, 32, 16)
    assert stage1["depthwise"] == 4 * 9 * cells
    assert stage1["conv"] == 0
    assert (stage1["steps"], stage1["stencil_per_step"]) == (5, 6 * cells)
    assert stage1["other"] == 5 * cells  # four branch BNs and the output BN
    assert rows["stem_conv"]["conv"] == 32 * 32 * 16 * 27
    assert rows["stem_bn"]["other"] == cells
    assert rows["stem_relu"]["total"] == 0
    assert rows["stage2_block1_shortcut_conv"]["conv"] == 16 * 16 * 32 * 16
    assert rows["pool"]["other"] == 4 * 4 * 64
    assert rows["logits"]["dense"] == 640


@pytest.mark.parametrize("velocity, diffusivity, init",
                         list(itertools.product(VELOCITIES, DIFFUSIVITIES, INITS)))
def test_every_global_configuration(velocity, diffusivity, init):
    side, c = 6, 4
    inputs = keras.Input((side, side, c))
    options = {"velocity": velocity, "diffusivity": diffusivity, "init": init, "steps": 3}
    model = keras.Model(inputs, pde_keras.GlobalLayer(**options)(inputs))
    macs = pde_keras.count_macs(model)
    assert macs["paper"] == arch.global_paper_macs(c, side, **options)
    expected_pde = arch.pde_macs(side * side * c, 3, diffusivity)
    assert {kind: macs[kind] for kind in expected_pde} == expected_pde
    assert arch.trainable_params(model) == arch.global_params(c, **options)


# -- cross-check with TensorFlow's graph profiler ---------------------------------------


def profiler_flops_by_op(model):
    """{op type: FLOPs} of the model's inference graph at batch 1 (TF profiler)."""
    import tensorflow as tf

    spec = tf.TensorSpec((1,) + tuple(model.input.shape[1:]), "float32")
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    profile = tf.compat.v1.profiler.profile(graph, cmd="op", options=options)
    flops = {}

    def walk(node):
        flops[node.name] = flops.get(node.name, 0) + node.float_ops
        for child in node.children:
            walk(child)

    walk(profile)
    return flops


needs_tensorflow = pytest.mark.skipif(not TENSORFLOW, reason="TensorFlow's graph profiler")


@needs_tensorflow
@pytest.mark.parametrize("name, options", [
    ("resnet32_global", {}),
    ("resnet32_global", {"velocity": "residual", "diffusivity": "perona_malik",
                         "init": "residual"}),
    ("mnist_pde", {"channels": 8}),
    ("resnet32", {}),
])
def test_conv_and_dense_macs_match_tf_profiler(build, name, options, monkeypatch):
    # The profiler counts TensorFlow's own ops: profile the keras.ops graph
    # (the compiled kernel's ops have no flop count).
    monkeypatch.setenv("PDE_KERAS_SOLVER", "reference")
    model = build(name, **options)
    flops = profiler_flops_by_op(model)
    macs = pde_keras.count_macs(model)
    assert flops.get("Conv2D", 0) == 2 * macs["conv"]
    assert flops.get("DepthwiseConv2dNative", 0) == 2 * macs["depthwise"]
    assert flops.get("MatMul", 0) == 2 * macs["dense"]


class _OneSolverStep(keras.layers.Layer):
    """One step of the solver's loop body, with per-cell coefficient maps."""

    def call(self, h):
        constants = (h,) * 7  # driven term and the six stencil coefficients
        return solver._step_function("periodic")(None, (h, h, constants))[1]


@needs_tensorflow
def test_stencil_step_matches_tf_profiler():
    """One solver step costs 6 multiplies and 6 adds per cell in the graph."""
    inputs = keras.Input((6, 5, 3))
    flops = profiler_flops_by_op(keras.Model(inputs, _OneSolverStep()(inputs)))
    per_step = flops.get("Mul", 0) + flops.get("AddV2", 0)
    assert per_step == 2 * 6 * 6 * 5 * 3 == 2 * pde_keras.macs.STENCIL_MACS_PER_CELL * 90


# -- other layers, nesting, errors -----------------------------------------------------------


def test_other_layers_and_nested_models():
    inner = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.BatchNormalization(name="bn"),
                              keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                                           name="dw")],
                             name="inner")
    inputs = keras.Input((8, 8, 4))
    x = inner(inputs)
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same", groups=2, name="grouped")(x)
    z = keras.layers.AveragePooling2D(2, name="avg")(x)
    x = keras.layers.Add(name="add")([y, z, z])
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, name="dense")(x)
    macs = pde_keras.count_macs(keras.Model(inputs, outputs))
    rows = {row["name"]: row for row in macs["layers"]}
    assert rows["inner/bn"]["other"] == 8 * 8 * 4
    assert rows["inner/dw"]["depthwise"] == 8 * 8 * 8 * 9
    assert rows["grouped"]["conv"] == 4 * 4 * 8 * 9 * (8 // 2)
    assert rows["avg"]["other"] == 8 * 8 * 8
    assert rows["add"]["other"] == 2 * 4 * 4 * 8
    assert rows["dense"]["dense"] == 4 * 4 * 8 * 3
    assert macs["paper"] == 8 * 8 * 8 * 9 + 4 * 4 * 8 * 9 * 4 + 4 * 4 * 8 * 3


def test_unsupported_layer():
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Conv2DTranspose(4, 3, name="up")(inputs)
    with pytest.raises(ValueError, match="^" + re.escape(
            "count_macs cannot count layer 'up' of class Conv2DTranspose. Supported: ")):
        pde_keras.count_macs(keras.Model(inputs, outputs))


def test_shared_layer():
    shared = keras.layers.Dense(4, name="shared")
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match=re.escape(
            "count_macs counts each layer once, but layer 'shared' is called 2 times")):
        pde_keras.count_macs(keras.Model(inputs, shared(shared(inputs))))


def test_unknown_shape():
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    with pytest.raises(ValueError, match=re.escape(
            "count_macs needs static shapes, but layer 'conv' sees the shape "
            "(None, None, None, 3)")):
        pde_keras.count_macs(keras.Model(inputs, outputs))


def test_paper_comparison_is_close_to_the_papers_rounded_figures(build):
    """ResNet32: 69.1M vs the paper's 70M; ResNet32-Global: 14.8M vs 15M."""
    assert math.isclose(pde_keras.count_macs(build("resnet32"))["paper"], 70e6, rel_tol=0.02)
    assert math.isclose(pde_keras.count_macs(build("resnet32_global"))["paper"], 15e6,
                        rel_tol=0.02)
