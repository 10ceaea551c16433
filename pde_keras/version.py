"""The package version, read by setup.py and written into results."""

__version__ = "0.7.0"
