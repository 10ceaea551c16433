"""Speed benchmarks: `python -m benchmarks.<name>`; they print medians and ratios."""
