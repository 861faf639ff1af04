"""ONNX files as other exporters write them, one small complete model per family, made here the
way that exporter makes it (nothing downloaded): spox's graph API (a VAD-like model whose `If`
holds the network, and a plain one), the same VAD by dynamo (`torch.cond`), a sentence-transformers
encoder (BertModel, mean pooling, normalize) through a plain `torch.onnx.export`, Paddle2ONNX's and
tf2onnx's naming and norm spellings (the hand-built spellings of test_fusion_spellings placed in a
model), and a user's `torch.onnx.export` of a BERT by both exporters."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from test_fusion_spellings import CONSTANTS, layer_norm
from test_fusion_spellings_29 import flax_layer_norm, keras_layer_norm

RNG = np.random.default_rng(29)
WIDTH = 8  # the spellings' own feature width (their SCALE and BIAS)


def _weights(*shape) -> np.ndarray:
    return (RNG.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


# spox: every weight a Constant node where it is used, the network inside an If (Silero VAD's shape)

def spox_model(path: Path, vad: bool) -> Path:
    """x (batch x 64) in, a speech probability out; with `vad` the network sits in the branches of
    an If on the sample rate (`sr`, a scalar int64), one set of weights per rate, as Silero's does."""
    import spox.opset.ai.onnx.v17 as op
    from spox import Tensor, argument, build

    x = argument(Tensor(np.float32, ("batch", 64)))
    if not vad:
        onnx.save(build({"x": x}, {"prob": _spox_net(op, x)}), str(path))
        return path
    sr = argument(Tensor(np.int64, ()))
    (prob,) = op.if_(op.equal(sr, op.const(np.int64(16000))), then_branch=lambda: [_spox_net(op, x)],
                     else_branch=lambda: [_spox_net(op, x)])
    onnx.save(build({"x": x, "sr": sr}, {"prob": prob}), str(path))
    return path


def _spox_net(op, x):
    """MatMul, a LayerNorm written out of primitive ops, Relu, MatMul, Sigmoid."""
    hidden = op.add(op.matmul(x, op.const(_weights(64, 32))), op.const(_weights(32)))
    mean = op.reduce_mean(hidden, axes=[-1])
    centred = op.sub(hidden, mean)
    variance = op.reduce_mean(op.mul(centred, centred), axes=[-1])
    normed = op.div(centred, op.sqrt(op.add(variance, op.const(np.float32(1e-5)))))
    normed = op.add(op.mul(normed, op.const(1 + _weights(32))), op.const(_weights(32)))
    return op.sigmoid(op.matmul(op.relu(normed), op.const(_weights(32, 1))))


# Paddle2ONNX and tf2onnx: a builder's norm (reading `x`, writing `y`) placed in a model under the
# exporter's names

def placed(nodes: list[onnx.NodeProto], tensor: Callable[[str], str], source: str, out: str,
           name: Callable[[onnx.NodeProto, int], str]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """`nodes` reading `source` and writing `out`, every other tensor renamed by `tensor` and each
    node by `name`; with the builder's constants they read, renamed the same way."""
    read = {t for n in nodes for t in n.input if t in CONSTANTS}
    constants = [numpy_helper.from_array(numpy_helper.to_array(CONSTANTS[t]), tensor(t)) for t in sorted(read)]
    ends = {"x": source, "y": out}
    for index, node in enumerate(nodes):
        node.input[:] = [ends.get(t) or tensor(t) for t in node.input]
        node.output[:] = [ends.get(t) or tensor(t) for t in node.output]
        node.name = name(node, index)
    return nodes, constants


class _Graph:
    """Nodes and initializers of a model being assembled."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def add(self, made: tuple[list[onnx.NodeProto], list[onnx.TensorProto]]) -> None:
        self.nodes += made[0]
        self.initializers += made[1]

    def weight(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def save(self, path: Path, inputs: list, output: str) -> Path:
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
        graph = helper.make_graph(self.nodes, "model", inputs, [out], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=path.stem)
        onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True))
        onnx.save(model, str(path))
        return path


def paddle_model(path: Path) -> Path:
    """An OCR recognizer's head as Paddle2ONNX writes it: nodes `p2o.Op.N`, tensors `layer_0.tmp_N`,
    1-D `layer_norm_0.w_0`/`b_0`, batch and sequence dynamic, the norm's input reshaped to a shape
    computed at run time."""
    graph, counter = _Graph(), iter(range(1000))

    def p2o(op: str) -> str:
        return f"p2o.{op}.{next(counter)}"

    def linear(layer: int, source: str, width: int) -> str:
        w = graph.weight(f"linear_{layer}.w_0", _weights(WIDTH, width))
        b = graph.weight(f"linear_{layer}.b_0", _weights(width))
        product, out = f"linear_{layer}.tmp_0", f"linear_{layer}.tmp_1"
        graph.nodes += [helper.make_node("MatMul", [source, w], [product], name=p2o("MatMul")),
                        helper.make_node("Add", [product, b], [out], name=p2o("Add"))]
        return out

    tensors: dict[str, str] = {"scale": "layer_norm_0.w_0", "bias": "layer_norm_0.b_0"}
    renamed = placed(layer_norm(), lambda t: tensors.setdefault(t, f"layer_norm_0.tmp_{len(tensors)}"),
                     _runtime_reshape(graph, linear(0, "x", WIDTH), p2o), "layer_norm_0.tmp_0",
                     lambda node, _: p2o(node.op_type))
    graph.add(renamed)
    graph.nodes.append(helper.make_node("Relu", ["layer_norm_0.tmp_0"], ["relu_0.tmp_0"], name=p2o("Relu")))
    graph.nodes.append(helper.make_node("Softmax", [linear(1, "relu_0.tmp_0", 6)], ["softmax_0.tmp_0"], axis=-1,
                                        name=p2o("Softmax")))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", WIDTH])
    return graph.save(path, [x], "softmax_0.tmp_0")


def _runtime_reshape(graph: _Graph, source: str, p2o: Callable[[str], str]) -> str:
    """`paddle.reshape(h, [0, 0, -1])` to a shape computed at run time (Shape, Slice, Concat):
    onnx's shape inference no longer knows the normalized dim that follows."""
    graph.weight("reshape_0.starts", np.array([0], np.int64))
    graph.weight("reshape_0.ends", np.array([2], np.int64))
    graph.weight("reshape_0.rest", np.array([-1], np.int64))
    graph.nodes += [
        helper.make_node("Shape", [source], ["shape_0.tmp_0"], name=p2o("Shape")),
        helper.make_node("Slice", ["shape_0.tmp_0", "reshape_0.starts", "reshape_0.ends"], ["slice_0.tmp_0"],
                         name=p2o("Slice")),
        helper.make_node("Concat", ["slice_0.tmp_0", "reshape_0.rest"], ["concat_0.tmp_0"], axis=0, name=p2o("Concat")),
        helper.make_node("Reshape", [source, "concat_0.tmp_0"], ["reshape_0.tmp_0"], name=p2o("Reshape"))]
    return "reshape_0.tmp_0"


def tf2onnx_model(path: Path) -> Path:
    """A byte classifier as jax2tf + tf2onnx (Flax's E[x^2] - E[x]^2) and Keras (the folded affine)
    write it: int32 bytes in, an embedding Gather, two norms, mean over the sequence, softmax."""
    graph, scope = _Graph(), "StatefulPartitionedCall/model"
    table = graph.weight(f"{scope}/embed/embedding:0", _weights(256, WIDTH))
    source = f"{scope}/embed/Gather:0"
    graph.nodes.append(helper.make_node("Gather", [table, "bytes"], [source], name=f"{scope}/embed/Gather"))
    for layer, (norm, within) in enumerate([(keras_layer_norm(), "batchnorm"), (flax_layer_norm(), "")]):
        prefix = f"{scope}/encoder/layer_{layer}/LayerNorm_0/{within + '/' if within else ''}"
        out = f"{prefix}out:0"
        graph.add(placed(norm, lambda t, p=prefix: f"{p}{t}:0", source, out,
                         lambda n, i, p=prefix: f"{p}{n.op_type}_{i}"))
        w = graph.weight(f"{scope}/encoder/layer_{layer}/dense/kernel:0", _weights(WIDTH, WIDTH))
        dense = f"{scope}/encoder/layer_{layer}/dense/"
        graph.nodes += [helper.make_node("MatMul", [out, w], [f"{dense}MatMul:0"], name=f"{dense}MatMul"),
                        helper.make_node("Relu", [f"{dense}MatMul:0"], [f"{dense}Relu:0"], name=f"{dense}Relu")]
        source = f"{dense}Relu:0"
    graph.nodes.append(helper.make_node("ReduceMean", [source], [f"{scope}/pool/Mean:0"], axes=[1], keepdims=0,
                                        name=f"{scope}/pool/Mean"))
    w = graph.weight(f"{scope}/head/kernel:0", _weights(WIDTH, 4))
    graph.nodes += [helper.make_node("MatMul", [f"{scope}/pool/Mean:0", w], [f"{scope}/head/MatMul:0"],
                                     name=f"{scope}/head/MatMul"),
                    helper.make_node("Softmax", [f"{scope}/head/MatMul:0"], ["probabilities"], axis=-1,
                                     name=f"{scope}/head/Softmax")]
    ids = helper.make_tensor_value_info("bytes", TensorProto.INT32, ["unk__0", "unk__1"])
    return graph.save(path, [ids], "probabilities")


# PyTorch: a user's own export

def _bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return BertModel(config).eval()


def _export(module, path: Path, names: list[str], outputs: list[str], dynamo: bool, opset: int = 17) -> Path:
    import torch

    ids = torch.randint(0, 128, (2, 8))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=outputs,
                              dynamic_shapes={name: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
                                              for name in names})
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                              output_names=outputs, dynamic_axes=axes)
    return path


def bert_model(path: Path, dynamo: bool) -> Path:
    """A tiny BertModel from its config, exported the way its user would: through a module taking
    the three tensors (transformers 5's BertModel given them by position to TorchScript's tracer
    fails with "got multiple values for argument 'use_cache'")."""
    import torch

    class UserBert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = _bert()

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    return _export(UserBert().eval(), path, ["input_ids", "attention_mask", "token_type_ids"],
                   ["last_hidden_state", "pooler_output"], dynamo)


def torch_vad_model(path: Path) -> Path:
    """The spox VAD's shape by dynamo: `torch.cond` on the sample rate, one network per rate (its
    norm an nn.LayerNorm), exported as an If whose branches hold the networks."""
    import torch

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 1), torch.nn.Sigmoid())

    class Vad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rate16k, self.rate8k = net(), net()

        def forward(self, x, sr):
            return torch.cond(sr == 16000, lambda x: self.rate16k(x), lambda x: self.rate8k(x), (x,))

    torch.manual_seed(0)
    torch.onnx.export(Vad().eval(), (torch.randn(2, 64), torch.tensor(16000)), str(path), dynamo=True,
                      input_names=["x", "sr"], output_names=["prob"],
                      dynamic_shapes=({0: torch.export.Dim("batch")}, None))
    return path


def sentence_transformer_model(path: Path) -> Path:
    """sentence-transformers' encoder (Transformer, mean Pooling, Normalize) as its users export it:
    a plain `torch.onnx.export` of a module that returns the sentence embedding, at opset 14 as
    their guides write it (LayerNorms decomposed: the op came in opset 17)."""
    import torch

    class SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = _bert()

        def forward(self, input_ids, attention_mask, token_type_ids):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return _export(SentenceEncoder().eval(), path, ["input_ids", "attention_mask", "token_type_ids"],
                   ["sentence_embedding"], dynamo=False, opset=14)
