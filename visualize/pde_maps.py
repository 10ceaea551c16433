"""Draws the PDE layers' coefficient maps of a trained run for one image.

    python -m visualize.pde_maps --model_dir=/tmp/cifar --image_index=0
    python -m visualize.pde_maps --model_dir=/tmp/cifar --image=cat.png --out_dir=/tmp/maps

Writes `layer{i}_{Dx,Dy,u,v,ux,vy,input,output}.png` for every Global layer
(and the MNIST net's AdvectionDiffusion layer), `overview.png` and
`maps.npz`; see `visualize.map_figures`.
"""

from absl import flags

from visualize import figure_flags, map_figures

FLAGS = flags.FLAGS
figure_flags.define_flags("pde_maps")
flags.adopt_module_key_flags(figure_flags)  # --help lists them.


def draw():
    paths = map_figures.write_run_maps(
        FLAGS.model_dir, out_dir=FLAGS.out_dir, image_index=FLAGS.image_index,
        image=FLAGS.image, checkpoint=FLAGS.checkpoint, data_dir=FLAGS.data_dir)
    print(f"wrote {len(paths)} files to {paths[0].parent} (overview: "
          f"{paths[0].parent / 'overview.png'})")


if __name__ == "__main__":
    figure_flags.run(draw)
