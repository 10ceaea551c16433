"""pde-keras: PDE-constrained CNN layers for Keras 3.

Reproduces Kag & Saligrama, "Condensing CNNs with Partial Differential
Equations" (CVPR 2022).
"""

from pde_keras import models
from pde_keras.advection_diffusion import AdvectionDiffusion
from pde_keras.global_layer import GlobalLayer
from pde_keras.macs import count_macs
from pde_keras.residual_block import BasicResidualBlock
from pde_keras.solver import solve_advection_diffusion
from pde_keras.version import __version__

__all__ = [
    "AdvectionDiffusion",
    "BasicResidualBlock",
    "GlobalLayer",
    "count_macs",
    "models",
    "solve_advection_diffusion",
    "__version__",
]
