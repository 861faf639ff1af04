"""A model in onnx-ir with the shapes ONNX infers (`base.graph.inferred_types`: weights neither
copied nor read) kept beside it: unlike `base.graph.typed`, the types are not written into the
values, so only the few values a rule asks about (`values.dims`) are ever read, and what fusion
writes is typed where the file was."""

import onnx
import onnx_ir as ir

from ticknorm.base.graph import inferred_types
from ticknorm.base.write_back import ReadModel, read


def typed_ir(model: onnx.ModelProto) -> ir.Model:
    return typed_read(model).model


def typed_read(model: onnx.ModelProto) -> ReadModel:
    """`model` in onnx-ir (paired with the protos it was read from, which fusion writes back
    where nothing changed), with what ONNX infers of each value's type kept beside it (each
    graph's `meta["inferred"]`, read by `values`) rather than written into the values: what
    fusion writes is typed where the file was, and only the values fusion asks about are read."""
    inferred = inferred_types(model)
    converted = read(model)
    for graph in [converted.model.graph, *(body for _, body in converted.bodies)]:
        graph.meta["inferred"] = inferred
    return converted
