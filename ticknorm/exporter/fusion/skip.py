"""A residual Add that feeds a fused norm, fused into it: ONNX Runtime's SkipLayerNormalization and
SkipSimplifiedLayerNormalization (`com.microsoft`), for graphs meant for ONNX Runtime only.

ONNX Runtime fuses these itself when a session starts at its extended level, but only there: a
graph written with them states what runs (the GenAI builder writes them), and a session with
basic optimizations still runs one kernel instead of two. The node takes the Add's two inputs and
gives the sum as its fourth output, to every other reader of the Add (the next residual).
"""

import onnx
import onnx_ir as ir

from ticknorm.base.graph import FreshNames
from ticknorm.base.scopes import SCOPE_KEY
from ticknorm.base.write_back import rewritten

ORT_DOMAIN = "com.microsoft"
SKIP_OPS = {"LayerNormalization": "SkipLayerNormalization",
            "SimplifiedLayerNormalization": "SkipSimplifiedLayerNormalization"}
_INPUT_RANK = 3  # (batch, sequence, hidden): the Skip ops' input
_NORM_EPSILON = 1e-5  # LayerNormalization's and SimplifiedLayerNormalization's default
# where each Skip op reads the bias of the projection before it: after gamma and beta / after gamma
_BIAS_INPUT = {"LayerNormalization": 2, "SimplifiedLayerNormalization": 1}  # index among the norm's params


def skip_fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with its residual Adds fused into the norms they feed, and how many. Run after the
    norms' own verification, which cuts the graph at each norm's input: the Skip node computes
    that input itself; what checks the result is the run of the whole graph against PyTorch."""
    return rewritten(model, lambda graph: fuse_skips(graph, FreshNames(graph, [])))


def fuse_skips(graph: ir.Graph, names: FreshNames) -> int:
    """Rewrite, in place, each norm over the last axis of a rank-3 Add of two same-shaped tensors;
    returns how many. The fused node keeps the norm's name stem, outputs and scope."""
    fused = 0
    for node in list(graph):
        add = residual_add(node)
        if add is None:
            continue
        epsilon = node.attributes.get("epsilon")  # the Skip ops' own default (1e-12) is not the norms' (1e-5)
        attributes = {"epsilon": _NORM_EPSILON if epsilon is None else epsilon.as_float()}
        first, second, bias, bias_add = _unbiased(add)
        params = list(node.inputs[1:])
        if bias is not None:  # the projection's bias, the Skip op's last input
            params += [None] * (_BIAS_INPUT[node.op_type] - len(params)) + [bias]
        skip = ir.node(SKIP_OPS[node.op_type], [first, second, *params], attributes=attributes,
                       domain=ORT_DOMAIN, num_outputs=4, name=names.fresh(f"{node.name}_skip"))
        for output in skip.outputs[1:]:
            output.name = ""  # mean and inverse std; the sum too unless read (ONNX Runtime writes a named output)
        skip.metadata_props[SCOPE_KEY] = node.metadata_props.get(SCOPE_KEY, add.metadata_props.get(SCOPE_KEY, ""))
        folded = [bias_add] if bias_add is not None else []  # read by the residual Add only
        replaced = [(node.outputs[0], skip.outputs[0])]
        if len(add.outputs[0].uses()) > 1 or add.outputs[0].is_graph_output():  # the next residual reads the sum
            replaced.append((add.outputs[0], skip.outputs[3]))
        old_values, new_values = zip(*replaced, strict=True)
        ir.convenience.replace_nodes_and_values(graph, add, [*folded, add, node], [skip], old_values, new_values)
        fused += 1
    if fused:
        graph.opset_imports.setdefault(ORT_DOMAIN, 1)
    return fused


def _unbiased(add: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value | None, ir.Node | None]:
    """The residual Add's two operands, and the bias of the projection feeding one of them with
    the Add that adds it, taken out of it (as ONNX Runtime's optimizer folds it: BERT's `dense`
    then `+ bias`): that operand is then the projection's output. The bias is a 1-D constant of
    the hidden size, its Add read by the residual one only."""
    first, second = add.inputs
    assert first is not None and second is not None  # `residual_add` checked them
    hidden = first.shape[-1] if first.shape is not None else None
    for index, operand in enumerate((first, second)):
        producer = operand.producer()
        if (producer is None or producer.op_type != "Add" or producer.domain not in ("", "ai.onnx")
                or len(operand.uses()) != 1 or operand.is_graph_output()):
            continue
        for position, candidate in enumerate(producer.inputs):
            other = producer.inputs[1 - position]
            if (candidate is not None and other is not None and candidate.const_value is not None
                    and candidate.shape is not None and candidate.shape.rank() == 1 and candidate.shape[0] == hidden
                    and other.shape is not None and _same_known_shape(other.shape, operand.shape)):
                return (other, second, candidate, producer) if index == 0 else (first, other, candidate, producer)
    return first, second, None, None


def residual_add(node: ir.Node) -> ir.Node | None:
    """The Add a norm `node` can take in, or None: a plain norm over the last axis whose scale
    (and bias) are weights, fed by an Add of two rank-3 tensors of one shape (the Skip ops
    broadcast nothing else)."""
    if node.op_type not in SKIP_OPS or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    axis = node.attributes.get("axis")
    if axis is not None and axis.as_int() not in (-1, _INPUT_RANK - 1):
        return None
    if any(value is None or value.const_value is None or value.shape is None or value.shape.rank() != 1
           for value in node.inputs[1:]):
        return None
    add = node.inputs[0].producer() if node.inputs[0] is not None else None
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    first, second = add.inputs
    if first is None or second is None or first.const_value is not None or second.const_value is not None:
        return None
    if first.shape is None or first.shape.rank() != _INPUT_RANK or not _same_known_shape(first.shape, second.shape):
        return None
    return add


def _same_known_shape(first: ir.Shape, second: ir.Shape | None) -> bool:
    """Whether every dim of the two is known to be the same: equal sizes or one named dim. Two
    unknown dims compare equal in onnx-ir, yet may be 1 and 5 (an Add that broadcasts)."""
    if second is None or first.rank() != second.rank():
        return False
    return all(a == b and (isinstance(a, int) or a.value is not None) for a, b in zip(first, second, strict=True))
