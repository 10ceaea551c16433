"""Draws the report's Figure 2: an MNIST digit and the nets' feature maps.

    python -m visualize.mnist_features \
        --model_dirs=/tmp/conv,/tmp/residual,/tmp/pde,/tmp/pde_pm --out=fig2.png

The runs are `python -m experiments.mnist --backbone=conv|residual|pde
[--diffusivity=perona_malik]`; see `visualize.feature_figures`.
"""

from absl import flags

from visualize import feature_figures, figure_flags

FLAGS = flags.FLAGS
figure_flags.define_flags("mnist_features")
flags.adopt_module_key_flags(figure_flags)  # --help lists them.


def draw():
    path = feature_figures.write_figure2(
        FLAGS.model_dirs, FLAGS.out, labels=FLAGS.labels, image_index=FLAGS.image_index,
        image=FLAGS.image, checkpoint=FLAGS.checkpoint, data_dir=FLAGS.data_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    figure_flags.run(draw)
