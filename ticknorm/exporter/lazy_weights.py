"""The weights of a graph traced on the meta device: optimized without them, written from the
checkpoint's shards one tensor at a time (onnx-ir).

The dynamo exporter's optimizer cannot run on meta tensors, and its graph is three times as large
unoptimized (constants unfolded: an RMSNorm's axes computed by a Reshape, which the norm fusion does
not read as a constant). So the optimizer runs with the weights taken out (initializers without a
value, which it leaves alone), and the one folding it would have done through them, a Linear's
`Transpose(W)`, is done here as the weights are written: the weight is written transposed and the
Transpose node is gone, as in a graph exported whole.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from ticknorm.base.errors import ExportError
from ticknorm.base.optional import require
from ticknorm.base.progress import Eta
from ticknorm.exporter.export import quiet_export
from ticknorm.exporter.meta import MetaModel


# The model tensor an initializer is read from, and the permutation to write it in (or None).
WeightSource = tuple[str, tuple[int, ...] | None]


@dataclass
class WeightPlan:
    """Initializer name -> where it is read from (`WeightSource`)."""

    sources: dict[str, WeightSource] = field(default_factory=dict)


def optimize_without_weights(model: ir.Model, meta: MetaModel) -> WeightPlan:
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


def _fold_weight_transposes(model: ir.Model, plan: WeightPlan) -> None:
    graph = model.graph
    for node in list(graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if weight is None or weight.name is None:
            continue
        source, written_perm = plan.sources.get(weight.name, (None, None))
        if source is None or written_perm is not None:
            continue
        _, weight_shape = _declared(weight)
        reversed_axes = list(reversed(range(len(weight_shape))))  # Transpose's default
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else reversed_axes
        shape = ir.Shape([weight_shape[axis] for axis in perm])
        if len(weight.uses()) == 1:  # the weight is read only transposed: it is written so, under its own name
            folded, folded_name = weight, weight.name
            folded.shape = shape
        else:  # also read as it is (an embedding tied to the head): a second, transposed copy
            folded_name = f"{weight.name}.transposed"
            folded = ir.Value(name=folded_name, shape=shape, type=weight.type)
            graph.register_initializer(folded)
        plan.sources[folded_name] = (source, tuple(perm))
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)


def write_weights(model: ir.Model, meta: MetaModel, plan: WeightPlan, target: Path,
                  say: Callable[[str], None]) -> None:
    """Every initializer written to `target`'s weights file by onnx-ir's `save`, each read from
    its shard (or, for a buffer the model computes itself, from the model) only when its turn
    comes, one at a time; `say` hears how far it is, with an estimate of the time left."""
    buffers = dict(meta.model.named_buffers())
    total = 0
    for name, value in model.graph.initializers.items():
        if name in plan.sources:
            value.const_value = ir.LazyTensor(_reader(meta, *plan.sources[name]), *_declared(value), name=name)
        elif name in buffers and not buffers[name].is_meta:
            buffer = buffers[name].detach()
            array = buffer.float().numpy() if value.dtype == ir.DataType.FLOAT else buffer.numpy()
            value.const_value = ir.tensor(array, name=name)
        elif value.const_value is None or getattr(value.const_value.raw, "is_meta", False):
            raise ExportError(f"the exported graph needs '{name}', which neither the checkpoint nor the model holds")
        total += value.const_value.nbytes
    eta = Eta(say, "writing the weights from the shards", total)
    written = [0]

    def advance(tensor, _info):
        written[0] += tensor.nbytes
        eta(written[0])

    ir.save(model, str(target), external_data=target.name + ".data", callback=advance, max_workers=1)


def _declared(weight: ir.Value) -> tuple[ir.DataType, ir.Shape]:
    """A weight's type and shape as the traced graph declares them: what it is written as."""
    if weight.dtype is None or weight.shape is None:
        raise ExportError(f"the exported graph declares no type or shape for the weight '{weight.name}'")
    return weight.dtype, weight.shape


def _reader(meta: MetaModel, source: str, perm: tuple[int, ...] | None) -> Callable[[], ir.TensorProtocol]:
    """A tensor's bytes as the graph holds it: fp32, transposed where a Transpose was folded."""
    def read():
        tensor = meta.tensor(source, require("torch", "torch").float32)
        return ir.tensor((tensor.permute(perm).contiguous() if perm else tensor).numpy())
    return read
