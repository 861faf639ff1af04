"""Check an exported graph block by block: each repeated block (a decoder layer) as a graph of its
own, run with only its weights mapped, against the same PyTorch module.

A model larger than memory cannot be run whole in ONNX Runtime beside PyTorch. Its graph is cut
into pieces: the runs of consecutive nodes that belong to one block (`model.layers.3`), and the
runs between them (embedding, rotary tables, masks, the final norm and head). Each piece is a
model of its own whose inputs are the tensors earlier pieces made, with only its own initializers
(references into the export's weights file, which the session maps). The pieces run in graph
order, one session at a time, so the peak is one block's weights.

Each block is judged twice. Fed PyTorch's own inputs where the graph's input is a module's output
PyTorch also computed, its output is judged alone: a broken block is the one that fails, not every
block after it. Fed the chain of earlier pieces, the graph's final outputs are judged end to end.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from ticknorm.base.metrics import ArrayComparison, compare_arrays, dtype_tolerance
from ticknorm.base.precision import TYPE_NAMES
from ticknorm.base.scopes import SCOPE_KEY, module_output_tensors
from ticknorm.runtime.base import RunOutputs
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner

OUTSIDE = ""  # the key of the nodes that belong to no block


@dataclass
class Piece:
    """A run of consecutive nodes of one block (or of none), and its boundary."""

    block: str
    nodes: list[ir.Node] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # tensors earlier pieces (or the graph's inputs) made
    outputs: list[str] = field(default_factory=list)  # tensors later pieces (or the graph's outputs) read


def repeated_blocks(module_names: Iterable[str]) -> list[str]:
    """The modules that are items of a list of modules (`model.layers.3`, `transformer.h.0`): a
    model's repeated blocks, in order."""
    names = list(module_names)
    return [name for name in names if name.rpartition(".")[2].isdigit() and name.rpartition(".")[0] in names]


def block_of(scope: str | None, blocks: set[str]) -> str:
    """The block a node's module is in (itself or an ancestor), or OUTSIDE."""
    path = scope or ""
    while path:
        if path in blocks:
            return path
        path = path.rpartition(".")[0]
    return OUTSIDE


def cut(model: ir.Model | onnx.ModelProto, blocks: Iterable[str]) -> list[Piece]:
    """The graph (an onnx-ir model, or a ModelProto read into one) as pieces, in graph order, each
    with what it reads from before and what later pieces (or the graph's outputs) read from it."""
    graph = (model if isinstance(model, ir.Model) else ir.from_proto(model)).graph
    block_set = set(blocks)
    pieces: list[Piece] = []
    made_in: dict[str, int] = {}
    for node in graph:
        block = block_of(node.metadata_props.get(SCOPE_KEY), block_set)
        if not pieces or pieces[-1].block != block:
            pieces.append(Piece(block))
        pieces[-1].nodes.append(node)
        made_in.update({_name(value): len(pieces) - 1 for value in node.outputs})
    read_later = {_name(value): len(pieces) for value in graph.outputs}
    for number, piece in enumerate(pieces):
        for value in (value for node in piece.nodes for value in _reads(graph, node)):
            name = _name(value)
            if value.is_initializer() or made_in.get(name, -1) == number:
                continue
            read_later[name] = max(read_later.get(name, -1), number)
            if name not in piece.inputs:
                piece.inputs.append(name)  # an earlier piece's tensor, or a graph input
    for number, piece in enumerate(pieces):
        piece.outputs = [_name(value) for node in piece.nodes for value in node.outputs
                         if read_later.get(_name(value), -1) > number]
    return pieces


def _name(value: ir.Value) -> str:
    """A tensor's name: pieces meet at names, and every tensor read from a ModelProto has one."""
    if value.name is None:
        raise ValueError(f"an unnamed tensor made by {value.producer()} cannot be a piece's boundary")
    return value.name


def _reads(graph: ir.Graph, node: ir.Node) -> Iterator[ir.Value]:
    """Every value of `graph` a node reads, those its subgraphs read from outside them included."""
    yield from (value for value in node.inputs if value is not None)
    for attribute in node.attributes.values():
        if attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            for inner in ir.traversal.RecursiveGraphIterator(attribute.value):
                yield from (value for value in inner.inputs if value is not None and value.graph is graph)


def piece_model(model: ir.Model, piece: Piece, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A piece as a model (onnx-ir's `extract` between its inputs and outputs, its initializers
    references into the export's weights file): inputs typed as the arrays that feed them."""
    graph = ir.convenience.extract(model.graph, inputs=piece.inputs, outputs=piece.outputs)
    for value in graph.inputs:
        array = values[_name(value)]
        value.dtype, value.shape = ir.DataType.from_numpy(array.dtype), ir.Shape(array.shape)
    made = ir.Model(graph, ir_version=model.ir_version, functions=list(model.functions.values()),
                    metadata_props=dict(model.metadata_props))  # a low graph's policy: a bf16 piece runs upcast
    return ir.to_proto(made)


@dataclass
class BlockCheck:
    """What the block-by-block check found: each block's output judged alone (fed PyTorch's
    inputs), the final outputs judged end to end, and the first block over tolerance."""

    blocks: list[ArrayComparison] = field(default_factory=list)  # per block, named by the block
    outputs: list[ArrayComparison] = field(default_factory=list)  # per graph output, end to end
    values: dict[str, np.ndarray] = field(default_factory=dict)  # graph output -> what the chain of pieces computed

    @property
    def first_failure(self) -> str | None:
        return next((check.name for check in self.blocks if not check.passed), None)


class PieceRunner:
    """Runs a graph piece by piece from its weights' folder; see the module's docstring."""

    def __init__(self, model: onnx.ModelProto, blocks: Iterable[str], weights_dir=None,
                 progress: Callable[[int, int], None] = lambda done, total: None):
        self.model = ir.from_proto(model)  # its weights stay references
        self.pieces = cut(self.model, blocks)
        self.weights = MappedWeights.staged(weights_dir)
        self.progress = progress

    def run(self, feeds: dict[str, np.ndarray], forced: dict[str, np.ndarray] | None = None,
            fetch: Iterable[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The graph's values on `feeds`: (the chain's values, each piece's values when fed the
        `forced` arrays (ONNX tensor name -> array) in place of the chain's where it has them).
        The chain's values hold what pieces pass on, the graph's outputs, and every tensor named in
        `fetch` (a measured run's float tensors)."""
        forced, fetched = forced or {}, set(fetch)
        chain, alone = dict(feeds), {}
        for number, piece in enumerate(self.pieces):
            extra = [_name(value) for node in piece.nodes for value in node.outputs if value.name in fetched]
            if not piece.outputs and not extra:  # nothing of it is read: nothing to run
                continue
            with OrtRunner(piece_model(self.model, piece, chain), mapped=self.weights, extra_outputs=extra) as runner:
                chain.update(runner.infer({name: chain[name] for name in piece.inputs}).outputs)
                substituted = {name: forced.get(name, chain[name]) for name in piece.inputs}
                if piece.block and any(name in forced for name in piece.inputs):
                    alone.update(runner.infer(substituted).outputs)
            self.progress(number + 1, len(self.pieces))
        return chain, alone


def check_blocks(model: onnx.ModelProto, runner: PieceRunner, feeds: dict[str, np.ndarray], reference: RunOutputs,
                 precision: str = "fp32") -> BlockCheck:
    """Judge every block and the graph's outputs against PyTorch at the tolerance of `precision`
    (the type the graph computes in). `reference` is a `RunOutputs` of the PyTorch model on
    `feeds`, every block and every module whose output a piece reads tapped."""
    tensors = module_output_tensors(model)
    # a module returning several tensors (a rotary embedding's cos and sin) has no one tensor to stand for
    forced = {tensors[module]: value for module, value in reference.taps.items()
              if module in tensors and module not in reference.tap_others}
    chain, alone = runner.run(feeds, forced)
    found = BlockCheck()
    for piece in runner.pieces:
        tensor = tensors.get(piece.block)
        if piece.block and tensor in alone and piece.block in reference.taps:
            found.blocks.append(_judged(piece.block, reference.taps[piece.block], alone[tensor], precision))
    for output in model.graph.output:
        found.outputs.append(_judged(output.name, reference.outputs[output.name], chain[output.name], precision))
        found.values[output.name] = chain[output.name]
    return found


def taps_needed(model: onnx.ModelProto, blocks: list[str]) -> list[str]:
    """The modules to tap in PyTorch: every block, and every module whose output a block reads."""
    tensors = module_output_tensors(model)
    by_tensor = {tensor: module for module, tensor in tensors.items()}
    read = {name for piece in cut(model, blocks) if piece.block for name in piece.inputs}
    return list(dict.fromkeys([*[b for b in blocks if b in tensors], *[by_tensor[n] for n in read if n in by_tensor]]))


def _judged(name: str, expected: np.ndarray, actual: np.ndarray, precision: str) -> ArrayComparison:
    floating = expected.dtype.kind == "f"
    return compare_arrays(name, expected, actual, *dtype_tolerance(np.dtype(TYPE_NAMES[precision]) if floating
                                                                   else expected.dtype))
