"""Style: text features and measures, the two-sample test, the probe during training, the report."""
