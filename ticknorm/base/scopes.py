"""The module scope of every ONNX node: the fact that joins PyTorch modules, ONNX nodes and
runtime layers. Stored in each node's `metadata_props` under `ticknorm.scope`."""

import ast
import contextlib
import fnmatch
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from ticknorm.base.graph import all_nodes, bodies, if_branches

SCOPE_KEY = "ticknorm.scope"
# Ops that compute nothing, which TorchScript leaves unnamed and hoists to the top of a graph: they
# serve the module of the node that reads them.
NON_COMPUTING = ("Constant", "Identity")
_DYNAMO_KEY = "pkg.torch.onnx.name_scopes"


def get_scope(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            return prop.value
    return None


def node_scope(node: ir.Node) -> str:
    """The module an onnx-ir node computes for ('' for the root or none recorded)."""
    return node.metadata_props.get(SCOPE_KEY) or ""


def set_scope(node: onnx.NodeProto, scope: str) -> None:
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            prop.value = scope
            return
    node.metadata_props.add(key=SCOPE_KEY, value=scope)


def scope_from_exporter(node: onnx.NodeProto, module_paths: frozenset[str] = frozenset()) -> str | None:
    """The module path the exporter recorded, or None when it recorded none (see `exporter_scope`);
    a Paddle2ONNX node's from the tensor it makes when its name carries no layer."""
    found = exporter_scope(node.name, {prop.key: prop.value for prop in node.metadata_props}, module_paths)
    return found if found is not None else _paddle_scope(node)


def exporter_scope(name: str, metadata: Mapping[str, str], module_paths: frozenset[str] = frozenset()) -> str | None:
    """The module path an exporter recorded in a node's `name` and `metadata`, or None.

    dynamo: `pkg.torch.onnx.name_scopes` lists cumulative paths, the last entry being the FX node
    (`['', 'layers.0', 'layers.0.ln', 'layer_norm']`). TorchScript: the node name is the module
    path with `/` separators, the last part being the op (`/layers.0/ln/ReduceMean`). tf2onnx: the
    Keras layer path, unrooted, under the function that called it
    (`StatefulPartitionedCall/model/dense_1/MatMul` -> `model.dense_1`).
    """
    if _DYNAMO_KEY in metadata:
        try:
            scopes = ast.literal_eval(metadata[_DYNAMO_KEY])
        except (ValueError, SyntaxError):
            return None
        candidates = scopes[-2::-1]  # innermost first; dynamo adds hook names that are no module
        if module_paths:
            return next((c for c in candidates if c in module_paths), "")
        return candidates[0] if candidates else ""
    if name.startswith("/"):
        return _resolve_torchscript(_module_parts(name), module_paths)
    if _is_tf_name(name):
        return _resolve_torchscript(_tf_parts(name), module_paths)
    return None


# ONNX Runtime names a node it fused after the one it kept, with what fused it appended
# (`/model/norm/Mul_1/SimplifiedLayerNormFusion/`, `.../MatMulScaleFusion//MatmulTransposeFusion/`).
_ORT_FUSIONS = re.compile(r"(/+[A-Za-z0-9]+Fusion)+/*$")


def _module_parts(name: str) -> list[str]:
    """A TorchScript-style node name's module levels: all but the op, ORT's fusion suffixes off."""
    return _ORT_FUSIONS.sub("", name).split("/")[1:-1]


# tf2onnx: the functions a SavedModel's graph runs in (left off), and the name scopes TensorFlow's
# own ops open inside a layer (`LayerNorm_0/moments/mean`, `bn/batchnorm/add`): no Keras layer.
_TF_CALLS = re.compile(r"^((Stateful)?PartitionedCall(_\d+)?/)+")
_TF_OP_SCOPES = frozenset({"moments", "batchnorm", "Tensordot", "einsum", "Reshape", "transpose", "strided_slice"})


def _is_tf_name(name: str) -> bool:
    return "/" in name and not name.startswith("/") and ":" not in name


def _tf_parts(name: str) -> list[str]:
    """A tf2onnx node name's layer levels: the calling functions, the op, and TensorFlow's own
    name scopes after the innermost layer off."""
    parts = _TF_CALLS.sub("", _ORT_FUSIONS.sub("", name)).split("/")[:-1]
    while parts and parts[-1] in _TF_OP_SCOPES:
        parts.pop()
    return parts


# Paddle2ONNX: nodes are named by op and counter (`p2o.LayerNorm.3`), the tensors a layer makes by
# the layer's unique name (`linear_3.tmp_0`, `layer_norm_2.tmp_1`), which is the better scope.
_PADDLE_NODE = re.compile(r"^p2o\.([A-Za-z0-9_]+)\.(\d+)$")
_PADDLE_TENSOR = re.compile(r"^([A-Za-z0-9_]+_\d+)\.tmp_\d+$")


def _paddle_scope(node: onnx.NodeProto) -> str | None:
    """The Paddle layer that made the node's first output (`linear_3`), else the node's own op
    and counter (`p2o.LayerNorm.3` -> `LayerNorm.3`), else None."""
    tensor = _PADDLE_TENSOR.match(node.output[0]) if node.output else None
    if tensor:
        return tensor.group(1)
    named = _PADDLE_NODE.match(node.name)
    return f"{named.group(1)}.{named.group(2)}" if named else None


def _resolve_torchscript(parts: list[str], module_paths: frozenset[str]) -> str:
    """TorchScript names each level by a path that is sometimes relative to its parent
    (`layers.0/attention`), sometimes already full (`layers.0/layers.0.0`), and skips modules
    whose forward was never called (`norm` for `block.norm`). Resolve each level against the
    model's real module paths, leading levels that name no module (a wrapper the file was
    exported through: `/m/encoder/...` for a model whose module is `encoder`) left off; without
    them, join the parts, a level already full taking its parent's place (`inner/inner.0/fc` is
    `inner.0.fc`, as torchvision's `layer1/layer1.0/conv1` is `layer1.0.conv1`)."""
    parts = [p for p in parts if p]
    if not module_paths:
        return _joined(parts)
    while parts and not _names_module(parts[0], module_paths):
        parts = parts[1:]
    path = ""
    for part in parts:
        joined = f"{path}.{part}" if path else part
        if joined in module_paths:
            path = joined
        elif part in module_paths and part.startswith(path):
            path = part
        else:
            below = [m for m in module_paths if m.startswith(path) and (m == part or m.endswith("." + part))]
            path = min(below, key=len) if below else joined
    return path


def _joined(parts: list[str]) -> str:
    path, previous = "", ""
    for part in parts:
        if previous and part.startswith(previous + ".") and path.endswith(previous):
            path = path[:len(path) - len(previous)] + part
        else:
            path = f"{path}.{part}" if path else part
        previous = part
    return path


def _names_module(part: str, module_paths: frozenset[str]) -> bool:
    return part in module_paths or any(m.endswith("." + part) for m in module_paths)


def annotate_scopes(model: onnx.ModelProto, module_paths=()) -> None:
    """Give every node a `ticknorm.scope`, inside If/Loop/Scan bodies too: from the exporter where
    it said one, else borrowed from the node's first reader (constants and shape helpers serve the
    module that reads them), else from its producer, else (in a body) the node holding the body's,
    else the root module ''. `module_paths` (from `named_modules()`) lets TorchScript's partial
    names be resolved to full module paths. Without them, the Keras model's own name that roots
    every tf2onnx name (`model/...`) is left off: it is the root, not a layer."""
    module_paths = frozenset(module_paths)
    fresh = [node for node in all_nodes(model.graph) if get_scope(node) is None]
    _annotate(list(model.graph.node), module_paths, "")
    for holder, body in bodies(model.graph):  # outermost first: a holder has its scope before its body
        _annotate(list(body.node), module_paths, get_scope(holder) or "")
    root = None if module_paths else _tf_root(fresh)
    if root:
        for node in fresh:
            scope = get_scope(node) or ""
            set_scope(node, "" if scope == root else scope.removeprefix(root + "."))


def _tf_root(nodes: list[onnx.NodeProto]) -> str | None:
    """The first level every tf2onnx-named node shares (the Keras model's name), or None: leaving
    it off merges no two layers."""
    roots = {(_tf_parts(node.name) or [""])[0] for node in nodes if _is_tf_name(node.name)}
    return roots.pop() if len(roots) == 1 and "" not in roots else None


def fit_scopes(model: onnx.ModelProto, module_paths) -> None:
    """Move the scopes a file's names gave without the PyTorch model (`ensure_scopes`) onto the
    model's real module paths once it is known: each scope that is no module path becomes what
    its nodes' names resolve to against them (a wrapper prefix left off), where that is one."""
    paths = frozenset(module_paths)
    moved: dict[str, str] = {}
    for node in all_nodes(model.graph):
        scope = get_scope(node)
        if scope and scope not in paths:
            found = scope_from_exporter(node, paths)
            if found is not None and found in paths:
                moved.setdefault(scope, found)
    for node in all_nodes(model.graph):
        scope = get_scope(node)
        if scope in moved:
            set_scope(node, moved[scope])


def _annotate(nodes: list[onnx.NodeProto], module_paths: frozenset[str], fallback: str) -> None:
    scopes = [get_scope(node) or scope_from_exporter(node, module_paths) for node in nodes]
    readers: dict[str, int] = {}
    producers: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, index)
        for name in node.output:
            producers[name] = index
    for index in reversed(range(len(nodes))):
        if scopes[index] is None:
            reader = next((readers[o] for o in nodes[index].output if o in readers), None)
            scopes[index] = scopes[reader] if reader is not None else None
    for index, node in enumerate(nodes):
        scope = scopes[index]
        if scope is None:
            producer = next((producers[i] for i in node.input if i in producers), None)
            borrowed = scopes[producer] if producer is not None else None
            scope = scopes[index] = fallback if borrowed is None else borrowed
        set_scope(node, scope)


def common_scope(scopes) -> str:
    """The deepest module that contains all of `scopes` (what a fused node stands for)."""
    paths = [s.split(".") if s else [] for s in scopes]
    if not paths:
        return ""
    common = paths[0]
    for path in paths[1:]:
        length = 0
        while length < min(len(common), len(path)) and common[length] == path[length]:
            length += 1
        common = common[:length]
    return ".".join(common)


# Where a node's module comes from, most trusted first: ticknorm's own record (resolved against the
# model's module paths at export), the dynamo exporter's name scopes, a TorchScript-style node name
# (`/model/layers.1/input_layernorm/Mul` -> `model.layers.1.input_layernorm`, what Optimum's and
# most hand-made exports carry), a tf2onnx node name (`model/layer_0/LayerNorm_0/moments/mean` ->
# `layer_0.LayerNorm_0`), Paddle2ONNX's tensor or node names (`linear_3.tmp_0` -> `linear_3`,
# `p2o.LayerNorm.3` -> `LayerNorm.3`). Nodes none of them names borrow a neighbour's (see annotate_scopes).
SCOPE_SOURCES = ("ticknorm", "dynamo name scopes", "torchscript node names", "tf2onnx names", "paddle names")


def scope_source(node: onnx.NodeProto) -> str | None:
    if get_scope(node) is not None:
        return SCOPE_SOURCES[0]
    if any(prop.key == _DYNAMO_KEY for prop in node.metadata_props):
        return SCOPE_SOURCES[1]
    if node.name.startswith("/"):
        return SCOPE_SOURCES[2] if any(_module_parts(node.name)) else None
    if _is_tf_name(node.name):
        return SCOPE_SOURCES[3] if any(_tf_parts(node.name)) else None
    return SCOPE_SOURCES[4] if _paddle_scope(node) is not None else None


def scope_sources(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes (subgraphs' included) each source names the module of, and how many no
    source names ("none")."""
    counts = dict.fromkeys((*SCOPE_SOURCES, "none"), 0)
    for node in all_nodes(model.graph):
        counts[scope_source(node) or "none"] += 1
    return counts


def scope_coverage(model: onnx.ModelProto) -> float:
    """Fraction of the nodes that compute (subgraphs' included; Constant and Identity nodes, which
    TorchScript leaves unnamed, borrow their reader's module) whose module some source names
    before neighbours lend theirs."""
    nodes = [node for node in all_nodes(model.graph) if node.op_type not in NON_COMPUTING]
    return sum(scope_source(n) is not None for n in nodes) / len(nodes) if len(nodes) else 1.0


def module_coverage(model: onnx.ModelProto, module_paths) -> float:
    """Fraction of the nodes that compute whose scope is one of the model's modules below the
    root: what per-module rows can be drawn from."""
    paths = frozenset(module_paths) - {""}
    nodes = [node for node in all_nodes(model.graph) if node.op_type not in NON_COMPUTING]
    return sum(get_scope(n) in paths for n in nodes) / len(nodes) if nodes else 0.0


def ensure_scopes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with a `ticknorm.scope` on every node: a file another exporter wrote gets them from
    its own records (`annotate_scopes`), in memory, so every command maps its nodes to modules."""
    if any(get_scope(node) is None for node in all_nodes(model.graph)):
        annotate_scopes(model)
    return model


def module_output_tensors(model: onnx.ModelProto) -> dict[str, str]:
    """Module scope -> the ONNX tensor that is that module's output: the last tensor (in graph
    order) made inside the module's subtree and read outside it, or a graph output. A module that
    lives inside both branches of a top-level If (a merged decoder's layers) gets the name of an
    If output `exposed` adds, which each branch fills with its own tensor of that module."""
    found = _module_outputs(model.graph)
    for module in branch_taps(model):
        found.setdefault(module, TAP_PREFIX + module)
    return found


# The name of the extra If output through which a module inside the branches is fetched.
TAP_PREFIX = "ticknorm.tap/"


# A module's If node and its tensor in the then_branch and in the else_branch.
BranchTap = tuple[onnx.NodeProto, str, str]


def branch_taps(model: onnx.ModelProto) -> dict[str, BranchTap]:
    """Module -> (If node, then_branch tensor, else_branch tensor), for every module both
    branches of a top-level If give an output tensor."""
    taps: dict[str, BranchTap] = {}
    for node in model.graph.node:
        branches = if_branches(node)
        if len(branches) != 2:
            continue
        then_outputs, else_outputs = _module_outputs(branches["then_branch"]), _module_outputs(branches["else_branch"])
        for module in then_outputs.keys() & else_outputs.keys():
            taps.setdefault(module, (node, then_outputs[module], else_outputs[module]))
    return taps


@contextlib.contextmanager
def exposed(model: onnx.ModelProto, names: list[str]) -> Iterator[onnx.ModelProto]:
    """`model` with `names` as extra graph outputs while the block runs, as it was after (no copy
    of the weights): a `TAP_PREFIX` name becomes an output of its If, each branch returning (under
    a name of its own) its tensor of the module."""
    taps = branch_taps(model) if any(name.startswith(TAP_PREFIX) for name in names) else {}
    grown = []  # each repeated field once per entry it got
    for name in names:
        module = name.removeprefix(TAP_PREFIX) if name.startswith(TAP_PREFIX) else None
        if module in taps:
            node, then_tensor, else_tensor = taps[module]
            for branch_name, branch in if_branches(node).items():
                # a name of its own (an Identity): a branch returning one tensor twice fills one output only
                tensor = then_tensor if branch_name == "then_branch" else else_tensor
                copy = f"{name}/{branch_name}"
                branch.node.append(onnx.helper.make_node("Identity", [tensor], [copy], name=copy))
                branch.output.append(onnx.ValueInfoProto(name=copy))
                grown += [branch.node, branch.output]
            node.output.append(name)
            grown.append(node.output)
        model.graph.output.append(onnx.ValueInfoProto(name=name))
        grown.append(model.graph.output)
    try:
        yield model
    finally:
        for field in reversed(grown):
            del field[-1]


# A fused norm's output 0 is what the norm module returns; the others are its statistics, or (ORT's
# Skip* ops, which fold in the residual add before the norm) the residual stream, no module's output.
_NORM_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization"}


def _module_outputs(graph: onnx.GraphProto) -> dict[str, str]:
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        reader_scope = get_scope(node) or ""
        for name in node.input:
            readers.setdefault(name, []).append(reader_scope)
    graph_outputs = {o.name for o in graph.output}
    found: dict[str, str] = {}
    for node in graph.node:
        scope = get_scope(node)
        if not scope:
            continue
        parts = scope.split(".")
        outputs = node.output[:1] if node.op_type in _NORM_OPS else node.output
        for depth in range(1, len(parts) + 1):
            module = ".".join(parts[:depth])
            for name in outputs:
                if name and (name in graph_outputs or any(not _within(r, module) for r in readers.get(name, []))):
                    found[module] = name
    return found


def _within(scope: str, module: str) -> bool:
    return scope == module or scope.startswith(module + ".")


@dataclass(frozen=True)
class LayerSelection:
    """Which modules a per-module comparison taps: every module of the model that the scope map
    gives an output tensor, cut by depth (segments of the path) and a glob on the path, so a large
    model's taps fit in memory."""

    depth: int | None = None
    pattern: str | None = None

    def modules(self, model: onnx.ModelProto, module_paths) -> list[str]:
        known = set(module_paths)
        return [module for module in module_output_tensors(model) if module in known and self.keeps(module)]

    def keeps(self, module: str) -> bool:
        if self.depth is not None and len(module.split(".")) > self.depth:
            return False
        return not self.pattern or fnmatch.fnmatchcase(module, self.pattern)
