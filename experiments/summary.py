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

from absl import app, flags

# Row, measure: part of this module's API.
from experiments.tables import ROWS, Row, format_macs, measure  # noqa: F401

FAMILIES = ("mnist", "cifar")

_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print a markdown table (for the README).")
_FAMILY = flags.DEFINE_multi_enum("family", list(FAMILIES), list(FAMILIES),
                                  "Model families to list (repeat the flag for several).")


HEADER = ("model", "variant", "params", "all params", "MACs paper", "MACs total", "paper",
          "report")


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
