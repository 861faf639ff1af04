"""Every TensorRT name ticknorm uses exists in TensorRT 11, so a name 11 removed (BuilderFlag.FP16,
OBEY_PRECISION_CONSTRAINTS, ILayer.precision, set_output_type, ...) cannot come back unnoticed.

tests/tensorrt_11_names.txt lists the public names of NVIDIA's tensorrt-cu12-bindings 11.4.0.106
(how they were read is in its header). TensorRT cannot be imported on this project's machines,
so the code is read, not run: attributes of `trt`/`tensorrt`/`trtp` and of the variables that hold
TensorRT objects by the names the code gives them."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = {line.strip() for line in (ROOT / "tests" / "tensorrt_11_names.txt").read_text().splitlines()
         if line.strip() and not line.startswith("#")}
# What each variable holds in ticknorm's TensorRT code ('' for the module itself).
HOLDERS = {"trt": "", "tensorrt": "", "_trt": "", "trtp": "plugin.", "builder": "Builder.",
           "network": "INetworkDefinition.", "config": "IBuilderConfig.", "parser": "OnnxParser.",
           "shapes": "IOptimizationProfile.", "engine": "ICudaEngine.", "_engine": "ICudaEngine.",
           "context": "IExecutionContext.", "layer": "ILayer.", "tensor": "ITensor."}
REMOVED_IN_11 = ("BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "ILayer.precision",
                 "ILayer.set_output_type")


def _chain(node: ast.Attribute) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None  # an attribute of a call's result: its type is not known from the text
    return [node.id, *reversed(parts)]


def tensorrt_names(source: str) -> set[str]:
    """`Class.attr` (or a module-level name) for every use of a TensorRT object in `source`: the
    whole chain after the last TensorRT holder (`trt.Logger.WARNING` -> `Logger.WARNING`)."""
    tree = ast.parse(source)
    inner = {id(child) for node in ast.walk(tree) if isinstance(node, ast.Attribute) for child in [node.value]}
    used = set()
    for node in ast.walk(tree):
        chain = _chain(node) if isinstance(node, ast.Attribute) and id(node) not in inner else None
        holder = next((i for i in range(len(chain) - 1, -1, -1) if chain[i] in HOLDERS), None) if chain else None
        if holder is not None and holder < len(chain) - 1 and not chain[-1].startswith("__"):
            used.add(HOLDERS[chain[holder]] + ".".join(chain[holder + 1:]))
    return used


def used_names() -> dict[str, set]:
    sources = {str(path.relative_to(ROOT)): path.read_text() for path in sorted((ROOT / "ticknorm").rglob("*.py"))}
    return {path: tensorrt_names(text) for path, text in sources.items()
            if "tensorrt" in text and tensorrt_names(text)}


def test_the_names_list_is_tensorrt_11s():
    assert "Builder.create_network" in NAMES and "IExecutionContext.execute_async_v3" in NAMES
    assert not set(REMOVED_IN_11) & NAMES


def test_every_tensorrt_name_ticknorm_uses_exists_in_tensorrt_11():
    found = used_names()
    assert {"ticknorm/runtime/trt_runner.py", "ticknorm/plugins/trt_plugin.py", "ticknorm/profiler/collect_trt.py"} <= set(found)
    missing = {path: sorted(names - NAMES) for path, names in found.items() if names - NAMES}
    assert missing == {}
    assert "Builder.create_network" in found["ticknorm/runtime/trt_runner.py"]


def test_the_scan_catches_a_removed_name():
    source = "def build(trt, builder, network):\n    config = builder.create_builder_config()\n" \
             "    config.set_flag(trt.BuilderFlag.FP16)\n    network.get_layer(0).precision = trt.float32\n" \
             "    layer = network.get_layer(0)\n    layer.set_output_type(0, trt.float32)\n"
    assert {"BuilderFlag.FP16", "ILayer.set_output_type"} <= tensorrt_names(source) - NAMES
