"""Draws the confusion matrices of trained runs and counts the 3<->5 confusion.

    python -m visualize.confusion --model_dirs=/tmp/conv,/tmp/residual,/tmp/pde \
        --out=confusion.png

Writes the PNG (one matrix per run) and the same name with `.json`, and
prints one line per run; see `visualize.evaluation_figures`.
"""

from absl import flags

from visualize import evaluation_figures, figure_flags

FLAGS = flags.FLAGS
figure_flags.define_flags("confusion")
flags.adopt_module_key_flags(figure_flags)  # --help lists them.


def draw():
    png, report, lines = evaluation_figures.write_confusion(
        FLAGS.model_dirs, FLAGS.out, labels=FLAGS.labels, pair=FLAGS.pair,
        checkpoint=FLAGS.checkpoint, data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size)
    print("\n".join(lines))
    print(f"wrote {png} and {report}")


if __name__ == "__main__":
    figure_flags.run(draw)
