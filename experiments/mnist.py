"""Trains an MNIST illustrative net (conv, residual or PDE feature layer).

Example (offline: MNIST is bundled):

    python -m experiments.mnist --backbone=pde --epochs=1 --model_dir=/tmp/x

Flags: `python -m experiments.mnist --helpfull`; library:
`pde_keras.training.train_and_evaluate`.
"""

from absl import flags

from experiments import runner_flags

runner_flags.define_flags("mnist")
flags.adopt_module_key_flags(runner_flags)  # --help lists them.
main = runner_flags.main

if __name__ == "__main__":
    runner_flags.run()
