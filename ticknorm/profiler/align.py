"""Runtime layer names -> ONNX nodes -> PyTorch modules.

ONNX Runtime keeps a node's name and appends what fused it (`node_matmul/MatMulScaleFusion/`,
`/layers.0/attention/MatMul/MatMulScaleFusion/`); TensorRT joins fused layers with ` + `, wraps
Myelin regions as `{ForeignNode[first...last]}` (every node from first to last in graph order)
and adds `Reformatting CopyNode for ...` layers of its own."""

import re

import onnx

from ticknorm.base.graph import all_nodes, bodies
from ticknorm.base.scopes import NON_COMPUTING, annotate_scopes, get_scope, set_scope

_FOREIGN = re.compile(r"\{ForeignNode\[(.*?)\.\.\.(.*?)\]\}")


class ScopeTable:
    """Every node's module, subgraphs' nodes included (a runtime times a merged decoder's If and
    each node of the branch it took), and which nodes hold subgraphs."""

    def __init__(self, model: onnx.ModelProto):
        nodes = all_nodes(model.graph)
        self.order = [node.name for node in nodes]
        self.position = {name: index for index, name in enumerate(self.order)}
        self.scope = {node.name: get_scope(node) or "" for node in nodes}
        self.holders = {holder.name for holder, _ in bodies(model.graph)}
        # by each module's first computing node: exporters hoist constants (and weight aliases) up
        self.module_order: dict[str, int] = {}
        for node in sorted(nodes, key=lambda n: n.op_type in NON_COMPUTING):
            self.module_order.setdefault(get_scope(node) or "", len(self.module_order))

    def learn_rewritten(self, original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
        """Scopes for nodes a runtime created (ORT's SkipLayerNormalization, BiasGelu, Transpose
        optimizer tokens, the nodes of local functions it inlined): a node keeps its scope where
        it kept its name, a fused node where it keeps the output tensor of what it replaced; the
        rest borrow from their readers, then their producers (`annotate_scopes`)."""
        producer_scope = {out: get_scope(node) or "" for node in all_nodes(original.graph) for out in node.output}
        for node in all_nodes(rewritten.graph):
            scope = self.scope.get(node.name)
            if scope is None:
                scope = next((producer_scope[t] for t in node.output if t in producer_scope), None)
            if scope is not None:
                set_scope(node, scope)
        annotate_scopes(rewritten)
        for node in all_nodes(rewritten.graph):
            self.scope.setdefault(node.name, get_scope(node) or "")

    def node_for(self, runtime_name: str) -> str | None:
        """The ONNX node a runtime-renamed node came from: the longest `/`-prefix that is a node."""
        name = runtime_name
        while name:
            if name in self.scope:
                return name
            name = name.rstrip("/").rpartition("/")[0] if "/" in name.rstrip("/") else ""
        return None

    def modules_for_ort(self, ort_name: str) -> tuple[str, ...]:
        node = self.node_for(ort_name)
        return (self.scope[node],) if node is not None else ()

    def modules_for_trt(self, layer_name: str) -> tuple[str, ...]:
        nodes = []
        for part in layer_name.split(" + "):
            foreign = _FOREIGN.search(part)
            if foreign:
                first, last = (self.node_for(n.strip()) for n in foreign.groups())
                if first is not None and last is not None:
                    low, high = sorted((self.position[first], self.position[last]))
                    nodes.extend(self.order[low:high + 1])
                continue
            node = self.node_for(part.strip())
            if node is not None:
                nodes.append(node)
        return tuple(sorted({self.scope[n] for n in nodes}))
