"""Write a planned precision into the graph: a strongly typed fp16/bf16 graph (what TensorRT 11 and
ONNX Runtime's CUDA provider run), and an emulation of it in fp32 (every value the low graph holds
in the low type rounded to it, the arithmetic in fp32) that ONNX Runtime's CPU provider runs for
either type, so a conversion is judged even where no runtime computes in that type.

Every float32 tensor has a home type: a node computing in the low type writes it low, an fp32
island writes fp32; a graph input is fp32 unless the I/O types are low; a weight is low when every
reader computes low. Where a reader wants the other type, one Cast per tensor, type and graph is
placed before its first reader. Graph outputs keep their names and take the I/O type. If, Loop and
Scan bodies are written alike (see `bodies`): their own weights and Constants, the outer weights
they read, and their nodes; their inputs and outputs stay fp32."""

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from ticknorm.base.graph import FreshNames, bodies, typed
from ticknorm.base.precision import PRECISION_KEY, Precision
from ticknorm.base.scopes import SCOPE_KEY, node_scope
from ticknorm.base.upcast import round_trip
from ticknorm.exporter.precision.bodies import planned_graphs, planned_nodes
from ticknorm.exporter.precision.plan import NEUTRAL_OPS, arithmetic

FLOAT = ir.DataType.FLOAT
# Inputs a low-precision node still takes in fp32 (the op's own type constraint says so).
FP32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}


@dataclass
class Lowering:
    """The plan laid on a graph: nodes computing low, and the type each float tensor is held in."""

    model: onnx.ModelProto  # each graph written from the plan edits its own onnx-ir copy of it
    precision: Precision
    low_nodes: set[int]  # node indices in `planned_nodes`
    home: dict[str, ir.DataType]  # by float32 tensor name: FLOAT or the low type

    @property
    def low(self) -> ir.DataType:
        return ir.DataType(self.precision.elem_type)

    def held_in(self, value: ir.Value | None) -> ir.DataType | None:
        """`value`'s home type; None for a value the plan holds in none (not float32, or absent)."""
        return self.home.get(value.name) if value is not None and value.name is not None else None

    def wanted(self, node: ir.Node, position: int, slot: int) -> ir.DataType:
        """The type `node` (at `position`) takes a float32 input in."""
        held = self.held_in(node.inputs[slot])
        if node.op_type in NEUTRAL_OPS and held is not None:  # reads the shape alone: the value as held
            return held
        if position in self.low_nodes and slot not in FP32_INPUTS.get(node.op_type, ()):
            return self.low
        return FLOAT

    def editable(self, weights_dir) -> ir.Model:
        """A fresh onnx-ir copy of the graph, its staged weights read from `weights_dir`."""
        model = ir.from_proto(self.model)
        if weights_dir is not None:
            ir.external_data.set_base_dir(model.graph, weights_dir)
        return model


def lay_out(model: onnx.ModelProto, precision: Precision) -> Lowering:
    graph = typed(model).graph
    islands = set(precision.nodes)
    nodes = planned_nodes(graph)
    low_nodes = {p for p, (node, name) in enumerate(nodes) if arithmetic(node) and name not in islands}
    lowering = Lowering(model, precision, low_nodes, {})
    low = lowering.low
    for value in graph.inputs:
        if value.name and value.dtype == FLOAT:
            lowering.home[value.name] = low if precision.io_types == "low" else FLOAT
    for body in planned_graphs(graph)[1:]:  # a body's boundary is fp32
        lowering.home.update({value.name: FLOAT for value in body.inputs if value.name and value.dtype == FLOAT})
    for position, (node, _) in enumerate(nodes):
        for value in node.outputs:
            if value.name and value.dtype == FLOAT:
                lowering.home[value.name] = low if position in low_nodes else FLOAT
    _lay_out_weights(lowering, graph, {node: position for position, (node, _) in enumerate(nodes)})
    return lowering


def _lay_out_weights(lowering: Lowering, graph: ir.Graph, positions: dict[ir.Node, int]) -> None:
    """A weight (of the graph or a body) is held low when every reader computes low; one read
    where the plan does not reach (a contrib op's body) stays fp32."""
    for body in planned_graphs(graph):
        for name, weight in body.initializers.items():
            if weight.const_value is not None and weight.const_value.dtype == FLOAT:
                readers = [(use.node, use.idx) for use in weight.uses()]
                low = readers and all(node in positions and lowering.wanted(node, positions[node], slot) == lowering.low
                                      for node, slot in readers)
                lowering.home[name] = lowering.low if low else FLOAT


def low_precision_graph(model: onnx.ModelProto, precision: Precision, weights_dir=None) -> onnx.ModelProto:
    """The strongly typed graph: low weights and activations, fp32 islands, Casts between them."""
    return write_low(lay_out(model, precision), weights_dir)


def write_low(lowering: Lowering, weights_dir=None, progress=lambda done, total: None) -> onnx.ModelProto:
    """The strongly typed graph; `progress` hears each weight written (a streamed model's take minutes)."""
    model, precision = lowering.editable(weights_dir), lowering.precision
    graph = model.graph
    names = FreshNames(graph)
    graphs, nodes = planned_graphs(graph), planned_nodes(graph)  # before any Cast is added
    weights = [weight for body in graphs for weight in body.initializers.items()]
    with _low_weights_file(weights_dir) as sink:
        for done, (name, weight) in enumerate(weights, start=1):
            tensor = weight.const_value
            if tensor is not None:
                weight.const_value = _held(tensor, lowering.home.get(name, tensor.dtype), precision.dtype, sink)
            progress(done, len(weights))
    casts: dict[tuple, ir.Value] = {}  # by (graph, tensor name, type): its Cast's output
    for position, (node, _) in enumerate(nodes):
        for slot, value in enumerate(node.inputs):
            if value is not None and value.name in lowering.home:
                to = lowering.wanted(node, position, slot)
                if to != lowering.held_in(value):
                    node.replace_input_with(slot, _cast(casts, names, value, to, node))
        if position in lowering.low_nodes:
            _lower_attributes(node, lowering.low, precision.dtype)
    for typed_graph in graphs:
        _type_outputs(typed_graph, lowering, names, body=typed_graph is not graph)
    for value in graph.inputs:
        held = lowering.held_in(value)
        if held is not None:
            value.dtype = held
    model.metadata_props.pop(PRECISION_KEY, None)
    model.metadata_props[PRECISION_KEY] = precision.to_json()
    lowered = ir.to_proto(model)
    for annotated in [lowered.graph, *(body for _, body in bodies(lowered.graph))]:
        del annotated.value_info[:]  # the fp32 graph's annotations: many of those tensors are now low
    return lowered


def write_emulated(lowering: Lowering, weights_dir=None) -> onnx.ModelProto:
    """The same numbers in fp32: each value the low graph holds low is rounded to the low type
    (Cast there and back) where it is made, or where a low reader takes it; weights held low are
    rounded in place; the arithmetic stays fp32."""
    model, low = lowering.editable(weights_dir), lowering.low
    graph = model.graph
    names = FreshNames(graph)
    nodes = [node for node, _ in planned_nodes(graph)]
    low_outputs = {value.name for p in lowering.low_nodes for value in nodes[p].outputs
                   if lowering.held_in(value) == low}
    rounded_at_source = low_outputs | _round_low_weights(planned_graphs(graph), lowering)
    rounded: dict[tuple, ir.Value] = {}  # by (graph, tensor name): a body rounds what it reads itself
    for position, node in enumerate(nodes):
        for slot, value in enumerate(node.inputs):
            if (value is not None and value.name in lowering.home and value.name not in rounded_at_source
                    and lowering.wanted(node, position, slot) == low):
                key = (node.graph, value.name)
                if key not in rounded:
                    rounded[key] = ir.Value(name=names.fresh(f"{value.name}_rounded"))
                    _graph_of(node).insert_before(node, round_trip(names, value, rounded[key], low, node_scope(node)))
                node.replace_input_with(slot, rounded[key])
        last = node
        for value in node.outputs:
            if value.name in low_outputs:  # its readers and the graph outputs take it rounded, under its name
                made = _renamed_unrounded(names, value)
                ir.convenience.replace_all_uses_with(value, made, replace_graph_outputs=True)
                trip = round_trip(names, value, made, low, node_scope(node))
                _graph_of(node).insert_after(last, trip)
                last = trip[-1]  # the Cast back, which makes `made`
    if lowering.precision.io_types == "low":  # fp32 outputs leave the low graph through a Cast to the low type
        for index, value in enumerate(list(graph.outputs)):
            if lowering.held_in(value) == FLOAT:
                graph.outputs[index] = _renamed_unrounded(names, value)
                graph.extend(round_trip(names, value, graph.outputs[index], low, ""))
    return ir.to_proto(model)


def _round_low_weights(graphs: list[ir.Graph], lowering: Lowering) -> set:
    """The weights the low graph holds low (of the graph and its bodies), rounded in place (their names)."""
    held_low = set()
    for graph in graphs:
        for name, weight in graph.initializers.items():
            tensor = weight.const_value  # held low only with a value (`lay_out`)
            if lowering.home.get(name) == lowering.low and tensor is not None:
                weight.const_value = ir.Tensor(_lowered(tensor, lowering.precision.dtype).astype(np.float32), name=name)
                held_low.add(name)
    return held_low


def _cast(casts: dict[tuple, ir.Value], names: FreshNames, value: ir.Value, to: ir.DataType,
          reader: ir.Node) -> ir.Value:
    """`value` cast to `to`, the Cast placed once in the reader's graph (a body's Cast is not seen
    outside it), before its first reader there."""
    graph = _graph_of(reader)
    key = (graph, value.name, to)
    if key not in casts:
        suffix = "fp32" if to == FLOAT else to.numpy().name
        cast = ir.node("Cast", [value], {"to": to}, outputs=[ir.Value(name=names.fresh(f"{value.name}_{suffix}"))],
                       name=names.fresh(f"{value.name}_cast_{suffix}"), metadata_props={SCOPE_KEY: node_scope(reader)})
        graph.insert_before(reader, cast)
        casts[key] = cast.outputs[0]
    return casts[key]


def _graph_of(node: ir.Node) -> ir.Graph:
    """The graph (or body) holding `node`, which every node of a graph read from a file has."""
    if node.graph is None:
        raise AssertionError(f"node {node.name} belongs to no graph")
    return node.graph


def _renamed_unrounded(names: FreshNames, value: ir.Value) -> ir.Value:
    """A value to take `value`'s name (and type), `value` renamed as unrounded."""
    rounded = ir.Value(name=value.name, type=value.type, shape=value.shape)
    value.name = names.fresh(f"{rounded.name}_unrounded")
    return rounded


def _lower_attributes(node: ir.Node, low: ir.DataType, dtype: str) -> None:
    if node.op_type == "ConstantOfShape" and "value" not in node.attributes:
        # without `value` it makes fp32 zeros: a low one gets its zero in the low type (DeepSeek-V3's cache)
        node.attributes["value"] = ir.AttrTensor("value", _low_tensor(np.zeros(1, np.float32), "value", dtype))
        return
    for name, attribute in list(node.attributes.items()):
        if node.op_type == "Cast" and name == "to" and attribute.value == FLOAT:
            node.attributes[name] = ir.AttrInt64(name, low)
        elif name == "value" and attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == FLOAT:
            tensor = attribute.value
            node.attributes[name] = ir.AttrTensor(name, _low_tensor(tensor.numpy(), tensor.name, dtype))


def _type_outputs(graph: ir.Graph, lowering: Lowering, names: FreshNames, body: bool) -> None:
    """Graph outputs under their own names in the I/O type, cast where their home differs; a
    body's outputs in fp32 (an If's branches then agree), the Cast's output named anew (what a
    branch returns may be an outer tensor, whose name stays its own)."""
    io_type = lowering.low if lowering.precision.io_types == "low" and not body else FLOAT
    for index, value in enumerate(list(graph.outputs)):
        home = lowering.held_in(value)
        if home is None:
            continue
        if home != io_type:
            output = ir.Value(name=value.name, shape=value.shape, type=ir.TensorType(io_type))
            if body:  # its io_type is fp32
                output.name = names.fresh(f"{value.name}_fp32")
            else:
                value.name = names.fresh(f"{output.name}_{'low' if home != FLOAT else 'fp32'}")
            producer = value.producer()
            graph.append(ir.node("Cast", [value], {"to": io_type}, outputs=[output],
                                 name=names.fresh(f"{output.name}_cast"),
                                 metadata_props={SCOPE_KEY: node_scope(producer) if producer is not None else ""}))
            graph.outputs[index] = output
        else:
            value.dtype = io_type


def _held(tensor: ir.TensorProtocol, home: ir.DataType, dtype: str, sink) -> ir.TensorProtocol:
    """A weight in its home type. One staged (a reference into a file) is written to `sink`, a file
    beside it, and referenced there, low or kept in fp32, one tensor at a time, never all held (a
    streamed 8B model's bf16 weights are 16 GB): the low graph's weights are then that one file,
    which the output links instead of copying."""
    lowered = tensor.dtype == FLOAT and home != FLOAT
    if sink is not None and isinstance(tensor, ir.ExternalTensor):
        return _moved(tensor, sink, dtype if lowered else None)
    return ir.Tensor(_lowered(tensor, dtype), name=tensor.name) if lowered else tensor


def _moved(tensor: ir.ExternalTensor, sink, dtype: str | None) -> ir.ExternalTensor:
    """A staged weight, in the low type when `dtype` is given, appended to `sink` and referenced
    there: its file is mapped while it is read, and its bytes are all it holds."""
    held = ir.Tensor(_lowered(tensor, dtype)) if dtype else tensor
    offset = sink.tell()
    sink.write(held.tobytes())
    tensor.release()
    sink_path = Path(sink.name)
    return ir.ExternalTensor(sink_path.name, offset, sink.tell() - offset, held.dtype, shape=tensor.shape,
                             name=tensor.name, base_dir=sink_path.parent)


@contextlib.contextmanager
def _low_weights_file(weights_dir):
    """A new file in the staging folder for the low weights of one lowering (None for a graph in memory)."""
    if weights_dir is None:
        yield None
        return
    with tempfile.NamedTemporaryFile(dir=weights_dir, prefix="low-", suffix=".data", delete=False) as sink:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(sink.name, 0o666 & ~mask)  # the output links this file: a file's usual mode, not a temporary's 0600
        yield sink


def _lowered(tensor: ir.TensorProtocol, dtype: str) -> np.ndarray:
    """A weight's values in the low type; one in a file is mapped for the read and unmapped after
    (a streamed 8B model's weights would otherwise all end up mapped at once)."""
    held = low_array(tensor.numpy(), dtype)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return held


def low_array(array: np.ndarray, dtype: str) -> np.ndarray:
    """`array` held in the low type (bfloat16 through ml_dtypes)."""
    return array.astype(np.float16 if dtype == "fp16" else ml_dtypes.bfloat16)


def _low_tensor(array: np.ndarray, name: str, dtype: str) -> ir.Tensor:
    return ir.Tensor(low_array(array, dtype), name=name)
