"""ONNX files as other tools write them, made here from tiny transformers models (nothing
downloaded, Optimum not installed: it pins transformers<4.58): a plain `torch.onnx.export` of a
decoder with its KV cache, named as Optimum names it (`past_key_values.N.key` in, `present.N.key`
out, TorchScript node names such as `/model/layers.1/input_layernorm/Pow`), and Optimum's merged
decoder: one `If` on `use_cache_branch` holding the decoder without a past and the one with it,
assembled with `onnx.helper` from two such exports."""

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from ticknorm.exporter.hf import HfGraph, complete_inputs, step
from ticknorm.exporter.tasks import SEQ2SEQ_WITH_PAST, WITH_PAST


def plain_decoder(model, path: Path, with_past: bool = True, opset: int = 17) -> Path:
    """`torch.onnx.export` (TorchScript) of a transformers decoder step, nothing else done to it; an
    encoder-decoder's is its decoder's step on the encoder's states (Optimum's decoder_with_past)."""
    task = SEQ2SEQ_WITH_PAST if model.config.is_encoder_decoder else WITH_PAST
    graph = HfGraph(model.eval(), task)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 5))
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}}
    feeds, axes = complete_inputs(graph, {"input_ids": ids}, axes, past_length=None if with_past else 0)
    if not with_past:
        feeds = {name: value for name, value in feeds.items() if not name.startswith("past_key_values")}
        axes = {name: value for name, value in axes.items() if name in feeds}
    tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}
    kwargs, _, names = graph.export_arguments(tensors, axes)
    outputs = list(step(graph, feeds))
    present_axes = {name: {0: "batch_size", 2: "past_sequence_length + sequence_length"} for name in outputs[1:]}
    with torch.no_grad():
        torch.onnx.export(graph, (), str(path), kwargs=kwargs, dynamo=False, opset_version=opset, input_names=names,
                          output_names=outputs, dynamic_axes={**axes, **present_axes}, do_constant_folding=True)
    return path


def merged_decoder(model, path: Path, opset: int = 17) -> Path:
    """Optimum's `decoder_model_merged.onnx`: `If(use_cache_branch)`, the with-past decoder in its
    then branch, the no-past one in its else branch, weights the two share moved out to the graph."""
    folder = path.parent
    with_past = onnx.load(str(plain_decoder(model, folder / "with_past.onnx", True, opset)))
    without = onnx.load(str(plain_decoder(model, folder / "without_past.onnx", False, opset)))
    shared = _shared_initializers(with_past.graph, without.graph)
    then_branch, else_branch = (_branch(g.graph, suffix, shared) for g, suffix in ((with_past, "_with_past"),
                                                                                    (without, "_no_past")))
    outputs = [o.name for o in with_past.graph.output]
    use_cache = helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1])
    node = helper.make_node("If", ["use_cache_branch"], outputs, name="optimum::if", then_branch=then_branch,
                            else_branch=else_branch)
    graph = helper.make_graph([node], "merged", [*with_past.graph.input, use_cache], list(with_past.graph.output),
                              list(shared.values()))
    merged = helper.make_model(graph, opset_imports=list(with_past.opset_import), producer_name="pytorch")
    merged.ir_version = with_past.ir_version
    onnx.checker.check_model(merged)
    onnx.save(merged, str(path))
    return path


def _shared_initializers(*graphs) -> dict:
    """Initializers every graph holds under the same name with the same bytes."""
    first, *others = graphs
    kept = {}
    for tensor in first.initializer:
        twins = [next((t for t in g.initializer if t.name == tensor.name), None) for g in others]
        if all(t is not None and t.SerializeToString() == tensor.SerializeToString() for t in twins):
            kept[tensor.name] = tensor
    return kept


def _branch(graph: onnx.GraphProto, suffix: str, shared: dict) -> onnx.GraphProto:
    """`graph` as an If branch: no inputs (it reads the outer graph's), every value it computes
    renamed with `suffix` (a branch may not redefine a name of the graph around it)."""
    outer = {i.name for i in graph.input} | set(shared)
    renamed = {}
    for node in graph.node:
        for index, name in enumerate(node.output):
            renamed[name] = node.output[index] = name + suffix if name else name
        node.input[:] = [renamed.get(name, name) for name in node.input]
    initializers = [t for t in graph.initializer if t.name not in outer]
    for tensor in initializers:
        tensor.name += suffix
        renamed[tensor.name.removesuffix(suffix)] = tensor.name
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) if name not in outer else name for name in node.input]
    outputs = [helper.make_tensor_value_info(renamed[o.name], o.type.tensor_type.elem_type, None) for o in graph.output]
    return helper.make_graph(list(graph.node), graph.name + suffix, [], outputs, initializers)
