"""Looking inside models with PDE layers: which they are, what they see, their
maps, how stable they are, how many parameters the model trains.

Any model built from `GlobalLayer` or `AdvectionDiffusion`, also nested (a
training classifier: pixels -> normalise -> core model -> logits), works:

>>> import numpy as np, keras, pde_keras
>>> from pde_keras import inspection
>>> model = pde_keras.models.create("resnet32_global", steps=1)
>>> [layer.name for layer in inspection.pde_layers(model)]
['stage1_global', 'stage2_global', 'stage3_global']
>>> numbers = inspection.stability_numbers(model, np.zeros((2, 32, 32, 3), "float32"))
>>> sorted(numbers["stage1_global"])
['courant', 'diffusion_number']
"""

import dataclasses
import math

import keras
import numpy as np

from pde_keras.advection_diffusion import AdvectionDiffusion
from pde_keras.global_layer import GlobalLayer

PDE_LAYER_TYPES = (GlobalLayer, AdvectionDiffusion)


def pde_layers(model):
    """The PDE layers (`GlobalLayer`, `AdvectionDiffusion`) of `model`, input side first.

    Layers of nested models (e.g. the core of a training classifier) count.
    """
    found = []
    for layer in model.layers:
        if isinstance(layer, PDE_LAYER_TYPES):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found += pde_layers(layer)
    return found


def locate(model, wanted):
    """`(preprocess, inner)`: the (nested) functional model `inner` whose own
    layers include one that `wanted(layer)` accepts, and the function from
    `model`'s input batch to `inner`'s.

    A wrapper such as `training.build_classifier` (pixels -> normalise ->
    core -> logits) is a chain: the layers before the nested model are
    applied in order, so the core sees exactly what it saw in training.
    Raises LookupError when no layer is wanted.
    """
    if any(wanted(layer) for layer in model.layers):
        return (lambda batch: batch), model
    for position, layer in enumerate(model.layers):
        if isinstance(layer, keras.Model):
            try:
                preprocess, inner = locate(layer, wanted)
            except LookupError:
                continue
            before = [l for l in model.layers[:position]
                      if not isinstance(l, keras.layers.InputLayer)]

            def chain(batch, before=before, preprocess=preprocess):
                for step in before:
                    batch = step(batch)
                return preprocess(batch)

            return chain, inner
    raise LookupError(model.name)


def run_to(inner, preprocess, batch, tensors):
    """Evaluates the symbolic `tensors` of `inner` for `batch` (inference mode).

    Returns a list, in the order of `tensors` (a list entry stays a list).
    """
    feed = keras.Model(inner.input, {str(i): tensor for i, tensor in enumerate(tensors)})
    values = feed(preprocess(np.asarray(batch, dtype="float32")), training=False)
    return [values[str(i)] for i in range(len(tensors))]


def pde_layer_inputs(model, batch):
    """`[(layer, its input for batch)]` for every PDE layer of `model`, input side first.

    Args:
        model: a model with PDE layers, nested ones included.
        batch: a batch as `model` takes it (raw pixels for a training
            classifier).
    """
    preprocess, inner = locate(model, lambda layer: isinstance(layer, PDE_LAYER_TYPES))
    layers = [layer for layer in inner.layers if isinstance(layer, PDE_LAYER_TYPES)]
    return list(zip(layers, run_to(inner, preprocess, batch, [l.input for l in layers])))


def stability_numbers(model, batch):
    """The largest Courant and diffusion numbers of each PDE layer on `batch`.

    In inference mode (the batch norms' moving statistics), per layer:
    `courant` = max(|u| dt/dx + |v| dt/dy) and `diffusion_number` =
    max(D_x dt/dx^2 + D_y dt/dy^2) over every image, cell and channel.
    The leapfrog advection of the scheme is stable for Courant numbers
    below 1; its diffusion (DuFort-Frankel) is stable for any diffusion
    number, but loses accuracy far above 1/2.

    Returns:
        `{layer name: {"courant": float, "diffusion_number": float}}`, in
        layer order; `{}` when `model` has no PDE layers.
    """
    if not pde_layers(model):
        return {}
    numbers = {}
    for layer, layer_input in pde_layer_inputs(model, batch):
        maps = {name: np.asarray(keras.ops.convert_to_numpy(value))
                for name, value in layer.coefficient_maps(layer_input).items()}
        courant = np.abs(maps["u"]) * (layer.dt / layer.dx) + np.abs(maps["v"]) * (
            layer.dt / layer.dy)
        diffusion = maps["Dx"] * (layer.dt / layer.dx**2) + maps["Dy"] * (layer.dt / layer.dy**2)
        numbers[layer.name] = {"courant": float(courant.max()),
                               "diffusion_number": float(diffusion.max())}
    return numbers


def trainable_params(model):
    """The number of trainable parameters of `model` (an int)."""
    return int(sum(math.prod(variable.shape) for variable in model.trainable_variables))


@dataclasses.dataclass(frozen=True)
class LayerMaps:
    """The maps of one PDE layer for one image.

    Attributes:
        index: position among the model's PDE layers (0 = nearest the input).
        name: the Keras layer name, e.g. `"stage1_global"` or `"pde"`.
        kind: the layer's class name (`"GlobalLayer"`, `"AdvectionDiffusion"`).
        maps: `{name: (height, width, channels) float32 array}`: every entry
            of the layer's `coefficient_maps` for the image, plus `"input"`,
            the layer's input (for `AdvectionDiffusion`: its source f).
    """

    index: int
    name: str
    kind: str
    maps: dict


def layer_maps(model, image):
    """The maps of every PDE layer of `model` for one image.

    Args:
        model: a model with PDE layers (e.g. a run's classifier).
        image: `(height, width, channels)` pixels as the model takes them
            (0-255 for a training classifier).

    Returns:
        A list of `LayerMaps`, input side first. Each layer's maps are
        exactly its `coefficient_maps` of the input it gets in the model.

    Raises:
        LookupError: the model has no PDE layers.
    """
    result = []
    batch = np.asarray(image)[None]
    for index, (layer, layer_input) in enumerate(pde_layer_inputs(model, batch)):
        maps = {name: _first(value) for name, value in layer.coefficient_maps(layer_input).items()}
        source = layer_input[0] if isinstance(layer, AdvectionDiffusion) else layer_input
        maps["input"] = _first(source)
        result.append(LayerMaps(index, layer.name, type(layer).__name__, maps))
    return result


def layer_outputs(model, image, names):
    """The outputs of the layers `names` (of the model or a nested model) for one image.

    Returns:
        A list of `(height, width, channels)` float32 arrays, one per name.

    Raises:
        LookupError: a name that is no layer of the model; the message is
            that name.
    """
    names = list(names)
    try:
        preprocess, inner = locate(model, lambda layer: layer.name in names)
    except LookupError:
        inner = None
    for name in names:
        if inner is None or name not in [layer.name for layer in inner.layers]:
            raise LookupError(name)
    outputs = run_to(inner, preprocess, np.asarray(image)[None],
                     [inner.get_layer(name).output for name in names])
    return [_first(output) for output in outputs]


def _first(tensor):
    """The first example of a batch as a float32 NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(tensor), dtype=np.float32)[0]
