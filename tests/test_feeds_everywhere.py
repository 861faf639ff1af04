"""Every command builds its feeds from the file: an Optimum- or GenAI-style decoder (positions, a KV
cache, a merged decoder's branch flag) and a BERT-style encoder (token types) run without
`--input`, `--input NAME:DIMS` sets the sizes, and the sizes chosen for symbolic dims are said."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ticknorm import api
from ticknorm.base.graph_feeds import feeds_for_file
from ticknorm.base.inputs import Inputs, graph_feeds
from ticknorm.cli import main
from ticknorm.runtime.ort_runner import OrtRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
EXAMPLE = ["--model", "examples/tiny_transformer.py:build", "--checkpoint", "examples/tiny_transformer.safetensors"]
VOCAB, POSITIONS, TYPES = 50, 64, 3


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _table(name: str, rows: int, seed: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32), name)


def optimum_decoder(merged: bool = False) -> onnx.ModelProto:
    """One layer of an Optimum `text-generation-with-past` file, as its inputs are spelled: tokens
    and positions gathered from tables, the cache concatenated with the step's keys, a mask that
    must span past + tokens (ONNX Runtime refuses any other length) and, `merged`, the branch flag."""
    value = helper.make_tensor_value_info
    inputs = [value("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              value("attention_mask", TensorProto.INT64, ["batch_size", "past_sequence_length + 1"]),
              value("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    inputs += [value(f"past_key_values.0.{kind}", TensorProto.FLOAT, ["batch_size", 1, "past_sequence_length", 4])
               for kind in ("key", "value")]
    nodes = [helper.make_node("Gather", ["tokens", "input_ids"], ["embedded"]),
             helper.make_node("Gather", ["positions", "position_ids"], ["placed"]),
             helper.make_node("Add", ["embedded", "placed"], ["hidden"]),
             helper.make_node("Unsqueeze", ["hidden", "one"], ["step"]),
             helper.make_node("Concat", ["past_key_values.0.key", "step"], ["present.0.key"], axis=2),
             helper.make_node("Concat", ["past_key_values.0.value", "step"], ["present.0.value"], axis=2),
             helper.make_node("Unsqueeze", ["attention_mask", "one_three"], ["mask4"]),
             helper.make_node("Cast", ["mask4"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["present.0.key", "maskf"], ["logits"])]
    outputs = [value("logits", TensorProto.FLOAT, None), value("present.0.key", TensorProto.FLOAT, None),
               value("present.0.value", TensorProto.FLOAT, None)]
    if merged:
        inputs.append(value("use_cache_branch", TensorProto.BOOL, [1]))
        branch = [helper.make_graph([helper.make_node("Identity", ["hidden"], [f"{name}_out"])], name, [],
                                    [value(f"{name}_out", TensorProto.FLOAT, None)]) for name in ("cached", "fresh")]
        nodes.append(helper.make_node("If", ["use_cache_branch"], ["branch_out"], then_branch=branch[0],
                                      else_branch=branch[1]))
        outputs.append(value("branch_out", TensorProto.FLOAT, None))
    initializers = [_table("tokens", VOCAB, 1), _table("positions", POSITIONS, 2),
                    numpy_helper.from_array(np.array([1], np.int64), "one"),
                    numpy_helper.from_array(np.array([1, 3], np.int64), "one_three")]
    graph = helper.make_graph(nodes, "optimum", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bert_style() -> onnx.ModelProto:
    """An encoder's embeddings: tokens and token types gathered from their tables, a mask."""
    value = helper.make_tensor_value_info
    inputs = [value(name, TensorProto.INT64, ["batch", "sequence"])
              for name in ("input_ids", "attention_mask", "token_type_ids")]
    nodes = [helper.make_node("Gather", ["tokens", "input_ids"], ["embedded"]),
             helper.make_node("Gather", ["types", "token_type_ids"], ["typed"]),
             helper.make_node("Add", ["embedded", "typed"], ["hidden"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "minus_one"], ["mask3"]),
             helper.make_node("Mul", ["hidden", "mask3"], ["last_hidden_state"])]
    graph = helper.make_graph(nodes, "bert", inputs, [value("last_hidden_state", TensorProto.FLOAT, None)],
                              [_table("tokens", VOCAB, 3), _table("types", TYPES, 4),
                               numpy_helper.from_array(np.array([-1], np.int64), "minus_one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _runs(model: onnx.ModelProto, feeds: dict) -> dict:
    with OrtRunner(model) as runner:
        return runner.infer(graph_feeds(model, feeds)).outputs


@pytest.mark.parametrize("merged", [False, True])
def test_an_optimum_decoder_gets_a_decode_step_and_a_prefill_that_fit(merged):
    model = optimum_decoder(merged)
    found = feeds_for_file(model)
    decode, prefill = found.feed_sets
    assert decode["past_key_values.0.key"].shape[2] == 3 and decode["attention_mask"].shape == (2, 5)
    assert decode["position_ids"].tolist() == [[3, 4], [3, 4]] and prefill["position_ids"].tolist() == [[0, 1]] * 2
    assert decode["input_ids"].max() < VOCAB and decode["input_ids"].dtype == np.int64
    if merged:
        assert decode["use_cache_branch"].tolist() == [True] and prefill["use_cache_branch"].tolist() == [False]
    for feeds in found.feed_sets:
        assert _runs(model, feeds)["logits"].shape[2] == feeds["attention_mask"].shape[1]
    assert found.note == ("inputs built from the graph, its symbolic dims at batch_size=2, sequence_length=2, "
                          "past_sequence_length=3 then 0 (a decode step, then a prefill); --input NAME:DIMS sets them")


def test_input_specs_set_the_sizes_and_take_the_graph_dtype():
    """`input_ids:1x6` (no dtype: the graph's int64) sizes the tokens, the positions and the mask;
    a given mask fixes the past: one iteration, nothing said about the sizes it fixed."""
    model = optimum_decoder(merged=True)
    found = feeds_for_file(model, Inputs(("input_ids:1x6",)))
    decode = found.feed_sets[0]
    assert decode["input_ids"].dtype == np.int64 and decode["input_ids"].shape == (1, 6)
    assert decode["position_ids"].tolist() == [[3, 4, 5, 6, 7, 8]] and decode["attention_mask"].shape == (1, 9)
    assert found.note == ("inputs built from the graph, its symbolic dims at past_sequence_length=3 then 0 (a decode "
                          "step, then a prefill); --input NAME:DIMS sets them")
    fixed = feeds_for_file(model, Inputs(("input_ids:1x6", "attention_mask:1x10")))
    (only,) = fixed.feed_sets
    assert only["past_key_values.0.key"].shape == (1, 1, 4, 4) and only["position_ids"].tolist() == [[4, 5, 6, 7, 8, 9]]
    assert fixed.note == "" and _runs(model, only)["logits"].shape == (1, 1, 10, 4)


def test_a_bert_style_graph_gets_token_types_inside_their_table():
    model = bert_style()
    (feeds,) = feeds_for_file(model, Inputs(("input_ids:4x32",), seed=3)).feed_sets
    assert feeds["token_type_ids"].shape == (4, 32) and set(np.unique(feeds["token_type_ids"])) == {0, 1, 2}
    assert feeds["input_ids"].max() >= 2 and feeds["input_ids"].max() < VOCAB
    assert (feeds["attention_mask"] == 1).all()
    assert graph_feeds(model, {"input_ids": feeds["input_ids"]})["token_type_ids"].max() == 0  # what BERT assumes
    assert _runs(model, feeds)["last_hidden_state"].shape == (4, 32, 4)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    result = run("export", *EXAMPLE, "--input", "input_ids:batch=2xseq=16:int64:0..1000", "-o", path,
                 "--exporter", "torchscript")
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize("command", ["compare", "profile", "report", "snapshot", "convert", "trtexec"])
def test_every_command_runs_a_file_without_input_and_says_the_sizes(tiny_file, tmp_path, command):
    timing = ["--iterations", "2", "--warmup", "0"]
    args = {"compare": ["compare", tiny_file, *EXAMPLE],
            "profile": ["profile", tiny_file, *EXAMPLE, "--runtime", "ort", *timing],
            "report": ["report", tiny_file, *EXAMPLE, "--runtime", "ort", *timing, "-o", tmp_path / "r.html"],
            "convert": ["convert", tiny_file, "--precision", "fp16", "-o", tmp_path / "half.onnx"],
            "snapshot": ["drift", "snapshot", tiny_file, *EXAMPLE, "-o", tmp_path / "bundle"],
            "trtexec": ["trtexec-command", tiny_file]}[command]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "inputs built from the graph, its symbolic dims at batch=2, seq=2; --input NAME:DIMS sets them" \
        in result.output
    given = run(*args, "--input", "input_ids:3x5")
    assert given.exit_code == 0, given.output
    assert "inputs built from the graph" not in given.output
    if command == "trtexec":
        assert "input_ids:3x5" in given.output


class _Relu(nn.Module):
    def forward(self, x):
        return x.relu()


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.output = _Relu(), _Relu()

    def forward(self, x):
        return self.output(self.attention(x))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(), _Layer()])

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class _Wrapped(nn.Module):
    """The model a file exported through a wrapper (`/m/encoder/...` node names) came from."""

    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()

    def forward(self, x):
        return self.encoder(x)


def test_profile_maps_a_wrapper_prefixed_file_onto_the_model_modules(tmp_path):
    names = [f"/m/encoder/layer.{i}/{part}/Relu" for i in (0, 1) for part in ("attention", "output")]
    outputs = [f"t{i}" for i in range(len(names))]
    nodes = [helper.make_node("Relu", [src], [dst], name=name)
             for name, src, dst in zip(names, ["x", *outputs[:-1]], outputs)]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, [2, 4])],
                              [value(outputs[-1], TensorProto.FLOAT, [2, 4])])
    path = tmp_path / "wrapped.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = api.profile(path, _Wrapped(), Inputs(), runtimes=("ort",), timing=api.Timing(2, 0))
    modules = [module for module, _ in result.rows()]
    assert modules == [f"encoder.layer.{i}.{part}" for i in (0, 1) for part in ("attention", "output")]


class _RecordsIds(nn.Module):
    """An embedding that keeps the largest token id it was called with."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(300, 8)
        self.largest = -1

    def forward(self, input_ids):
        self.largest = max(self.largest, int(input_ids.max()))
        return self.embedding(input_ids).sum(-1)


def test_export_draws_integer_inputs_again_inside_the_graph_index_range(tmp_path):
    model = _RecordsIds()
    result = api.export(model, Inputs(("input_ids:4x64:int64",)), tmp_path / "ids.onnx",
                        api.ExportOptions(exporter="torchscript"))
    assert result.passed and 2 < model.largest < 300
    pinned = _RecordsIds()
    api.export(pinned, Inputs(("input_ids:4x64:int64:0..2",)), tmp_path / "pinned.onnx",
               api.ExportOptions(exporter="torchscript"))
    assert pinned.largest == 1  # a range the user gave is kept


@pytest.fixture(scope="module")
def optimum_llama(tmp_path_factory):
    """A tiny Llama's folder and its `text-generation-with-past` file as Optimum spells its inputs:
    with `position_ids`, which the model computes itself from the cache when not given."""
    from hf_models import build

    folder = tmp_path_factory.mktemp("llama")
    build("LlamaForCausalLM").save_pretrained(folder / "hf")
    path = folder / "decoder.onnx"
    api.export(str(folder / "hf"), Inputs(("input_ids:batch=1xseq=4:int64",)), path,
               api.ExportOptions(task="text-generation-with-past", fuse=False))
    model = onnx.load(str(path))
    model.graph.input.insert(2, helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                              ["batch_size", "sequence_length"]))
    onnx.save(model, str(path))
    return path, folder / "hf"


@pytest.mark.parametrize("given", [(), ("--input", "input_ids:1x4")])
def test_compare_runs_an_optimum_decoder_file_against_its_folder(optimum_llama, given):
    """It exited 2 (inputs do not match the model: missing position_ids)."""
    path, folder = optimum_llama
    result = run("compare", path, "--model", folder, *given)
    assert result.exit_code == 0, result.output
    assert "logits (iteration 2)" in result.output if not given else "logits" in result.output


def test_a_bert_file_with_token_types_runs_against_its_folder_without_input(tmp_path):
    """Token types had to be spelled out; now they are built from the file, for the model and the
    graph alike (the bundle keeps them for `drift check`)."""
    from hf_models import build

    build("BertModel").save_pretrained(tmp_path / "hf")
    path = tmp_path / "bert.onnx"
    spec = ("input_ids:batch=2xseq=8:int64", "token_type_ids:batch=2xseq=8:int64")
    api.export(str(tmp_path / "hf"), Inputs(spec), path, api.ExportOptions(exporter="torchscript"))
    assert "token_type_ids" in [value.name for value in onnx.load(str(path)).graph.input]
    for command in (["compare"], ["profile", "--runtime", "torch,ort", "--iterations", "2", "--warmup", "0"],
                    ["drift", "snapshot", "-o", tmp_path / "bundle"]):
        result = run(*command[:2 if command[0] == "drift" else 1], path, "--model", tmp_path / "hf",
                     *command[2 if command[0] == "drift" else 1:])
        assert result.exit_code == 0, result.output
        assert "its symbolic dims at batch=2, seq=2" in result.output
    assert "token_type_ids" in (tmp_path / "bundle" / "inputs.json").read_text()


class _ScaledIds(_RecordsIds):
    """Ids after a float input: drawn from one generator, the ids depend on what was drawn first."""

    def forward(self, scale, input_ids):  # type: ignore[override]
        self.last = input_ids.detach().numpy().copy()
        return super().forward(input_ids) * scale.sum()


def test_the_ids_export_checks_are_those_every_later_command_draws(tmp_path):
    specs = ("scale:4x3:float32", "input_ids:4x64:int64")
    model = _ScaledIds()
    result = api.export(model, Inputs(specs), tmp_path / "ids.onnx", api.ExportOptions(exporter="torchscript"))
    later = Inputs(specs).feeds(onnx.load(str(tmp_path / "ids.onnx")))[0]
    assert result.passed and later["input_ids"].max() > 2
    np.testing.assert_array_equal(model.last, later["input_ids"])


def test_a_cache_whose_head_size_is_symbolic_takes_it_from_a_given_past():
    """ONNX Runtime GenAI's builder names the cache's head size too (`kv_cache_dim`): only axis 2
    is the cache's length, so one given past sizes every other's head like its own."""
    cache = ["batch_size", 4, "past_sequence_length", "kv_cache_dim"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    inputs += [helper.make_tensor_value_info(f"past_key_values.0.{kind}", TensorProto.FLOAT, cache)
               for kind in ("key", "value")]
    graph = helper.make_graph([helper.make_node("Identity", ["past_key_values.0.value"], ["out"])], "builder", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, cache)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = feeds_for_file(model, Inputs(("past_key_values.0.key:1x4x3x64",))).feed_sets
    assert [(f["past_key_values.0.value"].shape, f["attention_mask"].shape[1] - f["input_ids"].shape[1])
            for f in feeds] == [((1, 4, 3, 64), 3)]


def _builder_like_decoder(layers=1, quantized=False, heads=2, kv_heads=1, head=8, hidden=16,
                          vocab=32) -> onnx.ModelProto:
    """The GenAI builder's decoder in small: each layer's Q/K/V packed into GroupQueryAttention
    (nodes unnamed), the cache's head size symbolic (`kv_cache_dim`), the mask read as lengths
    (`seqlens_k`, total length); `quantized`: the projection ONNX Runtime's 4-bit MatMulNBits, as
    the builder's int4 files have it, which ONNX's shape inference does not type."""
    rng = np.random.default_rng(0)
    width = (heads + 2 * kv_heads) * head
    cache = ["batch_size", kv_heads, "past_sequence_length", "kv_cache_dim"]
    present = ["batch_size", kv_heads, "total_sequence_length", "kv_cache_dim"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = []
    weights = [numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "embed"),
               numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    if quantized:  # K = hidden in one block of 16: 8 bytes of 4-bit values per output column
        weights += [numpy_helper.from_array(rng.integers(0, 256, (width, 1, hidden // 2)).astype(np.uint8), "qkv"),
                    numpy_helper.from_array(np.full(width, 0.05, np.float32), "qkv_scales")]
    else:
        weights.append(numpy_helper.from_array(rng.standard_normal((hidden, width)).astype(np.float32), "qkv"))
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"]),
        helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["lengths"], keepdims=0),
        helper.make_node("Sub", ["lengths", "axis1"], ["last"]),
        helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"], start=1, end=2),
        helper.make_node("Squeeze", ["mask_shape"], ["total"]),
        helper.make_node("Cast", ["total"], ["total_sequence_length"], to=TensorProto.INT32),
    ]
    for layer in range(layers):
        past = [f"past_key_values.{layer}.{kind}" for kind in ("key", "value")]
        inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, cache) for name in past]
        outputs += [helper.make_tensor_value_info(f"out{layer}", TensorProto.FLOAT, None)]
        outputs += [helper.make_tensor_value_info(f"present.{layer}.{kind}", TensorProto.FLOAT, present)
                    for kind in ("key", "value")]
        nodes.append(helper.make_node("MatMulNBits", ["x", "qkv", "qkv_scales"], [f"packed{layer}"],
                                      domain="com.microsoft", K=hidden, N=width, bits=4, block_size=hidden)
                     if quantized else helper.make_node("MatMul", ["x", "qkv"], [f"packed{layer}"]))
        nodes.append(helper.make_node(
            "GroupQueryAttention", [f"packed{layer}", "", "", *past, "seqlens_k", "total_sequence_length"],
            [f"out{layer}", f"present.{layer}.key", f"present.{layer}.value"], domain="com.microsoft",
            num_heads=heads, kv_num_heads=kv_heads))
    graph = helper.make_graph(nodes, "builder", inputs, outputs, weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("layers, quantized", [(1, False), (2, False), (2, True)])
def test_a_symbolic_head_size_of_grouped_query_attentions_cache_comes_from_its_query_width(layers, quantized):
    """With nothing given, the builder's `kv_cache_dim` is the packed query's width over its heads
    (2 query + 2 x 1 KV heads of 8 = 32 wide; a MatMulNBits' width is its N): the feeds run in
    ONNX Runtime as built."""
    model = _builder_like_decoder(layers, quantized)
    found = feeds_for_file(model)
    assert found.chosen["kv_cache_dim"] == [8, 8]
    with OrtRunner(model) as runner:
        for feeds in found.feed_sets:
            assert feeds["past_key_values.0.key"].shape[3] == 8
            out = runner.infer(feeds).outputs
            assert out[f"present.{layers - 1}.key"].shape[2] == feeds["attention_mask"].shape[1]
