"""Runners: one interface over PyTorch eager, ONNX Runtime and TensorRT."""
