"""Independent NumPy (float64) references for the tests.

Written from the equation, with explicit ghost-cell padding and loops, not
from the library's code.
"""

import numpy as np

_PAD_MODES = {"periodic": "wrap", "neumann": "edge", "dirichlet": "constant"}


def pad(field, boundary):
    """Pads the two spatial axes of an NHWC array by one ghost cell."""
    return np.pad(np.asarray(field, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)),
                  mode=_PAD_MODES[boundary])


def shift(field, axis, offset, boundary):
    """`out[i] = field[i + offset]` along spatial `axis` (1 or 2), offset +-1."""
    padded = pad(field, boundary)
    h, w = field.shape[1:3]
    if axis == 1:
        return padded[:, 1 + offset:1 + offset + h, 1:w + 1]
    return padded[:, 1:h + 1, 1 + offset:1 + offset + w]


def _ghost_index(index, size, boundary):
    """The in-range index standing for `index`, or None for a zero ghost."""
    if 0 <= index < size:
        return index
    if boundary == "periodic":
        return index % size
    if boundary == "neumann":
        return 0 if index < 0 else size - 1
    if boundary == "dirichlet":
        return None
    raise AssertionError(boundary)


def _value(field, b, i, j, c, boundary):
    """field[b, i, j, c] with ghost cells beyond the spatial edges."""
    _, height, width, _ = field.shape
    ii = _ghost_index(i, height, boundary)
    jj = _ghost_index(j, width, boundary)
    if ii is None or jj is None:
        return 0.0
    return field[b, ii, jj, c]


def solve(source, initial, diffusivity, velocity, steps, dt=0.2,
          dx=1.0, dy=1.0, boundary="periodic"):
    """Cell-by-cell float64 loop over the scheme above."""
    f = np.asarray(source, dtype=np.float64)
    shape = f.shape
    full = lambda a: np.broadcast_to(np.asarray(a, dtype=np.float64), shape)
    d_x, d_y = full(diffusivity[0]), full(diffusivity[1])
    u, v = full(velocity[0]), full(velocity[1])
    previous = f.copy()  # H^{-1}
    current = np.array(initial, dtype=np.float64)  # H^0
    for _ in range(steps):
        new = np.empty(shape, dtype=np.float64)
        for b, i, j, c in np.ndindex(*shape):
            def at(field, di, dj):
                return _value(field, b, i + di, j + dj, c, boundary)

            a_x = u[b, i, j, c] * dt / dx
            a_y = v[b, i, j, c] * dt / dy
            b_x = d_x[b, i, j, c] * dt / dx ** 2
            b_y = d_y[b, i, j, c] * dt / dy ** 2
            u_x = (at(u, 1, 0) - at(u, -1, 0)) / (2 * dx)
            v_y = (at(v, 0, 1) - at(v, 0, -1)) / (2 * dy)
            lhs = 1 + 2 * b_x + 2 * b_y
            m = 1 - 2 * b_x - 2 * b_y
            rhs = (
                m * previous[b, i, j, c]
                - 2 * (u_x + v_y) * dt * current[b, i, j, c]
                + 2 * dt * f[b, i, j, c]
                + (-a_x + 2 * b_x) * at(current, 1, 0)
                + (a_x + 2 * b_x) * at(current, -1, 0)
                + (-a_y + 2 * b_y) * at(current, 0, 1)
                + (a_y + 2 * b_y) * at(current, 0, -1)
            )
            new[b, i, j, c] = rhs / lhs
        previous, current = current, new
    return current



def correlate_same(x, kernel_fn, out_channels):
    """3x3 'same' (zero-padded) cross-correlation: kernel_fn(di, dj) -> (C_in, C_out)."""
    x = np.asarray(x, np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, out_channels))
    for di in range(3):
        for dj in range(3):
            out += padded[:, di:di + h, dj:dj + w, :] @ kernel_fn(di, dj)
    return out


def conv_same(x, kernel):
    """Full conv, kernel (3, 3, C_in, C_out)."""
    return correlate_same(x, lambda i, j: np.asarray(kernel, np.float64)[i, j], kernel.shape[-1])


def depthwise_conv_same(x, kernel):
    """Depth-wise conv, multiplier 1, kernel (3, 3, C, 1)."""
    return correlate_same(x, lambda i, j: np.diag(np.asarray(kernel, np.float64)[i, j, :, 0]),
                          kernel.shape[2])


def sobel(x, boundary):
    """(G_x, G_y): the 3x3 Sobel responses, x = height, with ghost cells."""
    p = pad(x, boundary)
    h, w = x.shape[1:3]
    window = lambda di, dj: p[:, 1 + di:1 + di + h, 1 + dj:1 + dj + w]  # noqa: E731
    g_x = sum(weight * (window(1, dj) - window(-1, dj)) for dj, weight in ((-1, 1), (0, 2), (1, 1)))
    g_y = sum(weight * (window(di, 1) - window(di, -1)) for di, weight in ((-1, 1), (0, 2), (1, 1)))
    return g_x, g_y


def batchnorm_inference(x, gamma, beta, mean, variance, epsilon):
    return (np.asarray(x, np.float64) - mean) / np.sqrt(variance + epsilon) * gamma + beta
