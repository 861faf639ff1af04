"""The fp32 run inside If and Loop bodies. ONNX Runtime fetches no tensor of a body as an output,
so the island rules would see nothing of a network held in a branch (a VAD model's If, a merged
decoder). A body is measured as a model of its own, run on the values the outer run gave what it
reads: the branch the run took, and a Loop's first step (its carried values as they came in). A
Scan's body, an If whose condition or a Loop whose inputs the run did not give (or gave as no
tensor: a sequence), and a body ONNX Runtime does not run alone, stay unmeasured: the check of the
converted graph judges them."""

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from ticknorm.base.errors import OnnxFileError, RuntimeFailure

# A run of a model on feeds: every tensor the measurement reads, by name (`measure.values_of`).
Run = Callable[[onnx.ModelProto, dict[str, np.ndarray]], dict[str, np.ndarray]]


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """The names `graph` (and its bodies) reads from the graphs around it."""
    defined = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    defined |= {name for node in graph.node for name in node.output}
    read = {name for node in graph.node for name in node.input if name} | {value.name for value in graph.output}
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                read |= outer_reads(attribute.g)
    return read - defined


def body_reads(model: onnx.ModelProto) -> list[str]:
    """What a body run needs of the outer run: the control-flow nodes' inputs and what their bodies
    read from outside, less the graph's inputs and weights (fed and copied, not fetched)."""
    graph = model.graph
    given = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    needed = [name for node in graph.node if _steps(node) for name in [*node.input, *_reads_of(node)]]
    return [name for name in dict.fromkeys(needed) if name and name not in given]


def body_values(model: onnx.ModelProto, values: dict[str, np.ndarray], run: Run) -> dict[str, np.ndarray]:
    """Every tensor of the bodies the outer run went through (`values`: its tensors and feeds),
    each body run alone by `run`, which measures its own bodies in turn."""
    found: dict[str, np.ndarray] = {}
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        steps = _steps(node)
        step = steps(node, values) if steps is not None else None
        if step is None:
            continue
        body, own = step
        reads = outer_reads(body)
        given = {**own, **{name: values.get(name) for name in reads if name not in weights}}
        if all(isinstance(value, np.ndarray) for value in given.values()):  # else the run gave it not, or no tensor
            alone = _alone(model, body, given, [weights[name] for name in reads if name in weights])
            try:
                found.update(run(alone, given))
            except (OnnxFileError, RuntimeFailure):  # a body ONNX Runtime does not run alone stays unmeasured
                continue
    return found


def _if_step(node: onnx.NodeProto, values: dict[str, np.ndarray]):
    condition = values.get(node.input[0])
    if condition is None:
        return None
    taken = "then_branch" if bool(np.asarray(condition).reshape(-1)[0]) else "else_branch"
    return next(a.g for a in node.attribute if a.name == taken), {}


def _loop_step(node: onnx.NodeProto, values: dict[str, np.ndarray]):
    """The first step: iteration 0, the condition true, the carried values as the Loop got them."""
    body = next(a.g for a in node.attribute if a.name == "body")
    count = values.get(node.input[0]) if node.input[0] else None
    going = values.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    carried = [values.get(name) for name in node.input[2:]]
    if any(value is None for value in carried) or any(v is not None and not np.asarray(v).reshape(-1)[0]
                                                       for v in (count, going)):
        return None
    own = [np.array(0, np.int64), np.array(True), *carried]
    return body, {value.name: array for value, array in zip(body.input, own)}


def _steps(node: onnx.NodeProto):
    if node.domain not in ("", "ai.onnx"):
        return None
    return {"If": _if_step, "Loop": _loop_step}.get(node.op_type)


def _reads_of(node: onnx.NodeProto) -> set[str]:
    return {name for attribute in node.attribute if attribute.type == onnx.AttributeProto.GRAPH
            for name in outer_reads(attribute.g)}


def _alone(model: onnx.ModelProto, body: onnx.GraphProto, feeds: dict[str, np.ndarray],
           weights: list[onnx.TensorProto]) -> onnx.ModelProto:
    """`body` as a model: what it reads from outside fed (typed by the arrays) or its weights."""
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
              for name, array in feeds.items()]
    graph = helper.make_graph(body.node, body.name, inputs, body.output, [*body.initializer, *weights])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                             functions=model.functions)
