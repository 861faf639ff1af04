"""Find decomposed RMSNorms (T5, Llama): x / sqrt(mean(x^2) + eps) * scale."""

from ticknorm.base.graph import GraphIndex
from ticknorm.exporter.fusion.norms import NormMatch, NormRefusal, complete_match, refusal
from ticknorm.exporter.fusion.patterns import NotFused, forward_means, layout_of, match_tail, squares_of

KIND = "RMSNorm"


def find_rms_norms(index: GraphIndex, centered: set) -> list[NormMatch | NormRefusal]:
    """`centered` are the x - mean(x) tensors of LayerNorm candidates: their tail is a LayerNorm's,
    already reported as one, not an RMSNorm."""
    results = []
    for anchor, node in enumerate(index.nodes):
        if node.op_type not in ("Pow", "Mul") or node.input[0] in centered or anchor not in squares_of(index, node.input[0]):
            continue
        source = node.input[0]
        for mean in forward_means(index, node.output[0]):
            if mean.problem:
                continue  # a sum of squares that is no mean: not an RMSNorm candidate
            try:
                tail = match_tail(index, mean.output, {source})
                results.append(complete_match(index, KIND, source, layout_of(index, source, mean.axes),
                                              [anchor] + mean.nodes, tail, allow_bias=False))
            except NotFused as error:
                if error.candidate:
                    results.append(refusal(index, KIND, anchor, error))
    return results
