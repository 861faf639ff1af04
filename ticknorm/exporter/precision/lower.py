"""Write a planned precision into the graph: a strongly typed fp16/bf16 graph (what TensorRT 11 and
ONNX Runtime's CUDA provider run), and an emulation of it in fp32 (every value the low graph holds
in the low type rounded to it, the arithmetic in fp32) that ONNX Runtime's CPU provider runs for
either type, so a conversion is judged even where no runtime computes in that type.

Every float32 tensor has a home type: a node computing in the low type writes it low, an fp32
island writes fp32; a graph input is fp32 unless the I/O types are low; a weight is low when every
reader computes low. Where a reader wants the other type, one Cast per tensor and type is placed
before its first reader. Graph outputs keep their names and take the I/O type."""

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from ticknorm.base.graph import GraphIndex, UniqueNames, rebuilt
from ticknorm.base.onnx_io import external_entries, is_external
from ticknorm.base.precision import PRECISION_KEY, Precision
from ticknorm.base.scopes import get_scope, set_scope
from ticknorm.base.upcast import round_trip_nodes
from ticknorm.exporter.precision.plan import NEUTRAL_OPS, arithmetic

FLOAT = onnx.TensorProto.FLOAT
# Inputs a low-precision node still takes in fp32 (the op's own type constraint says so).
FP32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}


@dataclass
class Lowering:
    """The plan laid on a graph: nodes computing low, and the type each float tensor is held in."""

    index: GraphIndex
    precision: Precision
    low_nodes: set  # node positions
    home: dict  # float32 tensor -> FLOAT or the low type

    def wanted(self, position: int, slot: int, name: str) -> int:
        node = self.index.nodes[position]
        if node.op_type in NEUTRAL_OPS:
            return self.home[name]
        if position in self.low_nodes and slot not in FP32_INPUTS.get(node.op_type, ()):
            return self.precision.elem_type
        return FLOAT


def lay_out(model: onnx.ModelProto, precision: Precision) -> Lowering:
    index = GraphIndex(model)
    islands = set(precision.nodes)
    low_nodes = {p for p, node in enumerate(index.nodes)
                 if arithmetic(index, node) and index.node_name(p) not in islands}
    lowering = Lowering(index, precision, low_nodes, {})
    low = precision.elem_type
    for value in model.graph.input:
        if index.elem_type(value.name) == FLOAT:
            lowering.home[value.name] = low if precision.io_types == "low" else FLOAT
    for position, node in enumerate(index.nodes):
        for name in node.output:
            if name and index.elem_type(name) == FLOAT:
                lowering.home[name] = low if position in low_nodes else FLOAT
    for name, tensor in index.initializers.items():
        if tensor.data_type == FLOAT:
            lowering.home[name] = FLOAT
            readers = [(p, s) for p in index.consumer_nodes(name) for s, i in enumerate(index.nodes[p].input) if i == name]
            if readers and all(lowering.wanted(p, s, name) == low for p, s in readers):
                lowering.home[name] = low
    return lowering


def low_precision_graph(model: onnx.ModelProto, precision: Precision, weights_dir=None) -> onnx.ModelProto:
    """The strongly typed graph: low weights and activations, fp32 islands, Casts between them."""
    return write_low(lay_out(model, precision), weights_dir)


def write_low(lowering: Lowering, weights_dir=None, progress=lambda done, total: None) -> onnx.ModelProto:
    """The strongly typed graph; `progress` hears each weight written (a streamed model's take minutes)."""
    model, precision = lowering.index.model, lowering.precision
    index, low = lowering.index, precision.elem_type
    names = UniqueNames(model)
    count = len(model.graph.initializer)
    with _low_weights_file(weights_dir) as sink:
        initializers = []
        for done, tensor in enumerate(model.graph.initializer, start=1):
            initializers.append(_held(tensor, lowering.home.get(tensor.name, tensor.data_type), precision.dtype,
                                      weights_dir, sink))
            progress(done, count)
    nodes, casts = [], {}
    for position, node in enumerate(index.nodes):
        node = _copy(node)
        for slot, name in enumerate(node.input):
            if name in lowering.home and lowering.wanted(position, slot, name) != lowering.home[name]:
                node.input[slot] = _cast(nodes, casts, names, name, lowering.wanted(position, slot, name), get_scope(node))
        if position in lowering.low_nodes:
            _lower_attributes(node, low, precision.dtype)
        nodes.append(node)
    outputs = _typed_outputs(model, lowering, nodes, names)
    lowered = rebuilt(model, nodes, initializers)
    del lowered.graph.value_info[:]
    for value in lowered.graph.input:
        if value.name in lowering.home:
            value.type.tensor_type.elem_type = lowering.home[value.name]
    del lowered.graph.output[:]
    lowered.graph.output.extend(outputs)
    _mark(lowered, precision)
    return lowered


def emulated_graph(model: onnx.ModelProto, precision: Precision, weights_dir=None) -> onnx.ModelProto:
    """The same numbers in fp32: each value the low graph holds low is rounded to the low type
    (Cast there and back) where it is made, or where a low reader takes it; weights held low are
    rounded in place; the arithmetic stays fp32."""
    return write_emulated(lay_out(model, precision), weights_dir)


def write_emulated(lowering: Lowering, weights_dir=None) -> onnx.ModelProto:
    model, precision = lowering.index.model, lowering.precision
    index, low = lowering.index, precision.elem_type
    names = UniqueNames(model)
    initializers = [_rounded(t, precision.dtype, weights_dir) if lowering.home.get(t.name) == low else t
                    for t in model.graph.initializer]
    low_outputs = {name for p in lowering.low_nodes for name in index.nodes[p].output if lowering.home.get(name) == low}
    rounded_at_source = low_outputs | {t.name for t in model.graph.initializer if lowering.home.get(t.name) == low}
    nodes, rounded = [], {}
    for position, node in enumerate(index.nodes):
        node = _copy(node)
        for slot, name in enumerate(node.input):
            if (name in lowering.home and name not in rounded_at_source
                    and lowering.wanted(position, slot, name) == low):
                if name not in rounded:
                    rounded[name] = _round_trip(nodes, names, name, low, get_scope(node))
                node.input[slot] = rounded[name]
        nodes.append(node)
        for slot, name in enumerate(node.output):
            if name in low_outputs:
                node.output[slot] = names.fresh(f"{name}_unrounded")
                nodes.extend(round_trip_nodes(names, node.output[slot], name, low, get_scope(node)))
    if precision.io_types == "low":  # fp32 outputs leave the low graph through a Cast to the low type
        for value in model.graph.output:
            if lowering.home.get(value.name) == FLOAT:
                raw = names.fresh(f"{value.name}_unrounded")
                _rename(nodes, value.name, raw)
                nodes.extend(round_trip_nodes(names, raw, value.name, low, ""))
    return rebuilt(model, nodes, initializers)


def _rename(nodes: list, old: str, new: str) -> None:
    """Every node's reference to tensor `old` becomes `new`."""
    for node in nodes:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copied = onnx.NodeProto()
    copied.CopyFrom(node)
    return copied


def _cast(nodes: list, casts: dict, names: UniqueNames, name: str, to: int, scope: str | None) -> str:
    """The name of `name` cast to `to`, the Cast placed once, before its first reader."""
    if (name, to) not in casts:
        suffix = "fp32" if to == FLOAT else onnx.helper.tensor_dtype_to_np_dtype(to).name
        cast = helper.make_node("Cast", [name], [names.fresh(f"{name}_{suffix}")], to=to,
                                name=names.fresh(f"{name}_cast_{suffix}"))
        set_scope(cast, scope or "")
        nodes.append(cast)
        casts[(name, to)] = cast.output[0]
    return casts[(name, to)]


def _round_trip(nodes: list, names: UniqueNames, name: str, low: int, scope: str | None) -> str:
    target = names.fresh(f"{name}_rounded")
    nodes.extend(round_trip_nodes(names, name, target, low, scope))
    return target


def _lower_attributes(node: onnx.NodeProto, low: int, dtype: str) -> None:
    if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
        # without `value` it makes fp32 zeros: a low one gets its zero in the low type (DeepSeek-V3's cache)
        node.attribute.append(helper.make_attribute("value", _low_tensor(np.zeros(1, np.float32), "value", dtype)))
        return
    for attribute in node.attribute:
        if node.op_type == "Cast" and attribute.name == "to" and attribute.i == FLOAT:
            attribute.i = low
        elif attribute.name == "value" and attribute.t.data_type == FLOAT:
            attribute.t.CopyFrom(_low_tensor(numpy_helper.to_array(attribute.t), attribute.t.name, dtype))


def _typed_outputs(model: onnx.ModelProto, lowering: Lowering, nodes: list, names: UniqueNames) -> list:
    """Graph outputs under their own names in the I/O type, cast where their home differs."""
    io_type = lowering.precision.elem_type if lowering.precision.io_types == "low" else FLOAT
    outputs = []
    for value in model.graph.output:
        output = onnx.ValueInfoProto()
        output.CopyFrom(value)
        home = lowering.home.get(value.name)
        if home is not None and home != io_type:
            inner = names.fresh(f"{value.name}_{'low' if home != FLOAT else 'fp32'}")
            _rename(nodes, value.name, inner)
            cast = helper.make_node("Cast", [inner], [value.name], to=io_type, name=names.fresh(f"{value.name}_cast"))
            set_scope(cast, next((get_scope(n) or "" for n in nodes if inner in n.output), ""))
            nodes.append(cast)
        if home is not None:
            output.type.tensor_type.elem_type = io_type
        outputs.append(output)
    return outputs


def _held(tensor: onnx.TensorProto, home: int, dtype: str, weights_dir, sink) -> onnx.TensorProto:
    """A weight in its home type. One staged in `weights_dir` (a reference into a file there) is
    written to `sink`, a file beside it, and referenced there, low or kept in fp32, one tensor at
    a time, never all held (a streamed 8B model's bf16 weights are 16 GB): the low graph's weights
    are then that one file, which the output links instead of copying."""
    lowered = tensor.data_type == FLOAT and home != FLOAT
    if sink is not None and is_external(tensor):
        return _moved(tensor, weights_dir, sink, dtype if lowered else None)
    return _low_tensor(_array(tensor, weights_dir), tensor.name, dtype) if lowered else tensor


def _moved(tensor: onnx.TensorProto, weights_dir, sink, dtype: str | None) -> onnx.TensorProto:
    """A staged weight read from its file, in the low type when `dtype` is given, appended to
    `sink` and referenced there: the read array and its low copy are all it holds at once."""
    entries = external_entries(tensor)
    source = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    array = np.fromfile(Path(weights_dir) / entries["location"], dtype=source, offset=int(entries.get("offset", 0)),
                        count=int(entries["length"]) // source.itemsize)
    held = low_array(array, dtype) if dtype else array
    del array
    moved = onnx.TensorProto(name=tensor.name, dims=tensor.dims,
                             data_type=onnx.TensorProto.BFLOAT16 if dtype == "bf16" else
                             onnx.helper.np_dtype_to_tensor_dtype(held.dtype))
    offset = sink.tell()
    sink.write(memoryview(np.ascontiguousarray(held).view(np.uint8)))
    moved.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", Path(sink.name).name), ("offset", str(offset)), ("length", str(sink.tell() - offset))):
        moved.external_data.add(key=key, value=value)
    return moved


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


def _rounded(tensor: onnx.TensorProto, dtype: str, weights_dir) -> onnx.TensorProto:
    return numpy_helper.from_array(low_array(_array(tensor, weights_dir), dtype).astype(np.float32), tensor.name)


def _array(tensor: onnx.TensorProto, weights_dir) -> np.ndarray:
    """A weight's values; one referenced from a file is read through a copy of its proto, which
    onnx fills with the bytes (the graph's own keeps only the reference: a streamed 8B model's
    weights would otherwise all end up held)."""
    if is_external(tensor):
        reference = onnx.TensorProto()
        reference.CopyFrom(tensor)
        tensor = reference
    return numpy_helper.to_array(tensor, base_dir=str(weights_dir) if weights_dir is not None else "")


def low_array(array: np.ndarray, dtype: str) -> np.ndarray:
    """`array` held in the low type (bfloat16 through ml_dtypes)."""
    return array.astype(np.float16 if dtype == "fp16" else ml_dtypes.bfloat16)


def _low_tensor(array: np.ndarray, name: str, dtype: str) -> onnx.TensorProto:
    held = low_array(array, dtype)
    if dtype == "fp16":
        return numpy_helper.from_array(held, name)
    return helper.make_tensor(name, onnx.TensorProto.BFLOAT16, held.shape, held.view(np.uint16).tobytes(), raw=True)


def _mark(model: onnx.ModelProto, precision: Precision) -> None:
    kept = [p for p in model.metadata_props if p.key != PRECISION_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=PRECISION_KEY, value=precision.to_json())
