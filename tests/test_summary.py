"""Tests of `python -m experiments.summary` (the README's model table)."""

import re

import pytest
from absl import flags

import architectures as arch
from experiments import summary

pytestmark = pytest.mark.multibackend


@pytest.fixture
def parsed_flags():
    def parse(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["summary", *argv])

    yield parse
    flags.FLAGS.unparse_flags()


def test_rows_cover_table2():
    global_rows = [row.options for row in summary.ROWS if row.name == "resnet32_global"]
    assert global_rows == list(arch.TABLE2_VARIANTS.values())


def test_markdown_mnist(parsed_flags, capsys):
    parsed_flags("--markdown", "--family=mnist")
    summary.main(["summary"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| model | variant | params | all params | MACs paper | MACs total | paper "
                        "| report |")
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|---:|"
    assert len(lines) == 2 + 8
    # The report counts the batch norms' moving statistics too: 526 = 522 + 2 x 2.
    assert lines[2] == "| `mnist_conv` | channels=1 | 522 | 526 | 14.6K | 17.0K | 524 | 526 |"
    assert re.fullmatch(r"\| `mnist_pde` \| channels=8, Perona-Malik D \| 4,612 \| 4,646 \| "
                        r"512\.0K \| [0-9.]+K \| - \| 4,646 \|", lines[-1])


def test_text_table_lines_up():
    cells = [summary.HEADER,
             ("resnet32", "x", "466,906", "469,370", "69.12M", "69.59M", "460K / 70M", "-")]
    lines = summary.render(cells).splitlines()
    assert lines[1].startswith("resnet32  x        466,906")
    assert lines[0].index("params") + len("params") == lines[1].index("466,906") + len("466,906")


@pytest.mark.parametrize("macs, text", [(14_779_008, "14.78M"), (14_602, "14.6K"),
                                        (69_124_736, "69.12M")])
def test_format_macs(macs, text):
    assert summary.format_macs(macs) == text


def test_unexpected_arguments(parsed_flags):
    parsed_flags()
    with pytest.raises(summary.app.UsageError, match="Unexpected arguments: extra"):
        summary.main(["summary", "extra"])
