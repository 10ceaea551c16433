"""Figure commands: coefficient maps, feature maps, confusion matrices, curves."""
