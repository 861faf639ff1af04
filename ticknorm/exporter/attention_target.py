"""Which form a decoder's attention is written in (`export --target`), and what the fused form's
ops can run: named without importing torch, for the CLI and the checks."""

import numpy as np

from ticknorm.base.graph_feeds import grouped_query_cut

PLAIN, ORT, ONNX, TRT = "plain", "ort", "onnx", "trt"
ATTENTION_TARGETS = (PLAIN, ORT, ONNX, TRT)
FUSED = (ORT, ONNX)  # the targets whose attention is written as one op; TensorRT fuses the plain form itself
TRT_NOTE = ("--target trt: the attention as the exporter writes it, which TensorRT fuses itself (its ONNX parser "
            "takes no com.microsoft op; ONNX's opset-23 Attention is not checked on TensorRT here)")
ATTENTION_OPSET = 23  # ONNX's Attention


def runnable_feeds(feeds: dict[str, np.ndarray], target: str) -> dict[str, np.ndarray]:
    """`feeds` as the `target` form's ops take them (`graph_feeds.grouped_query_cut` for ort's)."""
    return grouped_query_cut(feeds) if target == ORT else feeds
