"""Find decomposed LayerNorms: (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * scale + bias."""

from ticknorm.base.graph import GraphIndex
from ticknorm.exporter.fusion.norms import NormMatch, NormRefusal, complete_match, refusal
from ticknorm.exporter.fusion.patterns import NotFused, forward_means, layout_of, match_tail, squares_of

KIND = "LayerNorm"


def find_layer_norms(index: GraphIndex) -> list[NormMatch | NormRefusal]:
    """One result per variance of a mean-centered input: several LayerNorms may read the same
    input (each with its own mean), and one LayerNorm may use several equal means of it
    (TorchScript's var_mean), so candidates are found from the variances, not from the means."""
    results, seen = [], set()
    for source in _reduced_tensors(index):
        groups: dict[tuple, list] = {}
        for mean in forward_means(index, source):
            subs = [r for r in index.consumer_nodes(mean.output)
                    if index.nodes[r].op_type == "Sub" and list(index.nodes[r].input) == [source, mean.output]]
            if subs and not mean.problem:
                groups.setdefault(mean.axes, []).extend((mean, s) for s in subs)
        for axes, centered_by in groups.items():
            for result in _match_group(index, source, axes, centered_by):
                key = frozenset(result.nodes) if isinstance(result, NormMatch) else (result.node, result.reason)
                if key not in seen:
                    seen.add(key)
                    results.append(result)
    return results


def _reduced_tensors(index: GraphIndex) -> list[str]:
    seen = {}
    for node in index.nodes:
        if node.op_type in ("ReduceMean", "ReduceSum"):
            seen.setdefault(node.input[0], None)
    return list(seen)


def _match_group(index: GraphIndex, source: str, axes: tuple, centered_by: list):
    """`centered_by`: (mean, Sub node) pairs computing source - mean(source) over `axes`."""
    sub_of = {index.nodes[s].output[0]: (mean, s) for mean, s in centered_by}
    variances, problems = _variances(index, set(sub_of), axes)
    if not variances:
        anchor = centered_by[0][0].nodes[0]
        yield refusal(index, KIND, anchor, NotFused(problems[0] if problems else
                                                    "no variance: nothing averages the square of x - mean(x)"))
        return
    for diff, square, variance in variances:
        try:
            tail = match_tail(index, variance.output, set(sub_of))
            used = {diff, tail.numerator}
            front = [square] + variance.nodes + [sub_of[d][1] for d in used] + \
                [n for d in used for n in sub_of[d][0].nodes]
            yield complete_match(index, KIND, source, layout_of(index, source, axes), front, tail, allow_bias=True)
        except NotFused as error:
            yield refusal(index, KIND, sub_of[diff][0].nodes[0], error)


def _variances(index: GraphIndex, centered: set, axes: tuple) -> tuple[list, list]:
    found, problems = [], []
    for diff in sorted(centered):
        for square in squares_of(index, diff):
            for mean in forward_means(index, index.nodes[square].output[0]):
                if mean.problem:
                    problems.append(mean.problem)
                elif mean.axes != axes:
                    problems.append(f"the mean is over axes {list(axes)} but the variance over {list(mean.axes)}")
                else:
                    found.append((diff, square, mean))
    return found, problems
