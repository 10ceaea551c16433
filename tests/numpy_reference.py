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


def solve(f, h0, diffusivity, velocity, steps, dt=0.2, dx=1.0, dy=1.0, boundary="periodic"):
    """H^K of eq. 2, cell by cell, in float64."""
    f = np.asarray(f, np.float64)
    full = lambda a: np.broadcast_to(np.asarray(a, np.float64), f.shape)  # noqa: E731
    d_x, d_y = map(full, diffusivity)
    u, v = map(full, velocity)
    pu, pv = pad(u, boundary), pad(v, boundary)
    _, height, width, _ = f.shape
    previous, current = f, np.asarray(h0, np.float64)
    for _ in range(steps):
        ph = pad(current, boundary)
        new = np.empty_like(current)
        for i in range(height):
            for j in range(width):
                a, b = i + 1, j + 1  # indices into the padded arrays
                u_x = (pu[:, a + 1, b] - pu[:, a - 1, b]) / (2 * dx)
                v_y = (pv[:, a, b + 1] - pv[:, a, b - 1]) / (2 * dy)
                a_x, a_y = u[:, i, j] * dt / dx, v[:, i, j] * dt / dy
                b_x, b_y = d_x[:, i, j] * dt / dx**2, d_y[:, i, j] * dt / dy**2
                rhs = ((1 - 2 * b_x - 2 * b_y) * previous[:, i, j]
                       - 2 * (u_x + v_y) * dt * current[:, i, j] + 2 * dt * f[:, i, j]
                       + (-a_x + 2 * b_x) * ph[:, a + 1, b] + (a_x + 2 * b_x) * ph[:, a - 1, b]
                       + (-a_y + 2 * b_y) * ph[:, a, b + 1] + (a_y + 2 * b_y) * ph[:, a, b - 1])
                new[:, i, j] = rhs / (1 + 2 * b_x + 2 * b_y)
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
