"""Model-local functions (`ModelProto.functions`), inlined at their call sites.

An exporter may put a module's ops in a function (TorchScript's `export_modules_as_functions`,
onnxscript-built models): a norm inside one is invisible to a matcher that walks the graph, and
its ops have no types until a call site gives them. ONNX Runtime inlines local functions when it
loads a model; ticknorm inlines them the same way to reach the norms, and gives every inlined node
the scope of its call (the module that called the function)."""

import onnx

from ticknorm.base.graph import rebuilt
from ticknorm.base.scopes import get_scope, scope_from_exporter, set_scope

# Nested calls are inlined in rounds; a function that calls itself is no model anyone exports.
_ROUNDS = 16


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
    """`model` with every call of a local function replaced by the function's nodes (inputs and
    outputs wired to the call's, inner values renamed after the call, attribute references
    resolved); None when it calls none. The weights are shared with `model`, not copied."""
    functions = {(f.domain, f.name): f for f in model.functions}
    nodes = list(model.graph.node)
    if not called_functions(model):
        return None
    for _ in range(_ROUNDS):
        expanded, changed = [], False
        for number, node in enumerate(nodes):
            function = functions.get((node.domain, node.op_type))
            if function is None:
                expanded.append(node)
                continue
            changed = True
            expanded += _inlined_call(node, function, f"{node.name or node.op_type}#{number}")
        nodes = expanded
        if not changed:
            break
    inlined = rebuilt(model, nodes, list(model.graph.initializer))
    called = {(n.domain, n.op_type) for n in nodes}
    del inlined.functions[:]
    inlined.functions.extend(f for f in model.functions if (f.domain, f.name) in called)  # none, unless nested too deep
    return inlined


def _inlined_call(call: onnx.NodeProto, function: onnx.FunctionProto, prefix: str) -> list[onnx.NodeProto]:
    scope = get_scope(call)
    if scope is None:
        scope = scope_from_exporter(call) or ""
    names = dict(zip(function.input, call.input))
    names.update(zip(function.output, call.output))
    given = {a.name: a for a in call.attribute}
    defaults = {a.name: a for a in function.attribute_proto}
    inlined = []
    for inner in function.node:
        node = onnx.NodeProto()
        node.CopyFrom(inner)
        node.name = f"{prefix}/{inner.name or inner.op_type}"
        node.input[:] = [names.get(name, f"{prefix}/{name}") if name else "" for name in inner.input]
        node.output[:] = [names.get(name, f"{prefix}/{name}") if name else "" for name in inner.output]
        attributes = []
        for attribute in node.attribute:
            if attribute.ref_attr_name:
                source = given.get(attribute.ref_attr_name) or defaults.get(attribute.ref_attr_name)
                if source is None:
                    continue  # an optional attribute the call left out
                resolved = onnx.AttributeProto()
                resolved.CopyFrom(source)
                resolved.name = attribute.name
                attributes.append(resolved)
            else:
                attributes.append(attribute)
        del node.attribute[:]
        node.attribute.extend(attributes)
        set_scope(node, scope)
        inlined.append(node)
    return inlined
