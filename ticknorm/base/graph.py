"""A read-only index over an ONNX graph: who produces and who consumes each tensor, which tensors
are constants, and their inferred shapes. Matchers ask it questions; they never edit the graph."""

import itertools
import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx_ir.passes.common import shape_inference

from ticknorm.base.errors import OnnxFileError
from ticknorm.base.onnx_io import is_external

# Mantissa bits of each float type: how finely it rounds.
FLOAT_PRECISION: dict[int, int] = {onnx.TensorProto.BFLOAT16: 8, onnx.TensorProto.FLOAT16: 11,
                                   onnx.TensorProto.FLOAT: 24, onnx.TensorProto.DOUBLE: 53}


@dataclass(frozen=True)
class TensorInfo:
    elem_type: int
    dims: tuple  # int for a static dim, str for a named dim, None for unknown; () for a scalar
    rank_known: bool


class GraphIndex:
    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in node.input:
                if name:
                    self.consumers[name].append(index)
        self.graph_inputs = {value.name for value in graph.input}
        # Tensors read inside If/Loop/Scan bodies escape like graph outputs: a fusion may not remove them.
        self.graph_outputs = {value.name for value in graph.output} | subgraph_reads(graph)
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        typed_model = typed(model)
        self.values = ir.convenience.create_value_mapping(typed_model.graph, include_subgraphs=False)
        self.info = _tensor_info(typed_model)
        self._constants: dict[str, np.ndarray | None] = {}

    def node_name(self, index: int) -> str:
        node = self.nodes[index]
        return node.name or f"{node.op_type}#{index}"

    def producer_op(self, name: str) -> tuple[int, onnx.NodeProto] | tuple[None, None]:
        index = self.producer.get(name)
        return (index, self.nodes[index]) if index is not None else (None, None)

    def consumer_nodes(self, name: str) -> list[int]:
        return self.consumers.get(name, [])

    def sole_consumer(self, name: str, ignore_shape_readers: bool = False) -> int | None:
        """The one node reading `name`, or None when it has several readers or is a graph output.
        `ignore_shape_readers`: Shape nodes read only metadata (dynamo's dynamic Reshape targets)."""
        readers = self.consumer_nodes(name)
        if ignore_shape_readers:
            readers = [r for r in readers if self.nodes[r].op_type != "Shape"]
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` when it is fixed at export time (initializer, Constant, Cast of one)."""
        if name not in self._constants:
            self._constants[name] = self._fold(name)
        return self._constants[name]

    def _fold(self, name: str) -> np.ndarray | None:
        if name in self.graph_inputs:
            return None  # an initializer that is also an input can be overridden by the caller
        if name in self.initializers:
            tensor = self.initializers[name]
            return None if is_external(tensor) else numpy_helper.to_array(tensor)  # staged weights are no constants we read
        _, node = self.producer_op(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return _constant_node_value(node)
        if node.op_type in ("Cast", "Identity", "CastLike"):
            inner = self.constant(node.input[0])
            if inner is None:
                return None
            if node.op_type == "Identity":
                return inner
            to = attr(node, "to") if node.op_type == "Cast" else self.elem_type(node.input[1])
            return None if to is None else inner.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        return None

    def scalar(self, name: str, beside: str) -> float | None:
        """The value of a one-element constant that broadcasts with `beside` without raising its
        rank (a [1,1,1,1] epsilon on a rank-3 tensor would change the output's shape)."""
        value = self.constant(name)
        rank = self.rank(beside)
        if value is None or value.size != 1 or (rank is not None and value.ndim > rank) or (rank is None and value.ndim):
            return None
        return float(value.reshape(-1)[0])

    def elem_type(self, name: str) -> int | None:
        if name in self.info:
            return self.info[name].elem_type
        value = self.constant(name)
        return None if value is None else onnx.helper.np_dtype_to_tensor_dtype(value.dtype)

    def coarsest_float_upstream(self, name: str) -> int | None:
        """`coarsest_float` of the tensor `name`."""
        value = self.values.get(name)
        return None if value is None else coarsest_float(value)

    def rank(self, name: str) -> int | None:
        info = self.info.get(name)
        return len(info.dims) if info is not None and info.rank_known else None

    def dims(self, name: str) -> tuple | None:
        info = self.info.get(name)
        return info.dims if info is not None and info.rank_known else None


def bodies(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.GraphProto]]:
    """Every subgraph of `graph` at any depth (If branches, Loop/Scan bodies), with the node that
    holds it, outermost first."""
    found = []
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
                found.append((node, body))
                found += bodies(body)
    return found


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and, after them, those of every subgraph."""
    return list(graph.node) + [node for _, body in bodies(graph) for node in body.node]


def if_branches(node: onnx.NodeProto) -> dict[str, onnx.GraphProto]:
    """An If node's `then_branch` and `else_branch` (those it has), by attribute name; {} for any
    other node."""
    if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
        return {}
    return {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}


def check_branches(model: onnx.ModelProto, source: str) -> None:
    """Refuse an If whose branches disagree with it (a hand-merged decoder gone wrong) in one
    line, before any runtime is built: the count of outputs, and their element types where both
    branches declare them."""
    for node, _ in bodies(model.graph):
        branches = if_branches(node)
        if not branches:
            continue
        counts = {name: len(branches[name].output) for name in ("then_branch", "else_branch") if name in branches}
        if len(counts) != 2 or set(counts.values()) != {len(node.output)}:
            raise OnnxFileError(f"{source}: If node '{node.name}' has {len(node.output)} outputs but its branches give "
                                + ", ".join(f"{count} ({name})" for name, count in counts.items())
                                + "; the branches must agree with it")
        then_types, else_types = ([o.type.tensor_type.elem_type for o in branches[name].output]
                                  for name in counts)
        for index, (then_type, else_type) in enumerate(zip(then_types, else_types)):
            if then_type and else_type and then_type != else_type:
                raise OnnxFileError(
                    f"{source}: If node '{node.name}' output {index} ({node.output[index]}) is "
                    f"{onnx.TensorProto.DataType.Name(then_type)} in then_branch but "
                    f"{onnx.TensorProto.DataType.Name(else_type)} in else_branch; the branches must agree")


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every name read by a node inside a subgraph of `graph` (at any depth)."""
    return {name for _, body in bodies(graph) for node in body.node for name in node.input}


def attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        if attribute.name == "value":
            return numpy_helper.to_array(value)
        if attribute.name in ("value_float", "value_floats"):
            return np.array(value, dtype=np.float32)
        if attribute.name in ("value_int", "value_ints"):
            return np.array(value, dtype=np.int64)
    return None


def typed(model: onnx.ModelProto, opset: int = 0) -> ir.Model:
    """`model` in onnx-ir (its weights wrapped, not copied), every tensor typed and shaped by shape
    inference where it succeeds and as declared elsewhere (a graph shape inference cannot read
    still gets matched). Inference leaves the big weights out of what it serializes (it would fail
    at 2 GiB, and weights are no shape tensors), and staged weights, small ones too, go to it as
    typed inputs: ONNX cannot read their files. `opset` raises the view's default-domain opset for
    inference alone (a caller that only reads the view asks how a newer opset would type it)."""
    view = ir.from_proto(model)
    if default_opset(view) < opset:
        view.opset_imports[""] = opset
    staged = {value: value.const_value for value in view.graph.initializers.values()
              if isinstance(value.const_value, ir.ExternalTensor)}
    for value in staged:
        value.const_value = None
    quiet = logging.getLogger(shape_inference.__name__)
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        shape_inference.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(view)
    finally:
        quiet.setLevel(level)
        for value, tensor in staged.items():
            value.const_value = tensor
    return view


def node_name(node: ir.Node, position: int) -> str:
    """A node's name, or its op type and position for an unnamed one (how reports name it)."""
    return node.name or f"{node.op_type}#{position}"


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


class FreshNames:
    """Tensor and node names the graph does not hold yet: a stem, else the stem and a counter (as
    onnx-graphsurgeon does). onnx-ir names what is left unnamed, but a Cast that should say what it
    rounds (`x_round`, `x_fp32`) needs a name from a stem."""

    def __init__(self, graph: ir.Graph):
        self.taken = {*graph.initializers, *(value.name for value in graph.inputs)}
        for node in graph:
            self.taken.add(node.name)
            self.taken.update(value.name for value in node.outputs)

    def fresh(self, stem: str) -> str:
        candidates = itertools.chain([stem], (f"{stem}_{count}" for count in itertools.count(1)))
        name = next(name for name in candidates if name not in self.taken)
        self.taken.add(name)
        return name


def coarsest_float(value: ir.Value) -> int | None:
    """The float type with the fewest mantissa bits among `value` and every tensor it is computed
    from: once a value was rounded to fp16 or bf16 on its way, a change before that rounding
    can move it by one step of that type, and it is judged at that type's tolerance."""
    seen: set[ir.Value] = set()
    frontier: list[ir.Value | None] = [value]
    found: list[int] = []
    while frontier:
        current = frontier.pop()
        if current is None or current in seen:
            continue
        seen.add(current)
        if isinstance(current.type, ir.TensorType) and current.dtype in FLOAT_PRECISION:
            found.append(int(current.dtype))
        producer = current.producer()
        if producer is not None:
            frontier.extend(producer.inputs)
    return min(found, key=FLOAT_PRECISION.__getitem__, default=None)


def _tensor_info(model: ir.Model) -> dict[str, TensorInfo]:
    """Each main-graph tensor's type and shape (`typed`)."""
    graph = model.graph
    values = [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs), *graph.outputs]
    return {value.name: TensorInfo(int(value.dtype or 0), tuple(_dim(d) for d in value.shape or ()), value.shape is not None)
            for value in values if isinstance(value.type, ir.TensorType)}


def _dim(dim) -> int | str | None:
    return dim if isinstance(dim, int) else dim.value


def rebuilt(model: onnx.ModelProto, nodes, initializers, extra_inputs=()) -> onnx.ModelProto:
    """`model` with a new node list and initializers; everything else (metadata too) kept."""
    graph = model.graph
    new_graph = onnx.helper.make_graph(nodes, graph.name, list(graph.input) + list(extra_inputs), graph.output,
                                       initializers, doc_string=graph.doc_string, value_info=graph.value_info,
                                       sparse_initializer=graph.sparse_initializer)
    new_graph.metadata_props.extend(graph.metadata_props)
    new = onnx.helper.make_model(new_graph, opset_imports=model.opset_import, functions=model.functions)
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(new, name, getattr(model, name))
    new.metadata_props.extend(model.metadata_props)
    return new


class UniqueNames:
    """Unique tensor and node names, from a counter (as onnx-graphsurgeon does)."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
        for node in graph.node:
            self.taken.update(node.output)
            self.taken.add(node.name)

    def fresh(self, stem: str) -> str:
        name, count = stem, 0
        while name in self.taken:
            count += 1
            name = f"{stem}_{count}"
        self.taken.add(name)
        return name
