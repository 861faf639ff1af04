"""Tick-based per-layer latency on every runtime, every row mapped back to a PyTorch module."""
