"""Accuracy against the PyTorch graph: per output, per layer, and over time (drift)."""
