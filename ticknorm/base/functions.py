"""Model-local functions (`ModelProto.functions`), inlined at their call sites.

An exporter may put a module's ops in a function (TorchScript's `export_modules_as_functions`,
onnxscript-built models): a norm inside one is invisible to a matcher that walks the graph, and
its ops have no types until a call site gives them. ONNX Runtime inlines local functions when it
loads a model; ticknorm inlines them the same way to reach the norms, and gives every inlined node
the scope of its call (the module that called the function)."""

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass

from ticknorm.base.scopes import SCOPE_KEY, exporter_scope


def called_functions(model: onnx.ModelProto) -> dict[str, int]:
    """Each local function the main graph calls (`domain::name`, or `name` in the default domain)
    -> how many nodes call it."""
    local = {(f.domain, f.name) for f in model.functions}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if (node.domain, node.op_type) in local:
            name = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            counts[name] = counts.get(name, 0) + 1
    return counts


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`model` with every call of a local function replaced by the function's nodes (onnx-ir's
    InlinePass: inputs and outputs wired to the call's, attribute references resolved), each
    inlined node on the scope of its call; None when it calls none. `model` is left as it was."""
    if not called_functions(model):
        return None
    inlined = ir.from_proto(model)
    for node in inlined.graph:  # InlinePass copies a call's metadata onto its nodes: the call's scope alone
        if node.op_identifier() in inlined.functions:
            scope = node.metadata_props.get(SCOPE_KEY)
            scope = exporter_scope(node.name or "", node.metadata_props) if scope is None else scope
            node.metadata_props.clear()
            node.metadata_props[SCOPE_KEY] = scope or ""
    for function in inlined.functions.values():
        for node in function:
            node.metadata_props.pop(SCOPE_KEY, None)  # the call's scope, not one a function's node brought
    InlinePass()(inlined)
    RemoveUnusedFunctionsPass()(inlined)
    return ir.to_proto(inlined)
