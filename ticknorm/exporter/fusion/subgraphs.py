"""Norms inside subgraphs: the branches of an `If` (Optimum's merged decoder keeps the whole
decoder twice in one), and `Loop`/`Scan` bodies.

Each body is matched and rewritten as a graph of its own: a model is made of it whose inputs also
declare the outer-scope tensors it reads (with their types, so shapes are known) and whose
initializers include the outer graph's (a norm's scale lives there). The fused nodes, and any
initializer the rewrite made, go back into the body; the outer graph is not touched. A fused norm
in a branch is verified through the graph's outputs on feeds that take that branch."""

import onnx

from ticknorm.base.graph import GraphIndex


def body_model(model: onnx.ModelProto, body: onnx.GraphProto, outer: GraphIndex) -> onnx.ModelProto:
    """`body` as a model of its own, its outer-scope reads declared as inputs typed as the outer
    graph knows them, the outer initializers beside its own."""
    produced = {name for node in body.node for name in node.output} | {value.name for value in body.input}
    own = {tensor.name for tensor in body.initializer}
    reads = list(dict.fromkeys(name for node in body.node for name in node.input
                               if name and name not in produced and name not in own and name not in outer.initializers))
    inputs = list(body.input) + [_typed(name, outer) for name in reads]
    initializers = list(body.initializer) + [t for name, t in outer.initializers.items() if name not in own]
    graph = onnx.helper.make_graph(list(body.node), body.name or "body", inputs, list(body.output), initializers)
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def put_back(body: onnx.GraphProto, fused: onnx.GraphProto, outer: GraphIndex) -> None:
    """The fused body's nodes into `body`, with the initializers the rewrite added."""
    own = {tensor.name for tensor in body.initializer}
    added = [t for t in fused.initializer if t.name not in own and t.name not in outer.initializers]
    del body.node[:]
    body.node.extend(fused.node)
    body.initializer.extend(added)


def _typed(name: str, outer: GraphIndex) -> onnx.ValueInfoProto:
    info = outer.info.get(name)
    if info is None:
        return onnx.ValueInfoProto(name=name)
    return onnx.helper.make_tensor_value_info(name, info.elem_type, list(info.dims) if info.rank_known else None)
