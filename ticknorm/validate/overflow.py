"""Which LayerNorms overflow in fp16, found from the fp32 reference run.

fp16 holds magnitudes up to 65504. A LayerNorm breaks in fp16 when its input is larger than that,
or when the squares it sums are: |x| > 256 already gives x^2 > 65504, so a kernel that
accumulates E[x^2] or (x - mean)^2 in fp16 returns inf or NaN although the input fits. Those
modules are listed, and their node names handed to TensorRT to keep in fp32 (or to the plugin).
It reads fused LayerNormalization/RMSNormalization nodes: run `fuse` first on a graph that still
holds decomposed ones.
"""

from dataclasses import dataclass

import numpy as np
import onnx

from ticknorm.base.precision import Fp32Island, Precision
from ticknorm.base.scopes import get_scope
from ticknorm.runtime.ort_runner import OrtRunner

FP16_MAX = 65504.0
NORM_OPS = ("LayerNormalization", "RMSNormalization")


@dataclass
class OverflowRow:
    module: str
    node: str
    input_absmax: float
    square_mean_max: float  # largest mean of x^2 over a normalized row
    variance_max: float

    @property
    def reason(self) -> str:
        if self.input_absmax > FP16_MAX:
            return f"input reaches {self.input_absmax:.4g} > fp16 max"
        if self.variance_max > FP16_MAX:
            return f"variance reaches {self.variance_max:.4g} > fp16 max"
        return f"mean of squares reaches {self.square_mean_max:.4g} > fp16 max"


def fp16_overflows(model: onnx.ModelProto, feeds: dict) -> list[OverflowRow]:
    norms = [node for node in model.graph.node if node.op_type in NORM_OPS]
    if not norms:
        return []
    inputs = list(dict.fromkeys(node.input[0] for node in norms))
    with OrtRunner(model, optimization="disabled", extra_outputs=inputs) as runner:
        tapped = runner.infer(feeds).outputs
    rows = []
    for node in norms:
        x = tapped[node.input[0]].astype(np.float64)
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        axes = tuple(range(axis % x.ndim, x.ndim))
        square_mean = (x * x).mean(axis=axes)
        variance = x.var(axis=axes)
        row = OverflowRow(get_scope(node) or "", node.name, float(np.abs(x).max()), float(square_mean.max()),
                          float(variance.max()))
        if max(row.input_absmax, row.square_mean_max, row.variance_max) > FP16_MAX:
            rows.append(row)
    return rows


def fp16_precision(model: onnx.ModelProto, feeds: dict) -> Precision:
    """The policy of every fp16 target: each norm the fp32 run shows overflowing stays in fp32."""
    return Precision(tuple(Fp32Island(row.module, row.node, row.reason) for row in fp16_overflows(model, feeds)))
