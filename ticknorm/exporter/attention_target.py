"""Which form a decoder's attention is written in (`export --target`), and what the fused form's
ops can run: named without importing torch, for the CLI and the checks."""

import numpy as np

from ticknorm.base.graph_feeds import grouped_query_cut

PLAIN, ORT, ONNX = "plain", "ort", "onnx"
ATTENTION_TARGETS = (PLAIN, ORT, ONNX)
ATTENTION_OPSET = 23  # ONNX's Attention


def runnable_feeds(feeds: dict[str, np.ndarray], target: str) -> dict[str, np.ndarray]:
    """`feeds` as the `target` form's ops take them (`graph_feeds.grouped_query_cut` for ort's)."""
    return grouped_query_cut(feeds) if target == ORT else feeds
