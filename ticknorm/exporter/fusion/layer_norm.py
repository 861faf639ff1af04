"""Find decomposed LayerNorms: (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * scale + bias."""

from ticknorm.exporter.fusion.graph import GraphIndex
from ticknorm.exporter.fusion.norms import NormMatch, NormRefusal, complete_match, refusal
from ticknorm.exporter.fusion.patterns import NotFused, forward_means, layout_of, match_tail, squares_of

KIND = "LayerNorm"


def find_layer_norms(index: GraphIndex) -> list[NormMatch | NormRefusal]:
    """One result per (input, axes) that is centered by subtracting its own mean."""
    results = []
    for source in _reduced_tensors(index):
        groups: dict[tuple, tuple[list, list]] = {}
        for mean in forward_means(index, source):
            subs = [r for r in index.consumer_nodes(mean.output)
                    if index.nodes[r].op_type == "Sub" and list(index.nodes[r].input) == [source, mean.output]]
            if not subs or mean.problem:
                continue
            group = groups.setdefault(mean.axes, ([], []))
            group[0].append(mean)
            group[1].extend(subs)
        for axes, (means, subs) in groups.items():
            try:
                results.append(_match(index, source, axes, means, subs))
            except NotFused as error:
                results.append(refusal(index, KIND, means[0].nodes[0], error))
    return results


def _reduced_tensors(index: GraphIndex) -> list[str]:
    seen = {}
    for node in index.nodes:
        if node.op_type in ("ReduceMean", "ReduceSum"):
            seen.setdefault(node.input[0], None)
    return list(seen)


def _match(index: GraphIndex, source: str, axes: tuple, means: list, subs: list) -> NormMatch:
    centered = {index.nodes[s].output[0] for s in subs}
    variance, front = _find_variance(index, centered, axes)
    tail = match_tail(index, variance, centered)
    front = front + subs + [n for mean in means for n in mean.nodes]
    return complete_match(index, KIND, source, layout_of(index, source, axes), front, tail, allow_bias=True)


def _find_variance(index: GraphIndex, centered: set, axes: tuple) -> tuple[str, list]:
    problems = []
    for diff in sorted(centered):
        for square in squares_of(index, diff):
            for mean in forward_means(index, index.nodes[square].output[0]):
                if mean.problem:
                    problems.append(mean.problem)
                elif mean.axes != axes:
                    problems.append(f"the mean is over axes {list(axes)} but the variance over {list(mean.axes)}")
                else:
                    return mean.output, [square] + mean.nodes
    if problems:
        raise NotFused(problems[0])
    raise NotFused("no variance: nothing averages the square of x - mean(x)")
