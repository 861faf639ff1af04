"""The norm families as onnxscript patterns, written as the math:

    LayerNorm: (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)
    RMSNorm:   x / sqrt(mean(x^2) + eps)

and the LayerNorms other frameworks write: the variance as mean(x^2) - mean(x)^2 (Flax/JAX), the
scale and bias folded into x * g + (beta - mean * g), g = gamma / sqrt(var + eps) (TF/Keras).

each piece in every spelling exporters write (`spellings`). `check` says why a structural match is
refused (`NotFused`, with the reason the report keeps) or is no candidate at all (a failed
`MatchResult`: a LayerNorm's tail is no RMSNorm). Only matching is the rewriter's: the rules are
matched at each division (`find_norms`) and the fused nodes are built by `rewrite`, because the
rewriter matches backwards from one output node, while a norm's optional tail (the per-feature
scale and bias, the Cast back out of an fp32 island) is read forwards and decides which node the
fused one replaces (`norms.complete_match`); and because fusion decides the target opset only
once it has seen every norm.
"""

import abc
from dataclasses import replace
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter.pattern import MatchResult, PatternBase

from ticknorm.exporter.fusion.norms import (Finding, NormMatch, NormRefusal, NotFused, complete_match, layout_of,
                                            refusal)
from ticknorm.exporter.fusion.spellings import (DIVISIONS, divided, epsilon, floored, folded, inverse_problem, lifted,
                                                mean, mean_of, moments_problem, reduces, root, square, square_problem,
                                                squared_mean, tail_problem, uncast)
from ticknorm.exporter.fusion.values import NodeNames, constant, producer, readers


class _NormRule(PatternBase):
    """A norm family matched where its division is spelled `division` (`spellings.DIVISIONS`)."""

    kind = ""
    takes_fed = True  # a scale or bias fed as a graph input may be the fused node's (`norms.complete_match`)

    def __init__(self, division: str):
        super().__init__(f"{self.kind}/{division}")
        self.division = division

    @abc.abstractmethod
    def axes(self, bindings: dict[str, Any]) -> tuple[int, ...]:
        """The normalized axes of a match that `check` passed."""

    def completed(self, match: NormMatch, bindings: dict[str, Any]) -> NormMatch:
        """`match` with what the rule itself bound of its scale and bias (`FoldedLayerNormRule`)."""
        return match


class LayerNormRule(_NormRule):
    kind = "LayerNorm"

    def pattern(self, op, x):
        # Two means of x may center it (TorchScript's var_mean): one for the variance, one for
        # the numerator; mostly they are one node. A mixed-precision one lifts the centered fp16
        # tensor into fp32 for the variance and the division (`lifted`).
        centered = lifted(op, op.Sub(x, mean(op, x, "center"), _outputs=["centered"]))
        variance = mean(op, square(op, op.Sub(x, mean(op, x, "center_v"))), "variance")
        return divided(op, centered, root(op, variance), self.division)

    # The rewriter passes the pattern's bindings by name, and onnxscript's own rules name them as
    # parameters too; PatternBase declares `check(self, op, *args, **kwargs)`, which no such override matches.
    def check(self, context, x, center, center_v, variance, **bound):  # type: ignore[override]
        means = mean_of(center), mean_of(center_v)
        if any(m.problem for m in means) or means[0].axes != means[1].axes:
            return MatchResult().fail("x is not centered by its mean")
        if square_problem(bound, means[1].output) or inverse_problem(bound, bound["root"]):
            return MatchResult().fail("not a square root's inverse")
        anchor, axes, spread = means[1].nodes[0], means[1].axes, mean_of(variance)
        # where x is first centered; a reduction of x Cast up reads no x itself
        first = next((n for n in readers(x) if n in (means[0].nodes[0], anchor)), means[0].nodes[0])
        if spread.problem:
            raise NotFused(spread.problem, spread.problem_node or first, context.nodes)
        if spread.axes != axes:
            raise NotFused(f"the mean is over axes {list(axes)} but the variance over {list(spread.axes)}", first,
                           context.nodes)
        problem, node = tail_problem(bound, variance)
        if problem:
            raise NotFused(problem, node or anchor, context.nodes)
        return MatchResult()

    def axes(self, bindings: dict[str, Any]) -> tuple[int, ...]:
        return mean_of(bindings["center"]).axes


class MomentsLayerNormRule(LayerNormRule):
    """LayerNorm with the variance taken as E[x^2] - E[x]^2 (Flax/JAX), maybe clamped at 0. The fused
    LayerNormalization centers first: the two differ by rounding, which verification judges."""

    def pattern(self, op, x):
        centered = op.Sub(x, mean(op, x, "center"), _outputs=["centered"])
        spread = op.Sub(mean(op, square(op, x), "variance"), squared_mean(op, mean(op, x, "center_v")))
        return divided(op, centered, root(op, floored(op, spread)), self.division)

    def check(self, context, x, center, center_v, variance, **bound):  # type: ignore[override]  # as LayerNormRule
        problem = moments_problem(bound, x)
        if problem:
            raise NotFused(problem, mean_of(center).nodes[0], context.nodes)
        return super().check(context, x, center, center_v, variance, **bound)


_FOLDED = ("folded", "folded-offset-first")  # the Add's operand orders, each a rule of its own (`folded`)


class FoldedLayerNormRule(LayerNormRule):
    """TF/Keras's LayerNorm: x * g + (beta - mean * g), g = gamma / sqrt(var + eps). Its output is no
    normalized value times a scale, so the rule takes gamma and beta from its own bindings, and
    composes constants only: a fed scale after the offset stays its own Mul."""

    takes_fed = False

    def pattern(self, op, x):
        variance = mean(op, square(op, op.Sub(x, mean(op, x, "center_v"))), "variance")
        return folded(op, x, mean(op, x, "center"), root(op, variance), self.division == _FOLDED[1])

    def completed(self, match: NormMatch, bindings: dict[str, Any]) -> NormMatch:
        """gamma and beta composed with a scale and bias `complete_match` took after the offset."""
        gamma, beta = (match.layout.feature_param(constant(bindings.get(name))) for name in ("gamma", "beta"))
        if beta is None or gamma is None and bindings.get("gamma") is not None:
            raise NotFused("the folded scale or offset is not a per-feature constant")
        after = 1.0 if match.scale is None else match.scale
        scale = match.scale if gamma is None else gamma * after
        bias = beta * after + (0.0 if match.bias is None else match.bias)
        dims = match.dims or match.layout.static_dims(scale, bias)
        if dims is None:
            raise NotFused("the folded scale and offset do not share one shape over the normalized dims")
        return replace(match, scale=scale, bias=bias, dims=dims)


class RMSNormRule(_NormRule):
    kind = "RMSNorm"

    def pattern(self, op, x):
        return divided(op, x, root(op, mean(op, square(op, x), "variance")), self.division)

    def check(self, context, x, variance, **bound):  # type: ignore[override]  # bindings by name, as in LayerNormRule
        before = producer(uncast(x))
        if before is not None and before.op_type == "Sub" and reduces(before.inputs[1], before.inputs[0]):
            return MatchResult().fail("a LayerNorm's tail")
        spread = mean_of(variance)
        if spread.problem or square_problem(bound, x) or inverse_problem(bound, bound["root"]):
            return MatchResult().fail("a sum of squares that is no mean: not an RMSNorm candidate")
        problem, node = tail_problem(bound, variance)
        if problem:
            raise NotFused(problem, node or spread.source.producer(), context.nodes)
        return MatchResult()

    def axes(self, bindings: dict[str, Any]) -> tuple[int, ...]:
        return mean_of(bindings["variance"]).axes


class LiftedRMSNormRule(RMSNormRule):
    """RMSNorm of an fp16 x Cast up twice, once for the variance and once for the numerator
    (TorchScript's T5 RMSNorm in fp16: x.to(float32).pow(2).mean(), then x * rsqrt(.) promotes
    x again): x binds to the fp16 tensor both Casts read."""

    def pattern(self, op, x):
        numerator = op.Cast(x, _allow_other_attributes=True)
        return divided(op, numerator, root(op, mean(op, square(op, x), "variance")), self.division)


# Which rules may match at a node, by how it divides: most nodes are no division by a root, and
# asking every rule at every node cost fusion a 96-layer encoder's time again.
_RULES_AT = {division: [LayerNormRule(division), MomentsLayerNormRule(division), RMSNormRule(division),
                        LiftedRMSNormRule(division)] for division in DIVISIONS}
_RULES_AT |= {folded: [FoldedLayerNormRule(folded)] for folded in _FOLDED}
_ROOTS = ("Sqrt", "Add")


def _root_spellings(node: ir.Node) -> list[str]:
    """The division spellings `node` may be the last step of, from the ops just above it."""
    if node.op_type not in ("Div", "Mul", "Add") or len(node.inputs) != 2 or None in node.inputs:
        return []
    if node.op_type == "Add":  # x * g + (beta - mean * g)
        return [spelling for spelling, ops in zip(_FOLDED, (["Mul", "Sub"], ["Sub", "Mul"]))
                if list(map(_op, node.inputs)) == ops]
    if node.op_type == "Div":
        return ["div"] if _op(node.inputs[1]) in _ROOTS else []
    return [spelling for spelling, value in zip(("mul-inverse-first", "mul"), node.inputs) if _inverts_a_root(value)]


def _op(value: ir.Value | None) -> str:
    node = producer(value)
    return "" if node is None else node.op_type


def _inverts_a_root(value: ir.Value | None) -> bool:
    """Reciprocal(root) or Div(1, root), maybe times 1.0, maybe Cast, as far as the ops say."""
    node = producer(uncast(value))
    if node is not None and node.op_type == "Mul" and len(node.inputs) == 2:
        node = next((producer(v) for v in node.inputs if _op(v) in ("Reciprocal", "Div")), None)
    if node is None or node.op_type not in ("Reciprocal", "Div") or _op(node.inputs[-1]) not in _ROOTS:
        return False
    return node.op_type == "Reciprocal" or _op(node.inputs[0]) in ("", "Constant")  # 1 / root, not d / root


def find_norms(graph: ir.Graph) -> list[Finding]:
    """Every decomposed LayerNorm and RMSNorm of `graph` (not of its subgraphs): NormMatch when
    fusable, NormRefusal otherwise; LayerNorms first, each family in graph order."""
    names = NodeNames(graph)
    found: dict[str, list[Finding]] = {"LayerNorm": [], "RMSNorm": []}
    claimed: set[ir.Node] = set()
    seen: set[ir.Node | tuple[str, str]] = set()
    for node in graph:
        for rule in [rule for division in _root_spellings(node) for rule in _RULES_AT[division]]:
            result = _try(rule, graph, node, names)
            if result is None:
                continue
            claimed.update(result[1])
            key = (result[0].node, result[0].reason) if isinstance(result[0], NormRefusal) else node
            if key not in seen:
                seen.add(key)
                found[rule.kind].append(result[0])
            break
    return found["LayerNorm"] + _uncentered(graph, claimed, names) + found["RMSNorm"]


def _try(rule: _NormRule, graph: ir.Graph, node: ir.Node, names: NodeNames) -> tuple[Finding, list[ir.Node]] | None:
    """(NormMatch or NormRefusal, the nodes matched) when `rule` matches at `node`, else None."""
    try:
        # onnxscript types `model` as an ir.Model, yet only hands it to the check's context (its matcher
        # drops it, a TODO there says the parameter should go); these checks never read it, and a body
        # graph has no model of its own to pass.
        match = rule.match(None, graph, node, check_nodes_are_removable=False)  # type: ignore[arg-type]
    except NotFused as error:
        return refusal(rule.kind, error, names), error.nodes
    if not match:
        return None
    bound = match.bindings
    source, nodes = bound["x"], list(match.nodes)
    try:
        layout = layout_of(source, rule.axes(bound))
        norm = complete_match(rule.kind, source, layout, nodes, node.outputs[0], epsilon(bound, bound["variance"]),
                              names, rule.takes_fed)
        return rule.completed(norm, bound), nodes
    except NotFused as error:
        error.node = error.node or names.in_graph_order(nodes)[0]
        return refusal(rule.kind, error, names), nodes


def _uncentered(graph: ir.Graph, claimed: set[ir.Node], names: NodeNames) -> list[NormRefusal]:
    """x - mean(x) that no LayerNorm rule matched, with what is missing: a variance, or the
    division by its root."""
    refused = []
    for node in graph:
        if node.op_type != "Sub" or node in claimed:
            continue
        x, subtracted = node.inputs[0], node.inputs[1]
        if subtracted is not None and reduces(subtracted, x):
            center = mean_of(subtracted)
            if not center.problem:
                reason = ("sqrt(variance + epsilon) does not divide the centered input" if _averaged_square(node)
                          else "no variance: nothing averages the square of x - mean(x)")
                refused.append(refusal("LayerNorm", NotFused(reason, center.nodes[0]), names))
    return refused


def _averaged_square(centered: ir.Node) -> bool:
    d = centered.outputs[0]
    lifts = [d] + [use.node.outputs[0] for use in d.uses() if use.node.op_type == "Cast"]
    squares = [use.node for value in lifts for use in value.uses() if use.node.op_type in ("Pow", "Mul")]
    means = ("ReduceMean", "ReduceSum")
    return any(use.node.op_type in means for square in squares for use in square.outputs[0].uses())
