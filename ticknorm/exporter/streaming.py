"""Export a Hugging Face folder whose weights do not fit in memory, and check it block by block.

The whole-model route holds the model, then ONNX Runtime maps the exported weights beside it: at
8B parameters that is 32 GB of fp32. Here nothing holds more than one module's weights:
1. the model is built on the meta device and traced by the dynamo exporter (shapes only);
2. each initializer (named by its module path) is written to the weights file from the
   checkpoint's shards, one tensor at a time, by onnx-ir's `save` over lazy tensors;
3. norms are fused on the graph, whose weights stay references into that file;
4. the graph is checked block by block (`blocks`) against PyTorch running the same model with
   each module's weights read just before it runs (`meta.MetaModel.weights_on_demand`): in fp32
   (the exact upcast) block by block and end to end, and end to end in the checkpoint's own type.
"""

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ticknorm.base.errors import AccuracyError, ExportError, InputSpecError
from ticknorm.base.inputs import graph_feeds
from ticknorm.base.onnx_io import save_onnx, stage_weights
from ticknorm.base.optional import require
from ticknorm.base.metrics import ArrayComparison, as_close_as_the_checkpoint
from ticknorm.base.precision import TYPE_NAMES, Precision
from ticknorm.base.progress import QUIET, Eta, Progress
from ticknorm.base.scopes import annotate_scopes
from ticknorm.exporter.blocks import PieceRunner, check_blocks, repeated_blocks, taps_needed
from ticknorm.exporter.export import (CheckpointChecks, ExportCall, ExportOptions, ExportResult, describe_failure,
                                      dynamic_shapes, judge_checkpoint, quiet_export, torch_reference, weights_stage)
from ticknorm.exporter.fusion import fuse_norms
from ticknorm.exporter.lazy_weights import optimize_without_weights, write_weights
from ticknorm.exporter.meta import MetaModel
from ticknorm.exporter.plugin_target import to_plugin_target
from ticknorm.exporter.precision.convert import Conversion
from ticknorm.exporter.precision.lower import lay_out, write_low
from ticknorm.exporter.precision.measure import float_tensors
from ticknorm.exporter.precision.plan import plan_precision
from ticknorm.exporter.rotary import expand_rotary_caches
from ticknorm.runtime.base import RunOutputs
from ticknorm.runtime.torch_runner import TorchRunner, as_tensors, output_names

if TYPE_CHECKING:  # hf imports torch: `import ticknorm` does not
    from ticknorm.exporter.hf import HfGraph


@dataclasses.dataclass(frozen=True)
class StreamedModel:
    """A folder's model on the meta device behind the graph wrapper its task exports."""

    meta: MetaModel
    graph: "HfGraph"

    @classmethod
    def of(cls, folder, task: str) -> "StreamedModel":
        from ticknorm.exporter.hf import HfGraph

        meta = MetaModel(folder)
        return cls(meta, HfGraph(meta.model, task))


STREAMING = ("auto", "on", "off")
# The whole-model route of a bf16 folder peaked at 2.25x its fp32 weights (a 2-layer 8B-wide Llama:
# 12.5 GiB for 5.5 GB, the exporter's child included; benchmarks/streamed_8b.py --streaming off): auto
# streams a folder whose fp32 weights pass this share of the memory available.
WHOLE_MODEL_SHARE = 0.4


def streams(source, checkpoint, adapter, mode: str) -> bool:
    """Whether a model goes the streamed route: a Hugging Face folder given alone (no separate
    checkpoint or adapter to merge first), when asked, or by `auto` when its fp32 weights pass
    WHOLE_MODEL_SHARE of the memory available."""
    if mode not in STREAMING:
        raise InputSpecError(f"unknown streaming mode '{mode}'; choose one of: {', '.join(STREAMING)}")
    folder = isinstance(source, (str, Path)) and Path(source).is_dir()
    eligible = folder and checkpoint is None and adapter is None
    if mode == "on" and not eligible:
        raise InputSpecError("--streaming on exports a Hugging Face folder from its own shards; it takes no "
                             "--checkpoint or --adapter, and no factory")
    if mode != "auto" or not eligible:
        return mode == "on"
    from ticknorm.exporter.shards import ShardedCheckpoint

    infos = ShardedCheckpoint.of_folder(source).tensor_infos()
    fp32_bytes = 4 * sum(int(np.prod(info.shape)) for info in infos.values())
    return fp32_bytes > WHOLE_MODEL_SHARE * _available_memory()


def _available_memory() -> int:
    """MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def export_streamed(streamed: StreamedModel, feeds: dict[str, np.ndarray], dynamic_axes: dict[str, dict[int, str]],
                    output, options: ExportOptions, progress: Progress = QUIET) -> ExportResult:
    """Export `streamed` on `feeds` and write `output` only once every block and the outputs
    passed; see the module's docstring. `feeds` and `dynamic_axes` are the task's (made with the
    weights on demand: a decoder's cache comes from a real prefill)."""
    torch = require("torch", "torch")
    if options.exporter != "dynamo":
        raise InputSpecError("a model exported from its shards (--streaming, auto for a folder larger than memory) is "
                             "traced on the meta device, which only the dynamo exporter does: drop --exporter "
                             f"{options.exporter}, or pass --streaming off")
    meta, graph = streamed.meta, streamed.graph
    own = meta.precision
    own_outputs = None
    if own != "fp32":
        progress.step(f"running PyTorch in {TYPE_NAMES[own]} (the checkpoint's type), one module's weights at a time")
        with meta.weights_on_demand():
            own_outputs = dict(zip(*torch_reference(graph, feeds)))
        meta.model.float()  # meta tensors: nothing is allocated; the weights are read in fp32 from here on
    with weights_stage(Path(output).parent) as weights_dir:
        progress.step("exporting the model on the meta device with the dynamo exporter")
        program = _export_meta(torch, graph, feeds, dynamic_axes, options.opset)
        target = Path(weights_dir) / "exported.onnx"
        plan = optimize_without_weights(program.model, meta)
        write_weights(program.model, meta, plan, target, progress.step)
        del program
        proto = stage_weights(target)
        annotate_scopes(proto, [name for name, _ in graph.named_modules()])
        notes = []
        if expand_rotary_caches(proto):
            notes.append("RotaryEmbedding: cos/sin caches expanded to the batch, as the standard shapes them")
        fused = None
        if options.fuse:
            progress.step("fusing norms (checked below, block by block against PyTorch)")
            fused = fuse_norms(proto, opset=options.opset, verify=False, targets=options.targets,
                               weights_dir=weights_dir)  # its norms' scales read from there, taken in
            proto = fused.model
        blocks = repeated_blocks(name for name, _ in graph.named_modules())
        checker = _Checker(streamed, feeds, blocks, weights_dir, progress)
        accuracy, conversion = [], None
        if options.check or options.precision.low:
            checker.run_reference(proto)
        if options.check:
            accuracy = checker.check(proto, own_outputs)
        if options.precision.low:
            conversion = checker.lowered(proto, options.precision, own_outputs)
            proto = conversion.model
        retargeted = to_plugin_target(proto) if options.ln_target == "plugin" else None
        proto = retargeted.model if retargeted else proto
        files = save_onnx(proto, output, options.external_data_threshold, weights_dir)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    notes.append(f"streamed from {meta.checkpoint.index.name}: {len(blocks)} blocks checked one at a time")
    return ExportResult(files, "dynamo", opset, fused.report if fused else None, accuracy, retargeted, conversion, own,
                        options.precision.dtype, notes)


def _export_meta(torch, graph: "HfGraph", feeds: dict[str, np.ndarray], dynamic_axes: dict[str, dict[int, str]],
                 opset: int | None):
    """The dynamo exporter's program of the meta model, traced on meta tensors shaped as the feeds.
    Its optimizer folds constants through the weights, which meta tensors do not hold: off."""
    tensors = {name: torch.empty(value.shape, dtype=as_tensors({name: value})[name].dtype, device="meta")
               for name, value in feeds.items()}
    kwargs, structure, names = graph.export_arguments(tensors, dynamic_axes)
    call = ExportCall(kwargs, dynamic_shapes(torch, structure), names, None, "dynamo", opset, dynamic_axes)
    with quiet_export(torch):
        try:
            program = torch.onnx.export(graph, (), kwargs=kwargs, dynamo=True, opset_version=opset,
                                        dynamic_shapes=call.dynamic_shapes, input_names=names, optimize=False,
                                        verbose=False)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many unrelated types
            raise ExportError(describe_failure(torch, graph, call, exc)) from exc
    _name_outputs(torch, program)
    return program


def _name_outputs(torch, program) -> None:
    """The graph's outputs named as the model names them (`logits`, `present.0.key`), read from the
    structure torch.export recorded (a meta forward cannot run: masks call `.item()`)."""
    from torch.utils import _pytree

    spec = program.exported_program.call_spec.out_spec
    structure = _pytree.tree_unflatten([torch.empty(0)] * spec.num_leaves, spec)
    for value, name in zip(program.model.graph.outputs, output_names(torch, structure)):
        value.name = name


class _Checker:
    """The PyTorch reference of a streamed export and the block-by-block checks against it, of the
    fp32 graph and, with a low precision, of the converted one."""

    def __init__(self, streamed: StreamedModel, feeds: dict[str, np.ndarray], blocks: list[str], weights_dir,
                 progress: Progress):
        self.streamed, self.feeds, self.blocks, self.weights_dir = streamed, feeds, blocks, weights_dir
        self.progress = progress
        self._reference: RunOutputs | None = None

    def run_reference(self, proto) -> None:
        meta, graph = self.streamed.meta, self.streamed.graph
        self.progress.step(f"running PyTorch in fp32, one module's weights at a time, {len(self.blocks)} blocks tapped")
        names = [o.name for o in proto.graph.output]
        with meta.weights_on_demand(), TorchRunner(graph, names, taps=taps_needed(proto, self.blocks)) as runner:
            self._reference = runner.infer(self.feeds)

    @property
    def reference(self) -> RunOutputs:
        """PyTorch's fp32 outputs and taps, which every check reads: `run_reference` makes them."""
        if self._reference is None:
            raise RuntimeError("a streamed export's checks read PyTorch's reference: run_reference comes first")
        return self._reference

    def pieces(self, proto, what: str) -> PieceRunner:
        eta = Eta(self.progress.step, what, 1)
        return PieceRunner(proto, self.blocks, self.weights_dir, lambda done, total: eta(done / total))

    def check(self, proto, own_outputs, precision: str = "fp32") -> list[ArrayComparison]:
        """Every block alone and the outputs end to end against PyTorch in fp32 at `precision`'s
        tolerance, and against PyTorch in the checkpoint's type (`own_outputs`); the first block
        over tolerance stops the export."""
        runner = self.pieces(proto, f"checking the {precision} graph piece by piece in ONNX Runtime")
        found = check_blocks(proto, runner, graph_feeds(proto, self.feeds), self.reference, precision)
        if found.first_failure is not None:
            failed = next(c for c in found.blocks if not c.passed)
            raise AccuracyError(f"block {failed.name} of the exported {precision} graph disagrees with PyTorch: "
                                f"{failed.reason} (judged alone, on PyTorch's inputs); nothing was written")
        accuracy = [*found.blocks, *self._outputs(proto, found, own_outputs, precision)]
        disagreeing = [c for c in accuracy if not c.passed]
        if disagreeing:
            raise AccuracyError(f"ONNX Runtime disagrees with PyTorch on {disagreeing[0].name}: "
                                f"{disagreeing[0].reason}; nothing was written")
        return accuracy

    def _outputs(self, proto, found, own_outputs, precision: str) -> list[ArrayComparison]:
        if own_outputs is None:
            return found.outputs
        meta, names = self.streamed.meta, [o.name for o in proto.graph.output]
        if precision != "fp32":  # a low graph is as good as the checkpoint's own PyTorch in its type
            return [as_close_as_the_checkpoint(check, own_outputs[check.name], self.reference.outputs[check.name],
                                               TYPE_NAMES[meta.precision]) for check in found.outputs]
        own = CheckpointChecks(meta.precision, [("", self.feeds, [own_outputs[name] for name in names])])
        upcast = [("", self.feeds, [self.reference.outputs[name] for name in names])]
        return [*found.outputs, *judge_checkpoint(proto, own, upcast, [found.values])]

    def lowered(self, proto, precision: Precision, own_outputs) -> Conversion:
        """The fp32 graph in `precision.dtype`, its fp32 islands measured on an fp32 run made piece
        by piece, its weights converted one at a time, checked block by block (a bf16 piece runs
        upcast where ONNX Runtime's CPU provider has no bf16 kernel)."""
        runner = self.pieces(proto, f"measuring the fp32 graph piece by piece for the {precision.dtype} policy")
        values, _ = runner.run(graph_feeds(proto, self.feeds), fetch=float_tensors(proto))
        policy = plan_precision(proto, self.feeds, precision, values=values)
        del values
        kept = f"{len(policy.islands)} node(s) kept in fp32"
        eta = Eta(self.progress.step, f"writing the {precision.dtype} graph ({kept})", 1)
        low = write_low(lay_out(proto, policy), self.weights_dir, lambda done, total: eta(done / total))
        return Conversion(low, policy, self.check(low, own_outputs, precision.dtype))
