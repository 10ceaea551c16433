"""Drawing helpers shared by the figures (matplotlib, no display needed).

Figures are `matplotlib.figure.Figure` objects saved with the Agg canvas:
no pyplot, no GUI backend, no global figure state. Every figure has a fixed
size in pixels (`figure(width_px, height_px)`), so a given command always
writes PNGs of the same size.

Colours: a map with both signs (e.g. u_x, v_y) uses the diverging `RdBu_r`
map centred at 0; a map of one sign (the ReLU'd D_x, D_y, u, v) uses
`viridis` from its minimum to its maximum. Gaps between the tiles of a
channel grid are grey (`GAP_COLOUR`, in neither colour map).
"""

import math
import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mpl_toolkits.axes_grid1 import make_axes_locatable

DPI = 100
SIGNED_CMAP = "RdBu_r"
UNSIGNED_CMAP = "viridis"
GAP_COLOUR = "#8c8c8c"


def figure(width_px, height_px):
    """A blank figure of `width_px` x `height_px` pixels (at `DPI`)."""
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path):
    """Writes `fig` as a PNG to `path` (parents created); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp or version in the file: the same figure gives the same bytes.
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def show_image(ax, pixels, title=None):
    """Draws uint8 pixels `(height, width, channels)`: grey for 1 channel, else RGB."""
    pixels = np.asarray(pixels)
    if pixels.shape[-1] == 1:
        ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(pixels, interpolation="nearest")
    _plain(ax, title)


def colour_scale(values):
    """`(cmap, vmin, vmax)` for an array: diverging and symmetric when it has both signs."""
    finite = np.asarray(values)[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if low < 0 < high:
        bound = max(-low, high)
        return SIGNED_CMAP, -bound, bound
    return UNSIGNED_CMAP, low, high


class MapPanel:
    """An axes that shows a 2D map with its colour scale and a colour bar.

    `update` draws new values into the same axes, which is much faster
    than a new figure (matplotlib spends most of its time making axes).

    Args:
        fig: the figure of `ax`.
        ax: the axes to draw into.
        values: the 2D array (NaN shows as `GAP_COLOUR`).
        title: the axes title.
        colorbar: draw a colour bar beside the axes.
    """

    def __init__(self, fig, ax, values, title=None, colorbar=True):
        self.ax = ax
        self.image = ax.imshow(values, interpolation="nearest")
        self.bar = None
        if colorbar:  # An axes as tall as the map's, to its right.
            bar_axes = make_axes_locatable(ax).append_axes("right", size="5%", pad=0.05)
            self.bar = fig.colorbar(self.image, cax=bar_axes)
            self.bar.ax.tick_params(labelsize=7)
        _plain(ax, None)
        self.update(values, title)

    def update(self, values, title=None):
        """Shows `values` (same shape) with their own colour scale and `title`."""
        cmap, vmin, vmax = colour_scale(values)
        self.image.set_data(values)
        self.image.set_cmap(_cmap(cmap))
        self.image.set_clim(vmin, vmax)
        if self.bar is not None:
            self.bar.update_normal(self.image)
        if title:
            self.ax.set_title(title, fontsize=9)


def grid_shape(channels):
    """`(rows, columns)` of a channel grid: columns the power of two nearest sqrt(C).

    1 -> (1, 1), 2 -> (1, 2), 8 -> (2, 4), 16 -> (4, 4), 32 -> (4, 8),
    64 -> (8, 8).
    """
    columns = 2 ** math.ceil(math.log2(math.sqrt(channels))) if channels > 1 else 1
    columns = min(columns, channels)
    return math.ceil(channels / columns), columns


def mosaic(values, gap=1):
    """Tiles the channels of `(height, width, channels)` into one 2D array.

    Channel c sits at row c // columns, column c % columns of `grid_shape`;
    tiles are separated by `gap` NaN pixels (drawn in `GAP_COLOUR`).
    """
    height, width, channels = values.shape
    rows, columns = grid_shape(channels)
    tiled = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap), np.nan,
                    dtype=np.float32)
    for channel in range(channels):
        top = (channel // columns) * (height + gap)
        left = (channel % columns) * (width + gap)
        tiled[top:top + height, left:left + width] = values[..., channel]
    return tiled


def describe_range(values):
    """`"min -0.31, max 1.2"`, or `"constant 1"` for a constant array."""
    low, high = float(np.min(values)), float(np.max(values))
    if low == high:
        return f"constant {low:.4g}"
    return f"min {low:.3g}, max {high:.3g}"


def _cmap(name):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=GAP_COLOUR)


def _plain(ax, title):
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
