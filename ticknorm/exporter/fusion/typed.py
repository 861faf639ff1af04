"""A model in onnx-ir with the shapes ONNX infers, without copying or reading its weights.

Shape inference runs on a skeleton of the model whose weights are typed inputs (it serializes the
model, which fails at 2 GiB, and weights are never shape tensors). onnx-ir's own
ShapeInferencePass deserializes the whole inferred model a second time to copy every shape into
the values, which cost fusion more than the matching; here the inferred types stay protos, looked
up (`values.dims`) for the few values a rule asks about."""

import onnx
import onnx_ir as ir

from ticknorm.base.onnx_io import is_external

# Initializers above this size are weights, not shape tensors: shape inference does not need them.
_SHAPE_RELEVANT_BYTES = 1024


def typed_ir(model: onnx.ModelProto) -> ir.Model:
    """`model` in onnx-ir, with what ONNX infers of each value's type kept beside it (each graph's
    `meta["inferred"]`, read by `values`) rather than written into the values: what fusion
    writes is typed where the file was, and only the values fusion asks about are read."""
    inferred = _inferred_types(model)
    converted = ir.from_proto(model)
    for graph in converted.graphs():
        graph.meta["inferred"] = inferred
    return converted


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    graph = model.graph
    inputs = {value.name for value in graph.input}
    weights = [t for t in graph.initializer if is_external(t) or t.ByteSize() > _SHAPE_RELEVANT_BYTES]
    heavy = {t.name for t in weights}
    skeleton_graph = onnx.helper.make_graph(
        graph.node, graph.name, list(graph.input) + [onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                                     for t in weights if t.name not in inputs],
        graph.output, [t for t in graph.initializer if t.name not in heavy], value_info=graph.value_info)
    skeleton = onnx.helper.make_model(skeleton_graph, opset_imports=model.opset_import, functions=model.functions,
                                      ir_version=model.ir_version)
    try:
        skeleton = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot read still gets matched
        pass
    return _value_types(skeleton.graph, {})


def _value_types(graph: onnx.GraphProto, found: dict[str, onnx.TypeProto]) -> dict[str, onnx.TypeProto]:
    """The type of every value `graph` and its subgraphs declare, by name."""
    for value in [*graph.input, *graph.value_info, *graph.output]:
        found[value.name] = value.type
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                _value_types(body, found)
    return found
