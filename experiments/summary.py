r"""Prints every model's trainable parameters and MACs beside the published figures.

    python -m experiments.summary                 # aligned text
    python -m experiments.summary --markdown      # the README's table
    python -m experiments.summary --family=cifar  # only the CIFAR models

"params" are the trainable parameters, "all params" add the batch
normalisations' moving statistics (Keras' `count_params()`, which is what
the report's figures count). MACs are per image: "paper" counts conv + depth-wise conv + dense layers
(what the authors' thop counter saw), "total" adds the PDE arithmetic,
batch normalisations, additions and pooling (`pde_keras.count_macs`).
The published columns give the paper's figures (its poster) and the
report's Table 1 / Table 2 as "params / MACs".
"""

import dataclasses
import math

from absl import app, flags

FAMILIES = ("mnist", "cifar")

_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print a markdown table (for the README).")
_FAMILY = flags.DEFINE_multi_enum("family", list(FAMILIES), list(FAMILIES),
                                  "Model families to list (repeat the flag for several).")


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a `create(name, **options)` call and its references."""

    name: str
    variant: str
    options: dict = dataclasses.field(default_factory=dict)
    paper: str = ""
    report: str = ""

    @property
    def family(self):
        return "mnist" if self.name.startswith("mnist") else "cifar"


ROWS = (
    # The paper quotes 524 parameters for all three MNIST nets; the report
    # (its Table 1) 526 / 530 and, with 8 channels, 4,614 / 4,646.
    Row("mnist_conv", "channels=1", {"channels": 1}, "524", "526"),
    Row("mnist_residual", "channels=1", {"channels": 1}, "524", "530"),
    Row("mnist_pde", "channels=1, D = 1", {"channels": 1}, "524", "530"),
    Row("mnist_pde", "channels=1, Perona-Malik D", {"channels": 1, "diffusivity": "perona_malik"},
        "", "530"),
    Row("mnist_conv", "channels=8", {"channels": 8}, "", "4,614"),
    Row("mnist_residual", "channels=8", {"channels": 8}, "", "4,646"),
    Row("mnist_pde", "channels=8, D = 1", {"channels": 8}, "", "4,646"),
    Row("mnist_pde", "channels=8, Perona-Malik D", {"channels": 8, "diffusivity": "perona_malik"},
        "", "4,646"),
    Row("resnet32", "authors' baseline, 3 stages", {}, "460K / 70M"),
    Row("resnet32_4stage", "report's baseline, 4 stages", {}, "", "844K / 75M"),
    Row("resnet56", "3 stages of 9 blocks", {}),
    # The report's Table 2 (ResNet32-Global ablations).
    Row("resnet32_global", "depth-wise v and D", {}, "162K / 15M", "163K / 16M"),
    Row("resnet32_global", "identity v, constant D = 1",
        {"velocity": "identity", "diffusivity": "constant"}, "", "158K / 14M"),
    Row("resnet32_global", "residual-block v and D",
        {"velocity": "residual", "diffusivity": "residual"}, "", "550K / 72M"),
    Row("resnet32_global", "Perona-Malik D", {"diffusivity": "perona_malik"}, "", "160K / 16M"),
    Row("resnet32_global", "residual-block init", {"init": "residual"}, "", "261K / 30M"),
    Row("resnet32_global", "v = 0 (diffusion)", {"velocity": "zero"}),
    Row("resnet32_global", "D = 0 (advection)", {"diffusivity": "zero"}),
    Row("resnet56_global", "depth-wise v and D, 2 blocks per stage", {}),
)

HEADER = ("model", "variant", "params", "all params", "MACs paper", "MACs total", "paper",
          "report")


def measure(row):
    """Builds `row`'s model; returns (trainable params, all params, count_macs mapping)."""
    import pde_keras  # imported late: flags parse before TensorFlow loads

    model = pde_keras.models.create(row.name, **row.options)
    params = sum(math.prod(weight.shape) for weight in model.trainable_weights)
    return params, model.count_params(), pde_keras.count_macs(model)


def format_macs(macs):
    """`14779008` -> `'14.78M'`, `14602` -> `'14.6K'`."""
    if macs >= 1e6:
        return f"{macs / 1e6:.2f}M"
    return f"{macs / 1e3:.1f}K"


def table(rows):
    """The table's cells, header first, one tuple of strings per row."""
    cells = [HEADER]
    for row in rows:
        params, all_params, macs = measure(row)
        cells.append((row.name, row.variant, f"{params:,}", f"{all_params:,}",
                      format_macs(macs["paper"]),
                      format_macs(macs["total"]), row.paper or "-", row.report or "-"))
    return cells


def render(cells, markdown=False):
    """Aligned text, or a markdown table, of `cells` (header first)."""
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |",
                 "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cells[0]))) + "|"]
        lines += ["| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(line)) + " |"
                  for line in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(line, widths))).rstrip()
        for line in cells)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    rows = [row for row in ROWS if row.family in _FAMILY.value]
    print(render(table(rows), markdown=_MARKDOWN.value))


if __name__ == "__main__":
    app.run(main)
