"""The reference when there is no PyTorch model: the file itself, in fp32, on ONNX Runtime's CPU
provider with every graph optimization off, or what `--reference` names instead (a runtime, or
another ONNX file such as the fp32 export beside an fp16 one).

The PyTorch model stays the first choice; a deployer on a target host has the file and the
runtimes, not the training environment. Optimizations off: the reference computes each node as
the file writes it, so a runtime's fusions and kernels are what is judged. A low-precision file is
widened to fp32 first (`upcast.widened`): the reference is what its low type approximates."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ticknorm.base.errors import InputSpecError, OnnxFileError
from ticknorm.base.inputs import graph_feeds, graph_inputs
from ticknorm.base.node_scopes import by_node_where_unscoped
from ticknorm.base.onnx_io import load_onnx
from ticknorm.base.precision import LOW_TYPES, Precision
from ticknorm.base.scopes import ensure_scopes
from ticknorm.base.upcast import widened
from ticknorm.runtime.base import Runner
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner
from ticknorm.runtime.registry import RunnerSetup, make_runner, runs_module, runtime_kind

DEFAULT = "the file in fp32 on ort (CPU, graph optimizations off)"


@dataclass(frozen=True)
class FileReference:
    """What a file judged alone is judged against: `model` run by `runtime` ('ort' CPU with
    optimizations off, unless `--reference` named a runtime), `label` as reports say it, and the
    type the judged file computes in (its comparisons are judged at that type's tolerance)."""

    model: onnx.ModelProto
    label: str
    precision: str = "fp32"
    runtime: str | None = None  # a runtime named by --reference; None: ort CPU, optimizations off
    setup: RunnerSetup = RunnerSetup()
    by_node: bool = False  # the judged file names no module: its rows are its nodes (`node_scopes`)

    def runner(self, taps=()) -> Runner:
        if self.runtime is not None:
            return make_runner(self.runtime, self.model, self.setup, taps)
        weights = self.setup.weights_dir
        return OrtRunner(self.model, "cpu", "disabled", taps=taps, mapped=MappedWeights(weights) if weights else None)

    def feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`feeds` as the reference graph takes them: a widened graph takes fp32 where the file
        took its low type."""
        declared = {value.name: value.type.tensor_type.elem_type for value in graph_inputs(self.model)}
        taken = graph_feeds(self.model, feeds)
        return {name: value.astype(onnx.helper.tensor_dtype_to_np_dtype(declared[name]))
                if value.dtype.kind == "f" and declared.get(name) else value for name, value in taken.items()}


def file_reference(model: onnx.ModelProto, choice: str | None, setup: RunnerSetup,
                   by_node: bool = False) -> FileReference:
    """The reference for `model` (scopes ensured; `by_node`: its nodes are its rows, as it names no
    module) when no PyTorch model is given: `choice` None (the file itself), a runtime's name, or a
    path to an .onnx file (read with its weights, its rows drawn the same way). `setup` is the
    command's: the judged file's weights folder and shape profile."""
    precision = computing_type(model)
    if choice is None:
        return FileReference(_fp32(model), DEFAULT, precision, setup=setup, by_node=by_node)
    if names_file(choice):
        other = ensure_scopes(load_onnx(choice))
        by_node_where_unscoped(other)
        return FileReference(_fp32(other), f"{Path(choice).name} in fp32 on ort (CPU, graph optimizations off)",
                             precision, by_node=by_node)
    check_reference(choice)
    return FileReference(model, f"{choice} (the file as it runs there)", precision, choice, setup, by_node)


def names_file(choice: str) -> bool:
    return choice.endswith(".onnx") or Path(choice).is_file()


def check_reference(choice: str | None) -> None:
    """Refuse a `--reference` that cannot serve before any work is done: a runtime name that is
    unknown, or one that runs the PyTorch model; an .onnx file that is not there."""
    if choice is None:
        return
    if names_file(choice):
        if not Path(choice).is_file():
            raise OnnxFileError(f"ONNX file not found: {choice}")
        return
    runtime_kind(choice)  # an unknown name is refused here, naming the known ones
    if runs_module(choice):
        raise InputSpecError(f"--reference {choice} runs the PyTorch model: give --model (then PyTorch is the "
                             "reference), or name an ONNX runtime or an .onnx file")


def _fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    return widened(model) if computing_type(model) != "fp32" else model


def computing_type(model: onnx.ModelProto) -> str:
    """The type a graph computes in: the policy a ticknorm conversion wrote, else the type most of
    its float weights are stored in (another tool's fp16 export carries no policy)."""
    own = Precision.of_graph(model).dtype
    if own != "fp32":
        return own
    counts = {name: sum(t.data_type == code for t in model.graph.initializer) for name, code in LOW_TYPES.items()}
    floats = sum(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)
    low = max(counts, key=lambda name: counts[name])
    return low if counts[low] > floats else "fp32"
