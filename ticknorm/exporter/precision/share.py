"""How much of a converted graph's float weights the low type holds: the number a conversion is
worth. Before bodies were converted, a VAD model whose If holds the network came out of
`convert --precision fp16` with none of its weights in fp16 while the command reported success;
a conversion that keeps most of the model in fp32 (islands, `--keep-fp32`, a body the plan does
not reach) is a partial one, and says so."""

import math
from dataclasses import dataclass

import onnx

from ticknorm.base.graph import all_nodes, bodies
from ticknorm.base.precision import LOW_TYPES

FLOATS = (onnx.TensorProto.FLOAT, *LOW_TYPES.values())
# Below this share of the float weights' size in the low type a conversion is refused (exit 1) unless allowed.
PARTIAL_BELOW = 0.5


@dataclass(frozen=True)
class WeightShare:
    """Float weights (initializers a node reads and Constants, in the graph and its bodies) in the
    low type, counted as tensors and by size: their elements, which is their share of the fp32
    graph's bytes. An initializer nothing reads (an attention mask's unused `zero`) is no weight
    of the network, and is left as it was."""

    dtype: str
    low_tensors: int
    tensors: int
    low_elements: int
    elements: int

    @property
    def fraction(self) -> float:
        """The low type's share of the float weights' size (1.0 for a graph without float weights)."""
        return self.low_elements / self.elements if self.elements else 1.0

    @property
    def partial(self) -> bool:
        return self.fraction < PARTIAL_BELOW

    def line(self) -> str:
        if not self.tensors:
            return f"weights in {self.dtype}: the graph reads no float weights"
        return (f"weights in {self.dtype}: {self.fraction:.1%} of the float weights by size (fp32 bytes), "
                f"{self.low_tensors} of {self.tensors} tensors")


def weight_share(model: onnx.ModelProto, dtype: str) -> WeightShare:
    """Counted from the tensors' types and dims (a staged weight is not read)."""
    graphs = [model.graph, *(body for _, body in bodies(model.graph))]
    nodes = all_nodes(model.graph)
    read = {name for node in nodes for name in node.input} | {value.name for graph in graphs for value in graph.output}
    tensors = [tensor for graph in graphs for tensor in graph.initializer if tensor.name in read]
    tensors += [attribute.t for node in nodes if node.op_type == "Constant"
                for attribute in node.attribute if attribute.name == "value"]
    floats = [(tensor.data_type == LOW_TYPES[dtype], math.prod(tensor.dims)) for tensor in tensors
              if tensor.data_type in FLOATS]
    return WeightShare(dtype, sum(low for low, _ in floats), len(floats),
                       sum(size for low, size in floats if low), sum(size for _, size in floats))
