"""Which form a decoder's attention is written in (`export --target`), and what the fused form's
ops can run: named without importing torch, for the CLI and the checks."""

import numpy as np

from ticknorm.exporter.tasks import PAST_INPUT

PLAIN, ORT, ONNX = "plain", "ort", "onnx"
ATTENTION_TARGETS = (PLAIN, ORT, ONNX)
ATTENTION_OPSET = 23  # ONNX's Attention


def runnable_feeds(feeds: dict[str, np.ndarray], target: str) -> dict[str, np.ndarray]:
    """`feeds` as the `target` form's ops take them. ONNX Runtime's GroupQueryAttention (CPU)
    continues a prompt on a cache at batch 1 only: such feeds keep their first row, which checks
    the same graph (its batch axis stays dynamic; a prompt on an empty cache and every decode step
    run at any batch)."""
    ids = feeds.get("input_ids")
    past = [value for name, value in feeds.items() if PAST_INPUT.fullmatch(name)]
    chunked = ids is not None and ids.ndim == 2 and ids.shape[1] > 1 and any(p.shape[2] for p in past)
    if target != ORT or not chunked or ids is None or ids.shape[0] == 1:
        return feeds
    return {name: value[:1] for name, value in feeds.items()}
