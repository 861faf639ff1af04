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

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from ticknorm.base.metrics import ArrayComparison, compare_arrays, dtype_tolerance
from ticknorm.base.precision import TYPE_NAMES
from ticknorm.base.scopes import get_scope, module_output_tensors
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner

OUTSIDE = ""  # the key of the nodes that belong to no block


@dataclass
class Piece:
    """A run of consecutive nodes of one block (or of none), and its boundary."""

    block: str
    nodes: list = field(default_factory=list)
    inputs: list = field(default_factory=list)  # tensors earlier pieces (or the graph's inputs) made
    outputs: list = field(default_factory=list)  # tensors later pieces (or the graph's outputs) read


def repeated_blocks(module_names) -> list[str]:
    """The modules that are items of a list of modules (`model.layers.3`, `transformer.h.0`): a
    model's repeated blocks, in order."""
    names = list(module_names)
    return [name for name in names if name.rpartition(".")[2].isdigit() and name.rpartition(".")[0] in names]


def block_of(scope: str | None, blocks: set) -> str:
    """The block a node's module is in (itself or an ancestor), or OUTSIDE."""
    path = scope or ""
    while path:
        if path in blocks:
            return path
        path = path.rpartition(".")[0]
    return OUTSIDE


def cut(model: onnx.ModelProto, blocks) -> list[Piece]:
    """The graph as pieces, in graph order, each with what it reads from before and what later
    pieces (or the graph's outputs) read from it."""
    blocks = set(blocks)
    pieces = []
    for node in model.graph.node:
        block = block_of(get_scope(node), blocks)
        if not pieces or pieces[-1].block != block:
            pieces.append(Piece(block))
        pieces[-1].nodes.append(node)
    initializers = {t.name for t in model.graph.initializer}
    made_in = {}
    for number, piece in enumerate(pieces):
        for node in piece.nodes:
            for name in node.output:
                made_in[name] = number
    read_later = {o.name: len(pieces) for o in model.graph.output}
    for number, piece in enumerate(pieces):
        for node in piece.nodes:
            for name in _reads(node):
                if name in made_in and made_in[name] != number:
                    read_later[name] = max(read_later.get(name, -1), number)
                    if name not in piece.inputs:
                        piece.inputs.append(name)
                elif name not in made_in and name not in initializers and name not in piece.inputs:
                    piece.inputs.append(name)  # a graph input
    for number, piece in enumerate(pieces):
        piece.outputs = [name for node in piece.nodes for name in node.output if read_later.get(name, -1) > number]
    return pieces


def _reads(node: onnx.NodeProto):
    """Every tensor a node reads, those its subgraphs read from outside them included."""
    yield from (name for name in node.input if name)
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.HasField("g") else list(attribute.graphs)):
            inner = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {
                t.name for t in graph.initializer}
            for inner_node in graph.node:
                yield from (name for name in _reads(inner_node) if name not in inner)


def piece_model(model: onnx.ModelProto, piece: Piece, values: dict) -> onnx.ModelProto:
    """A piece as a model: its inputs typed as the arrays that feed it (`values`), its outputs
    typed as the graph's value_info says, and only the initializers its nodes read."""
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    read = {name for node in piece.nodes for name in _reads(node)}
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(values[name].dtype),
                                            list(values[name].shape)) for name in piece.inputs]
    outputs = [known[name] if name in known else helper.make_empty_tensor_value_info(name) for name in piece.outputs]
    graph = helper.make_graph(piece.nodes, f"{model.graph.name}:{piece.block or 'outside'}", inputs, outputs,
                              [t for t in model.graph.initializer if t.name in read])
    made = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                             functions=model.functions)
    made.metadata_props.extend(model.metadata_props)  # a low-precision graph's policy: a bf16 piece runs upcast
    return made


@dataclass
class BlockCheck:
    """What the block-by-block check found: each block's output judged alone (fed PyTorch's
    inputs), the final outputs judged end to end, and the first block over tolerance."""

    blocks: list = field(default_factory=list)  # ArrayComparison per block, named by the block
    outputs: list = field(default_factory=list)  # ArrayComparison per graph output, end to end
    values: dict = field(default_factory=dict)  # graph output -> what the chain of pieces computed

    @property
    def first_failure(self) -> str | None:
        return next((check.name for check in self.blocks if not check.passed), None)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in [*self.blocks, *self.outputs])


class PieceRunner:
    """Runs a graph piece by piece from its weights' folder; see the module's docstring."""

    def __init__(self, model: onnx.ModelProto, blocks, weights_dir=None, progress=lambda done, total: None):
        self.model = model
        self.pieces = cut(model, blocks)
        self.weights = MappedWeights.staged(weights_dir)
        self.progress = progress

    def run(self, feeds: dict, forced: dict | None = None, fetch=()) -> tuple[dict, dict]:
        """The graph's values on `feeds`: (the chain's values, each piece's values when fed the
        `forced` arrays (ONNX tensor name -> array) in place of the chain's where it has them).
        The chain's values hold what pieces pass on, the graph's outputs, and every tensor named in
        `fetch` (a measured run's float tensors)."""
        forced, fetch = forced or {}, set(fetch)
        chain, alone = dict(feeds), {}
        for number, piece in enumerate(self.pieces):
            extra = [name for node in piece.nodes for name in node.output if name in fetch]
            with OrtRunner(piece_model(self.model, piece, chain), mapped=self.weights, extra_outputs=extra) as runner:
                chain.update(runner.infer({name: chain[name] for name in piece.inputs}).outputs)
                substituted = {name: forced.get(name, chain[name]) for name in piece.inputs}
                if piece.block and any(name in forced for name in piece.inputs):
                    alone.update(runner.infer(substituted).outputs)
            self.progress(number + 1, len(self.pieces))
        return chain, alone


def check_blocks(model: onnx.ModelProto, runner: PieceRunner, feeds: dict, reference,
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


def taps_needed(model: onnx.ModelProto, blocks) -> list[str]:
    """The modules to tap in PyTorch: every block, and every module whose output a block reads."""
    tensors = module_output_tensors(model)
    by_tensor = {tensor: module for module, tensor in tensors.items()}
    read = {name for piece in cut(model, blocks) if piece.block for name in piece.inputs}
    return list(dict.fromkeys([*[b for b in blocks if b in tensors], *[by_tensor[n] for n in read if n in by_tensor]]))


def _judged(name: str, expected: np.ndarray, actual: np.ndarray, precision: str) -> ArrayComparison:
    floating = expected.dtype.kind == "f"
    return compare_arrays(name, expected, actual, *dtype_tolerance(np.dtype(TYPE_NAMES[precision]) if floating
                                                                   else expected.dtype))
