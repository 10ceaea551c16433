"""Analytic multiply-accumulate (MAC) counts of Keras models, at batch 1.

`count_macs(model)` walks a functional (or Sequential) model layer by layer
and counts, from each layer's configuration and its input/output shapes:

- `conv`: convolutions, `H_out * W_out * C_out * k_h * k_w * C_in / groups`
  (biases not counted);
- `depthwise`: depth-wise convolutions, `H_out * W_out * C_in * multiplier
  * k_h * k_w`;
- `dense`: dense layers, `inputs * units` per position (biases not counted);
- `stencil`, `coefficients`, `sobel`: the PDE arithmetic of the Global
  layer and of `AdvectionDiffusion` (below);
- `other`: batch normalisation (one MAC per element: scale and shift fold
  into one multiply-add at inference), residual additions (one per element
  and extra operand) and average pooling (one per input element);
  ReLU, max pooling, zero padding, flatten and the like count zero.

`paper` = conv + depthwise + dense is the figure comparable with the paper
(the authors counted with thop, which sees only those layers); `pde` =
stencil + coefficients + sobel; `total` = paper + pde + other.

PDE arithmetic. One cell is one pixel of one channel; a multiply and the
addition that accumulates it make one MAC, and an operation left without a
partner counts as one MAC. Per cell, as the solver evaluates eq. 2:

- `stencil`, per step: H^{k+1} = c_M H^{k-1} + c_C H^k + 4 neighbour
  products + the driven source: 6 products accumulated, `6` MACs.
- `coefficients`, once: u_x, v_y (1 each), A_x, A_y (1 each), 2B_x, 2B_y
  (1 each), 1/L (2), M/L (2), the centre coefficient (2), the four
  neighbour coefficients (1 each), 2dt/L (1) and the driven source
  2dt/L * f (1): `18` MACs; `11` when the diffusivity is a constant (or
  zero), which leaves 2B_x, 2B_y, 1/L, M/L and 2dt/L scalars and folds the
  centre coefficient's two multiplies into one. The velocity is always a
  map (the solver broadcasts a zero velocity).
- `sobel` (Perona-Malik only), once: two separable 3x3 Sobel responses
  (3 each), |grad|^2 (2) and 1 / (1 + |grad|^2 / lambda^2) (2): `10` MACs.

Inside a `GlobalLayer`, counted from its config (not from its sub-layers,
whose structure may change): a depth-wise branch is a 3x3 depth-wise conv
and a BN per map, a residual branch a basic residual block (two 3x3 convs,
two BNs, an addition) and a BN per map, an identity branch a BN per map,
plus the residual init block and the output BN.
"""

import math

import keras

from pde_keras.advection_diffusion import AdvectionDiffusion
from pde_keras.global_layer import GlobalLayer
from pde_keras.residual_block import BasicResidualBlock

PAPER_KINDS = ("conv", "depthwise", "dense")
PDE_KINDS = ("stencil", "coefficients", "sobel")
KINDS = PAPER_KINDS + PDE_KINDS + ("other",)

STENCIL_MACS_PER_CELL = 6
COEFFICIENT_MACS_PER_CELL = 18
CONSTANT_DIFFUSIVITY_COEFFICIENT_MACS_PER_CELL = 11
SOBEL_MACS_PER_CELL = 10
GLOBAL_LAYER_KERNEL_SIZE = 3  # the Global layer's depth-wise and residual convs are 3x3

_ZERO_COST_LAYERS = (
    keras.layers.InputLayer, keras.layers.Flatten, keras.layers.Reshape, keras.layers.ReLU,
    keras.layers.Activation, keras.layers.Dropout, keras.layers.Identity,
    keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
)
_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DEPTHWISE_CONVOLUTIONS = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_AVERAGE_POOLS = (
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
)
_MERGES = (keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply)


def count_macs(model):
    """Counts a model's multiply-accumulates for one input, layer by layer.

    Args:
        model: a functional or Sequential `keras.Model` with known input
            shapes (nested models are counted layer by layer). Supported
            layers: convolutions and depth-wise convolutions (1D-3D), dense,
            batch normalisation, add/subtract/multiply, pooling, shape and
            activation layers, `GlobalLayer`, `AdvectionDiffusion` and
            `BasicResidualBlock`.

    Returns:
        A dict with the totals `"paper"` (conv + depthwise + dense, the
        figure comparable with the paper), `"pde"` (the PDE arithmetic),
        `"total"` (everything), each kind in `KINDS` (`"conv"`,
        `"depthwise"`, `"dense"`, `"stencil"`, `"coefficients"`,
        `"sobel"`, `"other"`), `"stencil_per_step"` (the stencil MACs of one
        solver step, summed over the PDE layers), and `"layers"`: one dict
        per layer with `"name"`, `"class_name"`, `"output_shape"`, the
        kinds, `"paper"`, `"pde"`, `"total"`, and for PDE layers `"steps"`
        and `"stencil_per_step"`.

    Raises:
        ValueError: for a layer it cannot count (the message names it), a
            layer called more than once, or an unknown input shape.

    Example:

    >>> import pde_keras
    >>> macs = pde_keras.count_macs(pde_keras.models.create("resnet32"))
    >>> macs["paper"]
    69124736
    """
    rows = []
    _count_layers(model, "", rows)
    result = {kind: sum(row[kind] for row in rows) for kind in KINDS}
    result["stencil_per_step"] = sum(row.get("stencil_per_step", 0) for row in rows)
    result.update(_summaries(result))
    result["layers"] = rows
    return result


def _summaries(counts):
    paper = sum(counts[kind] for kind in PAPER_KINDS)
    pde = sum(counts[kind] for kind in PDE_KINDS)
    return {"paper": paper, "pde": pde, "total": paper + pde + counts["other"]}


def _count_layers(model, prefix, rows):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _count_layers(layer, f"{prefix}{layer.name}/", rows)
            continue
        input_shapes, output_shape = _shapes(layer)
        counts = {kind: 0 for kind in KINDS}
        counts.update(_layer_macs(layer, input_shapes, output_shape))
        row = {"name": prefix + layer.name, "class_name": type(layer).__name__,
               "output_shape": output_shape}
        row.update(counts)
        row.update(_summaries(counts))
        rows.append(row)


def _shapes(layer):
    """The layer's input shapes (a list, batch dropped) and its output shape."""
    if len(getattr(layer, "_inbound_nodes", ())) > 1:
        raise ValueError(
            f"count_macs counts each layer once, but layer {layer.name!r} is called "
            f"{len(layer._inbound_nodes)} times in the model.")
    if isinstance(layer, keras.layers.InputLayer):
        return [], tuple(layer.output.shape[1:])
    inputs = keras.tree.flatten(layer.input)
    input_shapes = [tuple(tensor.shape[1:]) for tensor in inputs]
    output_shape = tuple(keras.tree.flatten(layer.output)[0].shape[1:])
    for shape in input_shapes + [output_shape]:
        if None in shape:
            raise ValueError(
                f"count_macs needs static shapes, but layer {layer.name!r} sees the "
                f"shape {(None,) + shape}. Build the model with a fixed input shape.")
    return input_shapes, output_shape


def _layer_macs(layer, input_shapes, output_shape):
    """{kind: MACs} of one layer call."""
    if isinstance(layer, _ZERO_COST_LAYERS):
        return {}
    if isinstance(layer, _CONVOLUTIONS):
        kernel = math.prod(layer.kernel_size) * input_shapes[0][-1] // layer.groups
        return {"conv": math.prod(output_shape) * kernel}
    if isinstance(layer, _DEPTHWISE_CONVOLUTIONS):
        return {"depthwise": math.prod(output_shape) * math.prod(layer.kernel_size)}
    if isinstance(layer, keras.layers.Dense):
        return {"dense": math.prod(input_shapes[0]) * layer.units}
    if isinstance(layer, keras.layers.BatchNormalization):
        return {"other": math.prod(output_shape)}
    if isinstance(layer, _MERGES):
        return {"other": math.prod(output_shape) * (len(input_shapes) - 1)}
    if isinstance(layer, _AVERAGE_POOLS):
        return {"other": math.prod(input_shapes[0])}
    if isinstance(layer, GlobalLayer):
        return global_layer_macs(layer.get_config(), input_shapes[0])
    if isinstance(layer, AdvectionDiffusion):
        return advection_diffusion_macs(layer.get_config(), input_shapes[0])
    if isinstance(layer, BasicResidualBlock):
        return basic_residual_block_macs(input_shapes[0])
    raise ValueError(
        f"count_macs cannot count layer {layer.name!r} of class "
        f"{type(layer).__name__}. Supported: convolutions, depth-wise convolutions, "
        "Dense, BatchNormalization, Add/Subtract/Multiply, pooling, shape and activation "
        "layers, GlobalLayer, AdvectionDiffusion, BasicResidualBlock and nested models.")


def _add(total, part):
    for kind, value in part.items():
        total[kind] = total.get(kind, 0) + value
    return total


def basic_residual_block_macs(shape):
    """{kind: MACs} of a `BasicResidualBlock` on inputs `(H, W, C)`."""
    cells, channels = math.prod(shape), shape[-1]
    return {"conv": 2 * cells * GLOBAL_LAYER_KERNEL_SIZE**2 * channels,
            "other": 3 * cells}  # two batch normalisations and the addition


def _solver_macs(shape, steps, diffusivity_is_map, perona_malik):
    """{kind: MACs} of the solver's own arithmetic on `(H, W, C)` (see the module doc)."""
    cells = math.prod(shape)
    per_cell = (COEFFICIENT_MACS_PER_CELL if diffusivity_is_map
                else CONSTANT_DIFFUSIVITY_COEFFICIENT_MACS_PER_CELL)
    return {
        "stencil": steps * STENCIL_MACS_PER_CELL * cells,
        "stencil_per_step": STENCIL_MACS_PER_CELL * cells,
        "steps": steps,
        "coefficients": per_cell * cells,
        "sobel": SOBEL_MACS_PER_CELL * cells if perona_malik else 0,
    }


def _global_branch_macs(kind, shape):
    """{kind: MACs} of the sub-layers that predict one coefficient map."""
    cells = math.prod(shape)
    if kind == "depthwise":
        return {"depthwise": cells * GLOBAL_LAYER_KERNEL_SIZE**2, "other": cells}
    if kind == "residual":
        return _add(basic_residual_block_macs(shape), {"other": cells})
    if kind == "identity":
        return {"other": cells}
    return {}  # constant, zero, Perona-Malik: no sub-layers


def global_layer_macs(config, shape):
    """{kind: MACs} of a `GlobalLayer` with `config` on inputs `(H, W, C)`.

    Counted from the layer's options only: two maps (u, v) of the velocity
    branch, two (D_x, D_y) of the diffusivity branch, the init block, the
    output BN and the solver's arithmetic.
    """
    total = {"other": math.prod(shape)}  # the output batch normalisation
    for branch in (config["velocity"], config["diffusivity"]):
        for _ in range(2):
            _add(total, _global_branch_macs(branch, shape))
    if config["init"] == "residual":
        _add(total, basic_residual_block_macs(shape))
    diffusivity = config["diffusivity"]
    return _add(total, _solver_macs(
        shape, config["steps"], diffusivity not in ("constant", "zero"),
        diffusivity == "perona_malik"))


def advection_diffusion_macs(config, shape):
    """{kind: MACs} of an `AdvectionDiffusion` layer with `config` on `(H, W, C)`."""
    perona_malik = config["diffusivity"] == "perona_malik"
    return _solver_macs(shape, config["steps"], perona_malik, perona_malik)
