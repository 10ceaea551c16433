"""The model variants of the paper's and the report's tables, and their published figures.

One place for both `python -m experiments.summary` (parameters and MACs)
and `python -m experiments.sweep` (the training sweeps of Table 1, MNIST,
and Table 2, CIFAR-10).

Published figures: "paper" is Kag & Saligrama (CVPR 2022, its poster),
"report" the TensorFlow reproduction report (its Table 1 and Table 2).
`paper` / `report` give "params" or "params / MACs"; `paper_accuracy` /
`report_accuracy` the test accuracy in percent (None: not published).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Row:
    """One model variant: a `create(name, **options)` call and its references.

    Attributes:
        name: a `pde_keras.models.names()` entry.
        variant: a short description.
        options: keyword options of `pde_keras.models.create`.
        paper, report: the published "params" or "params / MACs".
        slug: the variant's directory name in a sweep (`--rows`).
        paper_accuracy, report_accuracy: published test accuracy (%).
    """

    name: str
    variant: str
    options: dict = dataclasses.field(default_factory=dict)
    paper: str = ""
    report: str = ""
    slug: str = ""
    paper_accuracy: float | None = None
    report_accuracy: float | None = None

    @property
    def family(self):
        return "mnist" if self.name.startswith("mnist") else "cifar"


_PM = {"diffusivity": "perona_malik"}
ROWS = (
    # The paper quotes 524 parameters for all three MNIST nets (1 channel;
    # "Global" is its PDE net with D = 1); the report (its Table 1) 526 / 530
    # and, with 8 channels, 4,614 / 4,646.
    Row("mnist_conv", "channels=1", {"channels": 1}, "524", "526", "conv-c1", 92.01, 64.59),
    Row("mnist_residual", "channels=1", {"channels": 1}, "524", "530", "residual-c1", 92.53,
        66.04),
    Row("mnist_pde", "channels=1, D = 1", {"channels": 1}, "524", "530", "pde-c1", 95.03, 65.31),
    Row("mnist_pde", "channels=1, Perona-Malik D", {"channels": 1, **_PM}, "", "530",
        "pde-pm-c1", None, 66.24),
    Row("mnist_conv", "channels=8", {"channels": 8}, "", "4,614", "conv-c8", None, 93.02),
    Row("mnist_residual", "channels=8", {"channels": 8}, "", "4,646", "residual-c8", None, 95.58),
    Row("mnist_pde", "channels=8, D = 1", {"channels": 8}, "", "4,646", "pde-c8", None, 95.8),
    Row("mnist_pde", "channels=8, Perona-Malik D", {"channels": 8, **_PM}, "", "4,646",
        "pde-pm-c8", None, 95.2),
    # The paper's ResNet-32 (3 stages) reaches 92.49%, its ResNet-Global 91.93%.
    Row("resnet32", "authors' baseline, 3 stages", {}, "460K / 70M", "", "resnet32-3stage",
        92.49),
    Row("resnet32_4stage", "report's baseline, 4 stages", {}, "", "844K / 75M", "resnet32",
        None, 93.92),
    Row("resnet56", "3 stages of 9 blocks", {}, slug="resnet56"),
    # The report's Table 2 (ResNet32-Global ablations).
    Row("resnet32_global", "depth-wise v and D", {}, "162K / 15M", "163K / 16M", "global",
        91.93, 91.27),
    Row("resnet32_global", "identity v, constant D = 1",
        {"velocity": "identity", "diffusivity": "constant"}, "", "158K / 14M",
        "global-identity-constant", None, 90.03),
    Row("resnet32_global", "residual-block v and D",
        {"velocity": "residual", "diffusivity": "residual"}, "", "550K / 72M",
        "global-residual-vd", None, 92.73),
    Row("resnet32_global", "Perona-Malik D", _PM, "", "160K / 16M", "global-perona-malik",
        None, 89.79),
    Row("resnet32_global", "residual-block init", {"init": "residual"}, "", "261K / 30M",
        "global-residual-init", None, 92.18),
    Row("resnet32_global", "v = 0 (diffusion)", {"velocity": "zero"}, slug="global-v0",
        report_accuracy=90.06),
    Row("resnet32_global", "D = 0 (advection)", {"diffusivity": "zero"}, slug="global-d0",
        report_accuracy=90.21),
    Row("resnet56_global", "depth-wise v and D, 2 blocks per stage", {},
        slug="resnet56-global"),
)


def _row(slug):
    return next(row for row in ROWS if row.slug == slug)


# The same-budget CIFAR-10 comparison (a short schedule on the full training
# set, not a reproduction): the authors' baseline against ResNet32-Global
# with the package defaults, the headline Perona-Malik command and the
# authors' CIFAR setting K = 1. Published accuracies are converged ones.
BUDGET_ROWS = (
    dataclasses.replace(_row("resnet32-3stage"), slug="resnet32"),
    _row("global"),
    _row("global-perona-malik"),
    Row("resnet32_global", "K = 1 (the authors' CIFAR setting)", {"steps": 1},
        slug="global-k1"),
)

# The sweeps' tables: Table 1 of the report (MNIST, 8 rows), its Table 2
# (CIFAR-10: the 4-stage ResNet32 and the seven ResNet32-Global variants) and
# the same-budget CIFAR-10 comparison.
TABLES = {
    "mnist": tuple(row for row in ROWS if row.family == "mnist"),
    "cifar": tuple(row for row in ROWS if row.name in ("resnet32_4stage", "resnet32_global")),
    "cifar-budget": BUDGET_ROWS,
}


def measure(row, **overrides):
    """Builds `row`'s model (`overrides`: more `create` options).

    Returns (trainable params, all params, `pde_keras.count_macs` mapping).
    """
    import pde_keras  # imported late: flags parse before TensorFlow loads
    from pde_keras import inspection

    model = pde_keras.models.create(row.name, **{**row.options, **overrides})
    return inspection.trainable_params(model), model.count_params(), pde_keras.count_macs(model)


def format_macs(macs):
    """`14779008` -> `'14.78M'`, `14602` -> `'14.6K'`."""
    if macs >= 1e6:
        return f"{macs / 1e6:.2f}M"
    return f"{macs / 1e3:.1f}K"
