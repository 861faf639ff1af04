"""Which tensors of a model keep their bytes in another file, and where: what the weights record,
the staging of weights and the check of their paths all ask, below all of them."""

from collections.abc import Iterator

import onnx


def external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    """An external tensor's `location`, `offset`, `length` (as ONNX stores them: strings)."""
    return {entry.key: entry.value for entry in tensor.external_data}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor onnx's loader would fill from external data: initializers and tensor
    attributes (Constant's `value`) of the graph, of its If/Loop/Scan bodies at any depth and of
    the model's functions. onnx walks the same ground in a private helper only."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    yield from _node_tensors(graph.node)


def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for body in attribute.graphs:
                yield from _graph_tensors(body)
