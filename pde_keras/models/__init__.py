"""Model families of Kag & Saligrama (CVPR 2022), built by name.

>>> import pde_keras
>>> pde_keras.models.names()
('mnist_conv', 'mnist_residual', 'mnist_pde', 'resnet32', 'resnet32_4stage', \
'resnet32_global', 'resnet56', 'resnet56_global')
>>> model = pde_keras.models.create("resnet32_global", diffusivity="perona_malik")

Each family is a module (`mnist`, `resnet`) of functional models assembled
from the named helpers in `blocks`.
"""

from pde_keras.models import blocks, mnist, resnet
from pde_keras.models.registry import create, names, options

__all__ = ["blocks", "create", "mnist", "names", "options", "resnet"]
