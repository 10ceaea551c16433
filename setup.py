"""Installs pde-keras: PDE-constrained (Global) layers for Keras 3."""

import pathlib

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent
VERSION = {}
exec((ROOT / "pde_keras" / "version.py").read_text(), VERSION)

setup(
    name="pde-keras",
    version=VERSION["__version__"],
    description=(
        "Keras 3 reproduction of 'Condensing CNNs with Partial Differential "
        "Equations' (Kag & Saligrama, CVPR 2022): the PDE Global layer, "
        "its models, runners and figures."
    ),
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pde_keras*", "experiments*", "visualize*", "benchmarks*"]),
    include_package_data=True,
    # MNIST (CC BY-SA 3.0, see pde_keras/datasets/mnist/README.md) for offline runs.
    # The fused solver kernel is compiled from this source on first use.
    package_data={"pde_keras": ["datasets/mnist/*.gz", "datasets/mnist/README.md",
                                "kernels/*.cc"]},
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.15",
        "numpy>=1.26",
        "absl-py>=2.0",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets' download path imports it but does not declare it.
        "importlib_resources>=5",
        "tensorboard>=2.16",  # keras.callbacks.TensorBoard; TensorFlow 2.21 no longer pulls it in
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "jax[cpu]>=0.4.30,<0.11"],
        "jax": ["jax[cpu]>=0.4.30,<0.11"],
    },
)
