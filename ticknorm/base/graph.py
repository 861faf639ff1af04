"""What every step asks of a graph, on onnx-ir: each value typed and shaped by onnx-ir's shape
inference (`typed`), names a graph does not hold yet (`FreshNames`), the float type a value was
rounded to on its way (`coarsest_floats`); and on protobuf, the subgraphs of If/Loop/Scan nodes,
which the scope map walks."""

import itertools
from collections.abc import Callable

import onnx
import onnx_ir as ir

from ticknorm.base.errors import OnnxFileError
from ticknorm.base.external_data import is_external

# Mantissa bits of each float type: how finely it rounds.
FLOAT_PRECISION: dict[int, int] = {onnx.TensorProto.BFLOAT16: 8, onnx.TensorProto.FLOAT16: 11,
                                   onnx.TensorProto.FLOAT: 24, onnx.TensorProto.DOUBLE: 53}


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


# Initializers above this size are weights, not shape tensors: shape inference does not need them.
_SHAPE_RELEVANT_BYTES = 1024


def typed(model: onnx.ModelProto, opset: int = 0) -> ir.Model:
    """`model` in onnx-ir (its weights wrapped, not copied), each value typed and shaped as shape
    inference finds it (`inferred_types`) where it does, as declared elsewhere. onnx-ir's
    ShapeInferencePass does the same from an onnx-ir model, but serializes it first and then
    deserializes the whole inferred model a second time to copy the shapes over: 0.50 s against
    0.25 s here on a 96-layer encoder, and every precision step, the plugin rewrite and each
    check of a fusion ask for a typed view."""
    view = ir.from_proto(model)
    inferred = inferred_types(model, opset)
    for graph in [view.graph, *(body for _, body in nested_graphs(view.graph))]:
        values = [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs)]
        for value in values:
            found = inferred.get(value.name or "")
            if found is not None and found.HasField("tensor_type"):
                _merge(value, found)
    return view


def _merge(value: ir.Value, found: onnx.TypeProto) -> None:
    """What inference says wins where it says something (it refines a declared unknown dim)."""
    shape = ir.serde.deserialize_type_proto_for_shape(found)
    if shape is not None:
        value.shape = shape
    if found.tensor_type.elem_type:
        value.dtype = ir.DataType(found.tensor_type.elem_type)


def inferred_types(model: onnx.ModelProto, opset: int = 0) -> dict[str, onnx.TypeProto]:
    """The type ONNX shape inference gives each value of `model` and its subgraphs, by name. It
    runs on a skeleton whose weights are typed inputs: serializing them fails at 2 GiB, staged ones
    cannot be read at all, and weights are never shape tensors. `opset` raises the default-domain
    opset for inference alone (how a newer opset would type the graph). A graph inference cannot
    read keeps what it declares, silently: it is still matched and converted."""
    skeleton = weightless(model, opset)
    try:
        skeleton = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - onnx raises bare errors; the declared types stay
        pass
    return _value_types(skeleton.graph)


def weightless(model: onnx.ModelProto, opset: int = 0) -> onnx.ModelProto:
    """`model` with its weights as typed graph inputs, what shape inference (onnx's, ONNX Runtime's
    symbolic one) reads instead: small tensors stay, as they may be shapes. `opset` raises the
    default-domain opset."""
    graph = model.graph
    inputs = {value.name for value in graph.input}
    weights = [t for t in graph.initializer if is_external(t) or t.ByteSize() > _SHAPE_RELEVANT_BYTES]
    heavy = {t.name for t in weights}
    weight_inputs = [onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                     for t in weights if t.name not in inputs]
    skeleton_graph = onnx.helper.make_graph(
        graph.node, graph.name, list(graph.input) + weight_inputs, graph.output,
        [t for t in graph.initializer if t.name not in heavy], value_info=graph.value_info)
    opsets = [onnx.helper.make_opsetid(o.domain, max(o.version, opset) if o.domain in ("", "ai.onnx") else o.version)
              for o in model.opset_import]
    return onnx.helper.make_model(skeleton_graph, opset_imports=opsets, functions=model.functions,
                                  ir_version=model.ir_version)


def _value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """The type of every value `graph` and its subgraphs declare, by name."""
    return {value.name: value.type for each in [graph, *(body for _, body in bodies(graph))]
            for value in [*each.input, *each.value_info, *each.output]}


def held_graphs(node: ir.Node) -> list[ir.Graph]:
    """The If branches and Loop/Scan bodies `node` holds, read from its attributes' plain dict:
    onnx-ir's RecursiveGraphIterator and `Model.graphs()` go through every node's attributes by
    generic Mapping iteration, 0.03 s over a 96-layer encoder that holds no subgraph at all."""
    found: list[ir.Graph] = []
    for attribute in node.attributes.data.values():
        if attribute.type == ir.AttributeType.GRAPH:
            found.append(attribute.as_graph())
        elif attribute.type == ir.AttributeType.GRAPHS:
            found.extend(attribute.as_graphs())
    return found


def nested_graphs(graph: ir.Graph) -> list[tuple[ir.Node, ir.Graph]]:
    """Every subgraph of `graph` at any depth, with the node holding it, outermost first."""
    found: list[tuple[ir.Node, ir.Graph]] = []
    for node in graph:
        for body in held_graphs(node):
            found += [(node, body), *nested_graphs(body)]
    return found


def node_name(node: ir.Node, position: int) -> str:
    """A node's name, or its op type and position for an unnamed one (how reports name it)."""
    return node.name or f"{node.op_type}#{position}"


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


class FreshNames:
    """Tensor and node names the graph does not hold yet: a stem, else the stem and a counter (as
    onnx-graphsurgeon does). onnx-ir names what is left unnamed, but a Cast that should say what it
    rounds (`x_round`, `x_fp32`) needs a name from a stem."""

    def __init__(self, graph: ir.Graph, bodies: list[tuple[ir.Node, ir.Graph]] | None = None):
        """Names in `graph` and its subgraphs at any depth (`bodies`, when the caller has found
        them already): a node added to a branch is named apart from the outer graph's too."""
        self.taken: set[str | None] = set()
        for each in [graph, *(body for _, body in (nested_graphs(graph) if bodies is None else bodies))]:
            self.taken.update(each.initializers, (value.name for value in each.inputs))
            for node in each:
                self.taken.add(node.name)
                self.taken.update(value.name for value in node.outputs)

    def fresh(self, stem: str) -> str:
        candidates = itertools.chain([stem], (f"{stem}_{count}" for count in itertools.count(1)))
        name = next(name for name in candidates if name not in self.taken)
        self.taken.add(name)
        return name


def coarsest_floats(graph: ir.Graph, type_of: Callable[[ir.Value], int | None] | None = None,
                    ) -> dict[ir.Value, int | None]:
    """For every value of `graph`, the float type with the fewest mantissa bits among it and every
    tensor it is computed from: once a value was rounded to fp16 or bf16 on its way, a change
    before that rounding can move it by one step of that type, and it is judged at that type's
    tolerance. One pass in graph order (each node's outputs from its inputs'), not a walk up the
    graph per value: a check of every fused norm of a 96-layer encoder asks for 200 values.
    `type_of`: each value's element type where the values themselves are not typed (fusion keeps
    what inference says beside them)."""
    def own(value: ir.Value) -> int | None:
        found = type_of(value) if type_of is not None else _own_float(value)
        return found if found in FLOAT_PRECISION else None

    floats: dict[ir.Value, int | None] = {value: own(value) for value in [*graph.inputs,
                                                                          *graph.initializers.values()]}
    for node in graph:
        upstream = _coarser(*(floats[value] if value in floats else own(value)
                              for value in node.inputs if value is not None))
        for output in node.outputs:
            floats[output] = _coarser(own(output), upstream)
    return floats


def _own_float(value: ir.Value) -> int | None:
    return int(value.dtype) if isinstance(value.type, ir.TensorType) and value.dtype in FLOAT_PRECISION else None


def _coarser(*types: int | None) -> int | None:
    return min((t for t in types if t is not None), key=FLOAT_PRECISION.__getitem__, default=None)
