"""How the precision steps and the plugin rewrite read a graph: on onnx-ir, each value typed and
shaped as ONNX shape inference finds them (which tensors are float32 decides what a low precision
changes; the plugin needs a norm's dims), nodes named as islands and reports name them, and their
module scopes. onnx-ir's inference pass leaves big weights out (they are never shape tensors, and
serializing them fails at 2 GiB), and staged weights stay unread."""

import itertools

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from ticknorm.base.scopes import SCOPE_KEY


def typed(model: onnx.ModelProto, opset: int = 0) -> ir.Model:
    """`model` on onnx-ir, typed by inference where it succeeds and as declared elsewhere. `opset`
    raises the view's default-domain opset for inference alone (the caller only reads the view)."""
    view = ir.from_proto(model)
    if default_opset(view) < opset:
        view.opset_imports[""] = opset
    # Staged weights, small ones too, go to inference as typed inputs: ONNX cannot read their files.
    staged = {value: value.const_value for value in view.graph.initializers.values()
              if isinstance(value.const_value, ir.ExternalTensor)}
    for value in staged:
        value.const_value = None
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(view)
    for value, tensor in staged.items():
        value.const_value = tensor
    return view


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def node_name(node: ir.Node, position: int) -> str:
    """A node's name, or its op type and position for an unnamed one."""
    return node.name or f"{node.op_type}#{position}"


def scope(node: ir.Node) -> str:
    """The module a node computes for ('' for the root or none recorded)."""
    return node.metadata_props.get(SCOPE_KEY) or ""


class FreshNames:
    """Tensor and node names the graph does not hold yet: a stem, else the stem and a counter."""

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
