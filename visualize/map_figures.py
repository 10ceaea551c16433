"""Figures of the PDE layers' coefficient maps (Dx, Dy, u, v, ux, vy, ...).

For one image, every PDE layer of a model (`pde_keras.GlobalLayer`, and the
MNIST net's `pde_keras.AdvectionDiffusion`), numbered from the input side
(`layer0`, `layer1`, ...), gets one PNG per map in `MAPS`, named
`layer{i}_{map}.png`. Each is 1200 x 400 pixels and has three panels:

1. the input image (what the model was fed);
2. the channel summary: the map's mean over its channels, with a colour bar;
3. the per-channel grid: every channel as one tile (16 channels in 4 x 4,
   32 in 4 x 8, 64 in 8 x 8), one shared colour scale and colour bar.

`overview.png` puts the channel means of all maps of all layers side by
side (one row per layer, `OVERVIEW_COLUMN_PX` wide per panel). `maps.npz`
holds the arrays drawn: `image`, `layer_names`, and `layer{i}_{key}` for
every entry of the layer's `coefficient_maps` (`Dx`, `Dy`, `u`, `v`, `ux`,
`vy`, `initial`, `solution`, `output`, `<map>_pre`) plus `layer{i}_input`,
each `(height, width, channels)` float32. The PNGs draw these arrays, and
the arrays are exactly what `coefficient_maps` returned.

Colours: see `visualize.plots` (diverging around 0 for maps of both signs,
viridis otherwise).
"""

import pathlib

import numpy as np

from pde_keras import inspection, run_directory, validation
from visualize import plots, trained_runs

# Map name -> what it is (figure titles). u, v are the blog's g, g1.
MAPS = {
    "Dx": "D_x: diffusivity along x (height)",
    "Dy": "D_y: diffusivity along y (width)",
    "u": "u: velocity along x (the blog's g)",
    "v": "v: velocity along y (the blog's g1)",
    "ux": "u_x: du/dx (central difference)",
    "vy": "v_y: dv/dy (central difference)",
    "input": "input: the layer's input features f",
    "output": "output: the layer's output features",
}
MAP_FIGURE_PX = (1200, 400)
OVERVIEW_COLUMN_PX = 200
OVERVIEW_ROW_PX = 190
OVERVIEW_TITLE_PX = 60
# The test images `--dump_maps` draws at the end of training.
DUMP_INDICES = (0, 1, 2)


def overview_size(layers):
    """`(width, height)` in pixels of the overview of `layers` PDE layers."""
    return (OVERVIEW_COLUMN_PX * (1 + len(MAPS)),
            OVERVIEW_ROW_PX * layers + OVERVIEW_TITLE_PX)


def map_figures(image, caption, layer):
    """The figures of one layer's maps: image, channel mean, channel grid.

    One figure is made and redrawn for each map in turn (save each before
    taking the next).

    Args:
        image: the uint8 pixels the model was fed.
        caption: what the image is, e.g. `"test image 0 (cat)"`.
        layer: a `pde_keras.inspection.LayerMaps`.

    Yields:
        `(name, figure)` for each name of `MAPS`: a `matplotlib.figure.
        Figure` of `MAP_FIGURE_PX` pixels.
    """
    fig = plots.figure(*MAP_FIGURE_PX)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": (1.0, 1.2, 1.2)})
    plots.show_image(axes[0], image, caption)
    fig.subplots_adjust(left=0.02, right=0.97, bottom=0.04, top=0.80, wspace=0.25)
    mean_panel = grid_panel = None
    for name in MAPS:
        values = layer.maps[name]
        height, width, channels = values.shape
        rows, columns = plots.grid_shape(channels)
        mean, grid = values.mean(axis=-1), plots.mosaic(values)
        if channels == 1:
            mean_title = grid_title = f"the one channel\n{plots.describe_range(values)}"
        else:
            mean_title = f"mean over the {channels} channels\n{plots.describe_range(mean)}"
            grid_title = (f"channels 0-{channels - 1} ({rows} x {columns}), one scale\n"
                          f"{plots.describe_range(values)}")
        if mean_panel is None:
            mean_panel = plots.MapPanel(fig, axes[1], mean, mean_title)
            grid_panel = plots.MapPanel(fig, axes[2], grid, grid_title)
        else:
            mean_panel.update(mean, mean_title)
            grid_panel.update(grid, grid_title)
        fig.suptitle(f"{layer.name} (layer {layer.index}, {layer.kind}, {height}x{width}): "
                     f"{MAPS[name]}", fontsize=11)
        yield name, fig


def overview_figure(image, caption, layers):
    """All layers' maps in one figure: a row per layer, the channel mean of each map."""
    fig = plots.figure(*overview_size(len(layers)))
    axes = fig.subplots(len(layers), 1 + len(MAPS), squeeze=False)
    for row, layer in zip(axes, layers):
        plots.show_image(row[0], image)
        row[0].set_ylabel(f"layer {layer.index}\n{layer.name}", fontsize=9)
        for ax, name in zip(row[1:], MAPS):
            plots.MapPanel(fig, ax, layer.maps[name].mean(axis=-1))
    for ax, title in zip(axes[0], ["image", *MAPS]):
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"Channel means of the PDE layers' maps, {caption}", fontsize=11)
    top = 1 - OVERVIEW_TITLE_PX / fig.bbox.height
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.02, top=top, wspace=0.35,
                        hspace=0.25)
    return fig


def write_maps(model, image, out_dir, caption="image"):
    """Writes the map PNGs, `overview.png` and `maps.npz` of `model` for one image.

    Args:
        model: a model with PDE layers, e.g. a run's classifier.
        image: uint8 `(height, width, channels)` pixels as the model takes them.
        out_dir: output directory (created).
        caption: what the image is, for the titles.

    Returns:
        The paths written, sorted.

    Raises:
        visualize.trained_runs.VisualizeError: the model has no PDE layers.
    """
    out_dir = pathlib.Path(out_dir)
    layers = trained_runs.layer_maps(model, image)
    arrays = {"image": np.asarray(image, np.uint8),
              "layer_names": np.array([layer.name for layer in layers])}
    paths = []
    for layer in layers:
        arrays.update({f"layer{layer.index}_{key}": value for key, value in layer.maps.items()})
        for name, fig in map_figures(image, caption, layer):
            paths.append(plots.save(fig, out_dir / f"layer{layer.index}_{name}.png"))
    paths.append(plots.save(overview_figure(image, caption, layers), out_dir / "overview.png"))
    np.savez_compressed(out_dir / "maps.npz", **arrays)
    paths.append(out_dir / "maps.npz")
    return sorted(paths)


def write_run_maps(model_dir, out_dir=None, image_index=0, image=None, checkpoint="last",
                   data_dir=None):
    """`python -m visualize.pde_maps`: the maps of a trained run for one image.

    Args:
        model_dir: a run directory (`visualize.trained_runs.TrainedRun`).
        out_dir: output directory; default `model_dir/maps/image{image_index}`
            (or `model_dir/maps/<file stem>` for `image`).
        image_index: the test image (index into the run's test split).
        image: an image file to use instead of a test image.
        checkpoint: `"last"` or `"best"`.
        data_dir: where the run's data is now, if it moved.

    Returns:
        The paths written, sorted.
    """
    run = trained_runs.TrainedRun(model_dir, checkpoint, data_dir)
    trained_runs.require_pde_layers(run.model, f"in {str(run.model_path)!r}")
    pixels, caption = run.image(image_index, image)
    if out_dir is None:
        stem = pathlib.Path(image).stem if image is not None else f"image{image_index}"
        out_dir = run.model_dir / run_directory.MAPS_DIR / stem
    return write_maps(run.model, pixels, out_dir, caption)


def check_dump_maps(config):
    """Raises the `dump_maps` ValueError when `config`'s model has no PDE layers.

    The runners call it before training, so that `--dump_maps` on such a
    model stops before anything is trained or written.
    """
    import pde_keras

    core = pde_keras.models.create(config.model, **config.model_options)
    if not inspection.pde_layers(core):
        raise validation.invalid(
            "dump_maps", f"False for model {config.model!r}, which has no PDE layers "
            "(GlobalLayer, AdvectionDiffusion)", True)


def dump_maps(model_dir, indices=DUMP_INDICES, checkpoint="last"):
    """Writes the maps of the test images `indices` to `model_dir/maps/image{i}/`.

    Called after training by the runners' `--dump_maps`. Indices beyond
    the test split are skipped.

    Returns:
        The paths written, sorted.
    """
    run = trained_runs.TrainedRun(model_dir, checkpoint)
    trained_runs.require_pde_layers(run.model, f"in {str(run.model_path)!r}")
    split = run.test_split
    paths = []
    for index in indices:
        if index < len(split.labels):
            pixels, caption = run.image(index)
            out_dir = run.model_dir / run_directory.MAPS_DIR / f"image{index}"
            paths += write_maps(run.model, pixels, out_dir, caption)
    return sorted(paths)
