"""What is in an ONNX file, with the LayerNorm view nobody else gives: how many are fused, how
many are still decomposed (and why), and how many nodes know their PyTorch module."""

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx
import onnx_ir as ir

from ticknorm.exporter.fusion import norms_in, typed_ir
from ticknorm.base.functions import called_functions, inline_functions
from ticknorm.base.graph import bodies
from ticknorm.exporter.fusion.norms import Finding, NormMatch
from ticknorm.exporter.fusion.report import NORM_OP_RUNTIMES
from ticknorm.base.scopes import ensure_scopes, scope_coverage, scope_sources
from ticknorm.base.inputs import graph_inputs

# Ops of other domains than ONNX's are counted as domain::op (an ORT-optimized file, the plugin target).
FUSED_NORM_OPS = tuple(NORM_OP_RUNTIMES)
# A graph input or output as [name, dims, dtype]; a dim is its size, else its symbolic name or "?".
Described = list[str | list[int | str]]


@dataclass
class ModelSummary:
    opsets: dict[str, int]  # version by domain
    inputs: list[Described]
    outputs: list[Described]
    nodes: int
    op_histogram: dict[str, int]
    fused_norms: int
    decomposed_norms: int  # still decomposed: fusable now, or refused (see `decomposed`)
    decomposed: list[list[str]]  # [kind, scope, "fusable" | reason]
    scope_coverage: float
    scope_sources: dict[str, int]  # by source: the nodes it names the module of
    # calls by local function; `nodes` and the norms count each call inlined
    functions: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in self.opsets.items())
        lines = [f"opset: {opsets}", "inputs:"]
        lines += [f"  {name}: {_shape(dims)} {dtype}" for name, dims, dtype in self.inputs]
        lines += ["outputs:"] + [f"  {name}: {_shape(dims)} {dtype}" for name, dims, dtype in self.outputs]
        lines.append(f"nodes: {self.nodes}" + (" (local functions inlined at their calls: " + ", ".join(
            f"{name} x{calls}" for name, calls in self.functions.items()) + ")" if self.functions else ""))
        width = max((len(op) for op in self.op_histogram), default=0) + 2
        lines += [f"  {op:<{width}}{count}" for op, count in self.op_histogram.items()]
        lines.append(f"LayerNorm/RMSNorm: {self.fused_norms} fused, {self.decomposed_norms} decomposed")
        lines += [f"  {op} x{count}: {NORM_OP_RUNTIMES[op]}" for op, count in self.op_histogram.items()
                  if op in NORM_OP_RUNTIMES]
        lines += [f"  decomposed {kind} at {scope or '(root)'}: {state}" for kind, scope, state in self.decomposed]
        named = ", ".join(f"{source} {count}" for source, count in self.scope_sources.items() if count)
        lines.append(f"node scope coverage: {self.scope_coverage:.1%} of the nodes that compute (sources over all "
                     f"nodes: {named})")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _shape(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def summarize(model: onnx.ModelProto) -> ModelSummary:
    """The file as it is, its scopes counted by source before any is filled in; the decomposed
    norms are then named by the scopes a command would give them."""
    sources, coverage = scope_sources(model), scope_coverage(model)
    ensure_scopes(model)
    functions = called_functions(model)
    model = inline_functions(model) or model  # counted as ONNX Runtime runs them: each call on its own
    inner = bodies(model.graph)  # If branches, Loop/Scan bodies: a merged decoder's whole decoder is there
    nodes = list(model.graph.node) + [node for _, body in inner for node in body.node]
    histogram = Counter(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
                        for node in nodes)
    found = [(m, f" (in {_where(holder, body)})" if holder is not None else "")
             for holder, body, results in norms_in(typed_ir(model)) for m in results]
    decomposed = [[m.kind, m.scope, _state(m) + where] for m, where in found]
    return ModelSummary(
        opsets={o.domain: o.version for o in model.opset_import},
        inputs=[_describe(v) for v in graph_inputs(model)],
        outputs=[_describe(v) for v in model.graph.output],
        nodes=len(nodes),
        op_histogram=dict(histogram.most_common()),
        fused_norms=sum(histogram[op] for op in FUSED_NORM_OPS),
        decomposed_norms=len(found),
        decomposed=decomposed,
        scope_coverage=coverage,
        scope_sources=sources,
        functions=functions,
    )


def _state(found: Finding) -> str:
    return "fusable" if isinstance(found, NormMatch) else found.reason


def _where(holder: ir.Node, body: ir.Graph) -> str:
    """Which subgraph of which node: a merged decoder's norms are there twice, once per branch."""
    attribute = next((name for name, a in holder.attributes.items() if a.type == a.type.GRAPH and a.value is body),
                     "body")
    return f"{attribute} of {holder.op_type} '{holder.name}'"


def _describe(value: onnx.ValueInfoProto) -> Described:
    tensor_type = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower() if tensor_type.elem_type else "?"
    return [value.name, dims, dtype]
