"""ticknorm's LayerNorm fusion against ONNX Runtime's own, on every spelling in the test suite.

For each module (true LayerNorms and look-alikes) and each torch exporter: how many LayerNorms
ORT's graph optimizer (ORT_ENABLE_ALL) and onnxruntime.transformers' optimizer fuse, how many
ticknorm fuses, and whether anyone's output moved away from PyTorch (a wrong fusion).

    python benchmarks/ort_fusion_anchor.py
"""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import _models  # noqa: F401 - puts tests/ (norm_modules) on the path
import norm_modules as nm
from ticknorm.exporter.export import torch_to_onnx
from ticknorm.exporter.fusion import fuse_norms

NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization")
CASES = [  # (name, module factory, input shape, LayerNorms a correct fuser fuses)
    ("pow-sqrt-div", nm.PowSqrtDiv, (2, 6, 16), 1),
    ("mul-rsqrt", nm.MulRsqrt, (2, 6, 16), 1),
    ("var_mean", nm.VarMean, (2, 6, 16), 1),
    ("reciprocal", nm.ReciprocalSqrt, (2, 6, 16), 1),
    ("two-axes", nm.TwoTrailingAxes, (2, 3, 4, 16), 1),
    ("channels-first", nm.ChannelsFirst, (2, 8, 5, 5), 1),
    ("no-affine", lambda: nm.PowSqrtDiv(scale=False, bias=False), (2, 6, 16), 1),
    ("axes-differ", nm.AxesDiffer, (2, 6, 6), 0),
    ("eps-outside-sqrt", nm.EpsOutsideSqrt, (2, 6, 6), 0),
    ("unbiased-var", nm.UnbiasedVariance, (2, 6, 6), 0),
    ("centered-returned", nm.CenteredAlsoReturned, (2, 6, 6), 0),
    ("centered-reused", nm.CenteredReusedInside, (2, 6, 6), 0),
]


def ort_optimized(model: onnx.ModelProto, workdir: Path) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(workdir / "ort.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def transformers_optimized(model: onnx.ModelProto, workdir: Path) -> onnx.ModelProto | str:
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        return "not installed"
    path = workdir / "in.onnx"
    onnx.save(model, str(path))
    try:
        return optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).model
    except Exception as exc:  # noqa: BLE001 - report what the tool does, including failing
        return f"raised {type(exc).__name__}"


def outcome(model: onnx.ModelProto | str, feeds: dict, expected: list) -> str:
    if isinstance(model, str):
        return model
    fused = sum(n.op_type in NORM_OPS for n in model.graph.node)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    actual = session.run(None, feeds)
    wrong = any(not np.allclose(a, e, atol=1e-4, rtol=1e-3) for a, e in zip(actual, expected))
    return f"{fused}{' WRONG' if wrong else ''}"


def main():
    rng = np.random.default_rng(0)
    print(f"ONNX Runtime {ort.__version__}; cells: LayerNorm ops after fusion (WRONG: output moved away from PyTorch)")
    print(f"{'case':<18} {'exporter':<12} {'correct':>7} {'ORT opt':>9} {'ORT transformers':>22} {'ticknorm':>9}")
    for name, make, shape, correct in CASES:
        torch.manual_seed(0)
        module = make().eval()
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        with torch.no_grad():
            out = module(torch.from_numpy(feeds["x"]))
        expected = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
        for exporter in ("dynamo", "torchscript"):
            exported = torch_to_onnx(module, feeds, exporter)
            with tempfile.TemporaryDirectory() as workdir:
                cells = [outcome(ort_optimized(exported, Path(workdir)), feeds, expected),
                         outcome(transformers_optimized(exported, Path(workdir)), feeds, expected),
                         outcome(fuse_norms(exported, feeds=feeds).model, feeds, expected)]
            print(f"{name:<18} {exporter:<12} {correct:>7} {cells[0]:>9} {cells[1]:>22} {cells[2]:>9}")


if __name__ == "__main__":
    main()
