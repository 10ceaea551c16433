"""What the package's commands share: absl flag parsing and one-line errors.

The training runners (`experiments`), the figure commands (`visualize`)
and the export command parse their flags with `parse_flags` (a bad flag
ends the program with one line `error: ...` on stderr and exit status 1)
and run their `main` with `run`; `run_reporting_errors` also turns every
`ValueError` of the work into one such line.
"""

import sys

from absl import app, flags


def parse_flags(argv):
    """absl flag parsing that reports a bad flag on one line of stderr."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {str(error).splitlines()[0]} (see --helpfull)")
    if len(rest) > 1:
        sys.exit(f"error: unexpected arguments: {' '.join(rest[1:])}")
    return rest


def run(main):
    """`absl.app.run(main)` with one-line flag errors."""
    app.run(main, flags_parser=parse_flags)


def run_reporting_errors(work):
    """Runs `work()` (it reads the flags) as the program: a `ValueError` it
    raises ends the program with one line `error: ...` and exit status 1."""

    def main(argv):
        del argv  # Checked by parse_flags.
        try:
            work()
        except ValueError as error:
            sys.exit(f"error: {error}")

    run(main)


def define_run_dir_flag(help_text):
    """Defines the required flag `--model_dir` (a run directory, not empty)."""
    flags.DEFINE_string("model_dir", None, help_text, required=True)
    flags.register_validator(
        "model_dir", lambda value: value is None or bool(value.strip()),
        "--model_dir must not be empty")
