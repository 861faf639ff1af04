"""What fusion asks of an onnx-ir graph about one value: its constant (when reading it is cheap and
safe), its static dims, who reads it. A staged weight (an ExternalTensor) is never read: fusing
must not pull a model's weights into memory, and a norm's scale on disk stays where it is."""

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from ticknorm.base.graph import node_name


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of `value` when fixed at export time: an initializer (not an overridable graph
    input; on disk only when small, as a norm's scale of a staged export is), a Constant node, or
    a Cast/Identity of one. Read once per value."""
    if value is None:
        return None
    if _CONSTANT not in value.meta:
        value.meta[_CONSTANT] = _read_constant(value)
    return value.meta[_CONSTANT]


_CONSTANT = "ticknorm.fusion.constant"
# The largest tensor on disk read as a constant: a per-feature scale or bias of the widest models
# (hidden 16384 in fp32 is 64 KiB), never a weight matrix.
_SMALL_ON_DISK = 1 << 18


def _read_constant(value: ir.Value) -> np.ndarray | None:
    if value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor is not None:
        if isinstance(tensor, ir.ExternalTensor) and (tensor.nbytes > _SMALL_ON_DISK or not tensor.base_dir):
            return None  # a weight matrix (no rule reads one), or a file whose folder nobody said
        try:
            return tensor.numpy()
        except OSError:  # its file is not where the graph says
            return None
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Constant":
        held = node.attributes.get("value")  # read as it is: `get_const_tensor` checks it against
        # TensorProtocol, a typing Protocol whose isinstance was a fifth of matching
        tensor = held.value if held is not None else ir.convenience.get_const_tensor(value)
        return None if tensor is None else tensor.numpy()
    if node.op_type in ("Cast", "Identity"):
        inner = constant(node.inputs[0])
        if inner is None or node.op_type == "Identity":
            return inner
        return inner.astype(ir.DataType(node.attributes["to"].as_int()).numpy())
    return None


def scalar(value: ir.Value | None, beside: ir.Value) -> float | None:
    """A one-element constant that broadcasts with `beside` without raising its rank (a
    [1,1,1,1] epsilon on a rank-3 tensor would change the output's shape)."""
    array = constant(value)
    size = rank(beside)
    if array is None or array.size != 1 or (size is not None and array.ndim > size) or (size is None and array.ndim):
        return None
    return float(array.reshape(-1)[0])


def dims(value: ir.Value | None, deep: bool = False) -> tuple[int | str | None, ...] | None:
    """Sizes as ints, symbolic names as str, unknown as None; None when the rank is unknown (or
    there is no value). What shape inference says first: it refines what the file declares
    (dynamo's unknown dims). `deep`: where that leaves a dim unknown, ask ONNX Runtime's symbolic
    shape inference (`typed.SymbolicTypes`: slow, so only for the dims a fused node needs)."""
    if value is None:
        return None
    if _DIMS not in value.meta:  # read once: the rules ask of the same values again and again
        found = _dims(_inferred(value))
        if found is None and value.shape is not None:
            found = tuple(d if isinstance(d, int) else d.value for d in value.shape)
        value.meta[_DIMS] = found
    found = value.meta[_DIMS]
    if deep and (found is None or None in found):
        return _dims(_inferred(value, "symbolic")) or found
    return found


_DIMS = "ticknorm.fusion.dims"


def _dims(tensor_type) -> tuple[int | str | None, ...] | None:
    if tensor_type is None or not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tensor_type.shape.dim)


def rank(value: ir.Value | None) -> int | None:
    sizes = dims(value)
    return None if sizes is None else len(sizes)


def elem_type(value: ir.Value | None, deep: bool = False) -> int | None:
    """The element type; `deep`: from ONNX Runtime's symbolic shape inference where nothing else
    says (as in `dims`)."""
    if value is None:
        return None
    tensor_type = _inferred(value)
    if tensor_type is not None and tensor_type.elem_type:
        return tensor_type.elem_type
    if value.dtype is not None:
        return int(value.dtype)
    array = constant(value)
    if array is not None:
        return int(ir.DataType.from_numpy(array.dtype))
    tensor_type = _inferred(value, "symbolic") if deep else None
    return tensor_type.elem_type or None if tensor_type is not None else None


def _inferred(value: ir.Value, by: str = "inferred"):
    """What shape inference said of `value` (`typed.typed_ir`), a TypeProto's tensor_type: ONNX's,
    or ONNX Runtime's symbolic one."""
    graph = value.graph
    types = None if graph is None else graph.meta.get(by)
    found = None if types is None else types.get(value.name)
    return found.tensor_type if found is not None and found.HasField("tensor_type") else None


def readers(value: ir.Value) -> list[ir.Node]:
    return list(dict.fromkeys(use.node for use in value.uses()))


def sole_reader(value: ir.Value, ignore_shape_readers: bool = False) -> ir.Node | None:
    """The one node reading `value`, or None when several do or it leaves the graph.
    `ignore_shape_readers`: Shape nodes read only metadata (dynamo's dynamic Reshape targets)."""
    nodes = [n for n in readers(value) if not (ignore_shape_readers and n.op_type == "Shape")]
    return nodes[0] if len(nodes) == 1 and not escapes(value) else None


def escapes(value: ir.Value) -> bool:
    """A graph output, or read inside an If/Loop/Scan body: a fusion may not remove it."""
    return value.is_graph_output() or any(use.node.graph is not value.graph for use in value.uses()
                                           if value.graph is not None)


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The operand of a binary node that is not `value` (the first one when both are)."""
    return node.inputs[1] if node.inputs[0] is value else node.inputs[0]


def producer(value: ir.Value | None) -> ir.Node | None:
    """The node computing `value`; None for a graph input, an initializer or a missing input."""
    return None if value is None else value.producer()


def attribute(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


class NodeNames(dict[ir.Node, str]):
    """Each node's name for the report (an unnamed one by its op and position), and its position."""

    def __init__(self, graph: ir.Graph):
        super().__init__((node, node_name(node, i)) for i, node in enumerate(graph))
        self.position: dict[ir.Node, int] = {node: i for i, node in enumerate(self)}

    def in_graph_order(self, nodes: Iterable[ir.Node]) -> list[ir.Node]:
        return sorted(nodes, key=self.position.__getitem__)
