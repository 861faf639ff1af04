"""ticknorm: export a fine-tuned PyTorch model to ONNX with every LayerNorm fused, and prove it is
still the same model. `import ticknorm` needs only numpy and onnx; torch and the runtimes are
imported where used."""

__version__ = "0.1.0"

from ticknorm.base.errors import TicknormError  # noqa: E402

__all__ = ["TicknormError", "__version__"]
