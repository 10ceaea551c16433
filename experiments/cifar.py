"""Trains a CIFAR-10/100 ResNet or ResNet-Global.

Example:

    python -m experiments.cifar --diffusivity=perona_malik --model_dir=/tmp/y

CIFAR comes from tensorflow-datasets by default, or from `--data_dir`
(python batches, or a train/<class>/*.jpg + test/<class>/*.jpg tree).
Flags: `python -m experiments.cifar --helpfull`; library:
`pde_keras.training.train_and_evaluate`.
"""

from absl import flags

from experiments import runner_flags

runner_flags.define_flags("cifar")
flags.adopt_module_key_flags(runner_flags)  # --help lists them.
main = runner_flags.main

if __name__ == "__main__":
    runner_flags.run()
