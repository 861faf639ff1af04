"""The weights of a graph traced on the meta device: optimized without them, written from the
checkpoint's shards one tensor at a time (onnx-ir).

The dynamo exporter's optimizer cannot run on meta tensors, and its graph is three times as large
unoptimized (constants unfolded: an RMSNorm's axes computed by a Reshape, which the norm fusion does
not read as a constant). So the optimizer runs with the weights taken out (initializers without a
value, which it leaves alone), and the one folding it would have done through them, a Linear's
`Transpose(W)`, is done here as the weights are written: the weight is written transposed and the
Transpose node is gone, as in a graph exported whole.
"""

from dataclasses import dataclass, field

import onnx_ir as ir

from ticknorm.base.errors import ExportError
from ticknorm.base.optional import require
from ticknorm.base.progress import Eta
from ticknorm.exporter.export import quiet_export
from ticknorm.exporter.meta import MetaModel


@dataclass
class WeightPlan:
    """Initializer name -> (model tensor it is read from, the permutation to write it in, or None)."""

    sources: dict = field(default_factory=dict)


def optimize_without_weights(model, meta: MetaModel) -> WeightPlan:
    """Run onnxscript's optimizer on `model` with its meta weights taken out, fold each
    `Transpose(weight)` into a transposed weight, and return where every weight comes from."""
    optimizer = require("onnxscript.optimizer", "torch")
    plan = WeightPlan()
    for name, value in model.graph.initializers.items():
        if name in meta.sources:
            plan.sources[name] = (name, None)
            value.const_value = None  # a value the optimizer cannot see into: left as it is
    with quiet_export(require("torch", "torch")):  # it warns of every initializer without a value
        optimizer.optimize(model)
    _fold_weight_transposes(model, plan)
    return plan


def _fold_weight_transposes(model, plan: WeightPlan) -> None:
    graph = model.graph
    for node in list(graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if weight is None or weight.name not in plan.sources or plan.sources[weight.name][1] is not None:
            continue
        rank = len(weight.shape)
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else list(reversed(range(rank)))
        shape = ir.Shape([weight.shape[axis] for axis in perm])
        if len(weight.uses()) == 1:  # the weight is read only transposed: it is written so, under its own name
            folded = weight
            folded.shape = shape
        else:  # also read as it is (an embedding tied to the head): a second, transposed copy
            folded = ir.Value(name=f"{weight.name}.transposed", shape=shape, type=weight.type)
            graph.register_initializer(folded)
        plan.sources[folded.name] = (plan.sources[weight.name][0], tuple(perm))
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)


def write_weights(model, meta: MetaModel, plan: WeightPlan, target, say) -> None:
    """Every initializer written to `target`'s weights file by onnx-ir's `save`, each read from
    its shard (or, for a buffer the model computes itself, from the model) only when its turn
    comes, one at a time; `say` hears how far it is, with an estimate of the time left."""
    buffers = dict(meta.model.named_buffers())
    total = 0
    for name, value in model.graph.initializers.items():
        if name in plan.sources:
            value.const_value = ir.LazyTensor(_reader(meta, *plan.sources[name]), value.dtype, value.shape, name=name)
        elif name in buffers and not buffers[name].is_meta:
            value.const_value = ir.tensor(buffers[name].detach().float().numpy()
                                          if value.dtype == ir.DataType.FLOAT else buffers[name].detach().numpy(), name=name)
        elif value.const_value is None or getattr(value.const_value.raw, "is_meta", False):
            raise ExportError(f"the exported graph needs '{name}', which neither the checkpoint nor the model holds")
        total += value.const_value.nbytes
    eta = Eta(say, "writing the weights from the shards", total)
    written = [0]

    def advance(tensor, _info):
        written[0] += tensor.nbytes
        eta(written[0])

    ir.save(model, str(target), external_data=target.name + ".data", callback=advance, max_workers=1)


def _reader(meta: MetaModel, source: str, perm):
    """A tensor's bytes as the graph holds it: fp32, transposed where a Transpose was folded."""
    def read():
        tensor = meta.tensor(source, require("torch", "torch").float32)
        return ir.tensor((tensor.permute(perm).contiguous() if perm else tensor).numpy())
    return read
