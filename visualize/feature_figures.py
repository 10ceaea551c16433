"""The report's Figure 2: an MNIST digit and the illustrative nets' feature maps.

One row of panels for one image: (a) the input image, then for each run
its feature map (the output of the net's `output_relu` layer, the
representation the classifier pools), and for a PDE net also its learned
velocity map (u = v = g, from `pde_keras.AdvectionDiffusion.
coefficient_maps`). With the report's four runs (conv, residual, PDE with
D = 1, PDE with Perona-Malik D) that is its panels (a)-(g). A map with
several channels is shown as its channel mean (the title says so); each
panel has its own colour bar.
"""

from pde_keras.advection_diffusion import AdvectionDiffusion
from pde_keras import inspection
from visualize import plots, trained_runs

FEATURE_LAYER = "output_relu"
PANEL_PX = (280, 340)
_BACKBONES = {"mnist_conv": "Conv", "mnist_residual": "Residual", "mnist_pde": "PDE"}


def figure_size(panels):
    """`(width, height)` in pixels of a figure of `panels` panels."""
    return PANEL_PX[0] * panels, PANEL_PX[1]


def run_panels(run, image, label=None):
    """`[(title, (height, width, channels) array)]` of one run for `image`.

    The feature map, and for a net with an `AdvectionDiffusion` layer its
    velocity map u (= v).
    """
    try:
        (features,) = trained_runs.layer_outputs(run.model, image, [FEATURE_LAYER])
    except trained_runs.VisualizeError:
        raise trained_runs.VisualizeError(
            f"The model in {str(run.model_path)!r} ({run.model.name}) has no layer "
            f"{FEATURE_LAYER!r}: expected an MNIST illustrative net (mnist_conv, "
            "mnist_residual, mnist_pde).") from None
    name = label or _BACKBONES.get(run.saved_config.get("model"), run.model.name)
    pde = [layer for layer in inspection.pde_layers(run.model) if isinstance(layer, AdvectionDiffusion)]
    if not pde:
        return [(f"{name} feature map", features)]
    detail = "" if label else f"\n{_diffusivity(pde[0])}"
    velocity = next(maps.maps["u"] for maps in trained_runs.layer_maps(run.model, image)
                    if maps.name == pde[0].name)
    return [(f"{name} feature map{detail}", features),
            (f"{name} velocity map (u = v){detail}", velocity)]


def figure2(image, caption, panels):
    """The panel row: the image, then each `(title, array)` of `panels`."""
    fig = plots.figure(*figure_size(1 + len(panels)))
    axes = fig.subplots(1, 1 + len(panels), squeeze=False)[0]
    plots.show_image(axes[0], image, f"(a) input image\n{caption}")
    for position, (ax, (title, values)) in enumerate(zip(axes[1:], panels), start=1):
        channels = values.shape[-1]
        summary = "" if channels == 1 else f"\n(mean of {channels} channels)"
        plots.MapPanel(fig, ax, values.mean(axis=-1),
                       f"({chr(ord('a') + position)}) {title}{summary}")
    fig.subplots_adjust(left=0.01, right=0.97, bottom=0.03, top=0.76, wspace=0.3)
    return fig


def write_figure2(model_dirs, out, labels=None, image_index=0, image=None,
                  checkpoint="last", data_dir=None):
    """`python -m visualize.mnist_features`: writes Figure 2 for one digit to `out`.

    Args:
        model_dirs: run directories, e.g. conv, residual, PDE (D = 1) and
            PDE (Perona-Malik) runs of `python -m experiments.mnist`.
        out: the PNG to write.
        labels: optional names of the runs (default: from each model).
        image_index: the test image, an index into the first run's test split.
        image: an image file to use instead.
        checkpoint: `"last"` or `"best"`.
        data_dir: where the runs' data is now, if it moved.

    Returns:
        The path written.
    """
    trained_runs.check_model_dirs(model_dirs, labels)
    loaded = [trained_runs.TrainedRun(model_dir, checkpoint, data_dir) for model_dir in model_dirs]
    shapes = {run.image_shape for run in loaded}
    if len(shapes) > 1:
        raise trained_runs.VisualizeError(
            "The models take images of different shapes "
            f"({', '.join(str(shape) for shape in sorted(shapes))}): expected runs on one "
            "dataset.")
    pixels, caption = loaded[0].image(image_index, image)
    panels = []
    for position, run in enumerate(loaded):
        panels += run_panels(run, pixels, labels[position] if labels else None)
    return plots.save(figure2(pixels, caption, panels), out)


def _diffusivity(layer):
    if layer.diffusivity == "perona_malik":
        return f"Perona-Malik D (lambda = {layer.perona_malik_lambda:g})"
    return f"D = {layer.diffusivity_constant:g}"
