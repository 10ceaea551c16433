"""Draws the training curves (loss, accuracy vs epoch) of runs on one plot.

    python -m visualize.curves --model_dirs=/tmp/conv,/tmp/pde --out=curves.png

Reads each run's `log.csv`; see `visualize.evaluation_figures`.
"""

from absl import flags

from visualize import evaluation_figures, figure_flags

FLAGS = flags.FLAGS
figure_flags.define_flags("curves")
flags.adopt_module_key_flags(figure_flags)  # --help lists them.


def draw():
    print(f"wrote {evaluation_figures.write_curves(FLAGS.model_dirs, FLAGS.out, labels=FLAGS.labels)}")


if __name__ == "__main__":
    figure_flags.run(draw)
