"""Command-line runners (absl flags) for training and reproduction."""
