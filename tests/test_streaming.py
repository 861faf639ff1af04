"""The streamed route for folders larger than memory, at a tiny size: the meta-device export, the
weights written from the shards, and the block-by-block check (which must name a broken block)."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from safetensors.torch import load_file, save_file

from ticknorm import ExportOptions, Inputs, api
from ticknorm.base.errors import CheckpointError, InputSpecError
from ticknorm.base.precision import Precision
from ticknorm.base.graph_feeds import feed_sets_for_graph
from ticknorm.base.progress import Eta
from ticknorm.base.scopes import SCOPE_KEY, module_output_tensors
from ticknorm.exporter.blocks import PieceRunner, check_blocks, cut, repeated_blocks, taps_needed
from ticknorm.exporter.meta import MetaModel
from ticknorm.exporter.streaming import streams
from ticknorm.runtime.ort_runner import OrtRunner
from ticknorm.runtime.torch_runner import TorchRunner

transformers = pytest.importorskip("transformers")
from hf_models import build  # noqa: E402

IDS = Inputs(("input_ids:batch=2xseq=8:int64",))


def _perturbed_llama(layers: int = 3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, max_position_embeddings=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 3-layer Llama in bf16, sharded as save_pretrained shards it."""
    folder = tmp_path_factory.mktemp("streamed") / "llama"
    _perturbed_llama().to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.mark.parametrize("task", ["default", "text-generation-with-past"])
def test_a_streamed_export_matches_the_whole_one(task, sharded, tmp_path):
    streamed = api.export(str(sharded), IDS, tmp_path / "s.onnx", ExportOptions(streaming="on", task=task))
    whole = api.export(str(sharded), IDS, tmp_path / "w.onnx", ExportOptions(streaming="off", task=task))
    assert streamed.passed and whole.passed and streamed.fusion.count("fused", "RMSNorm") == 7
    assert [c.name for c in streamed.accuracy[:3]] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert any(c.name.startswith("logits (vs PyTorch bfloat16)") for c in streamed.accuracy)
    assert streamed.checkpoint_precision == "bf16" and any("streamed from" in note for note in streamed.notes)
    files = {name: onnx.load(str(tmp_path / name)) for name in ("s.onnx", "w.onnx")}
    assert [i.name for i in files["s.onnx"].graph.input] == [i.name for i in files["w.onnx"].graph.input]
    assert [o.name for o in files["s.onnx"].graph.output] == [o.name for o in files["w.onnx"].graph.output]
    assert not any(n.op_type == "Transpose" and n.input[0] in {t.name for t in files["s.onnx"].graph.initializer}
                   for n in files["s.onnx"].graph.node)  # every Linear's transpose folded into its weight
    feeds = feed_sets_for_graph(files["w.onnx"])[0]
    outputs = {}
    for name, model in files.items():
        with OrtRunner(model) as runner:
            outputs[name] = runner.infer(feeds).outputs
    for output, value in outputs["w.onnx"].items():
        np.testing.assert_allclose(outputs["s.onnx"][output], value, atol=1e-5, err_msg=output)


def test_the_block_check_names_a_broken_block_and_judges_the_others_alone(tmp_path):
    """Block 1 of 3 is made to compute wrong numbers: the check names it, and the block after it,
    judged on PyTorch's inputs, still passes; the logits, computed through it, fail."""
    model = _perturbed_llama()
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    assert api.export(str(folder), IDS, tmp_path / "m.onnx", ExportOptions()).passed
    proto = onnx.load(str(tmp_path / "m.onnx"))
    _break(proto, "model.layers.1")
    meta = MetaModel(folder)
    from ticknorm.exporter.hf import HfGraph

    graph = HfGraph(meta.model)
    blocks = repeated_blocks(name for name, _ in graph.named_modules())
    assert blocks == ["model.layers.0", "model.layers.1", "model.layers.2"]
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 128, (2, 8)), "attention_mask": np.ones((2, 8), np.int64)}
    with meta.weights_on_demand(), TorchRunner(graph, [o.name for o in proto.graph.output],
                                               taps=taps_needed(proto, blocks)) as runner:
        reference = runner.infer(feeds)
    found = check_blocks(proto, PieceRunner(proto, blocks), feeds, reference)
    verdicts = {check.name: check.passed for check in found.blocks}
    assert verdicts == {"model.layers.0": True, "model.layers.1": False, "model.layers.2": True}
    assert found.first_failure == "model.layers.1" and not found.outputs[0].passed


def _break(proto: onnx.ModelProto, block: str) -> None:
    """The block's output plus 0.5, by a node inside the block."""
    tensor = module_output_tensors(proto)[block]
    for node in proto.graph.node:
        node.input[:] = [f"{tensor}.broken" if name == tensor else name for name in node.input]
    producer = next(i for i, node in enumerate(proto.graph.node) if tensor in node.output)
    add = helper.make_node("Add", [tensor, "half"], [f"{tensor}.broken"], name="broken")
    add.metadata_props.add(key=SCOPE_KEY, value=block)
    proto.graph.node.insert(producer + 1, add)
    proto.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))


def test_pieces_cover_the_graph_in_order_and_read_only_what_came_before(sharded, tmp_path):
    api.export(str(sharded), IDS, tmp_path / "m.onnx", ExportOptions(streaming="on"))
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    pieces = cut(proto, ["model.layers.0", "model.layers.1", "model.layers.2"])
    assert sum(len(p.nodes) for p in pieces) == len(proto.graph.node)
    assert [p.block for p in pieces if p.block] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    made = {i.name for i in proto.graph.input}
    for piece in pieces:
        assert set(piece.inputs) <= made
        made |= set(piece.outputs)


def test_streaming_on_takes_a_folder_alone(sharded):
    with pytest.raises(InputSpecError, match="no --checkpoint or --adapter"):
        streams(str(sharded), "weights.safetensors", None, "on")
    with pytest.raises(InputSpecError, match="unknown streaming mode"):
        streams(str(sharded), None, None, "sometimes")
    assert not streams(str(sharded), None, None, "auto")  # a tiny model fits in memory: the whole route
    assert streams(str(sharded), None, None, "on")


def test_a_checkpoint_named_otherwise_than_the_model_is_refused_with_the_way_out(tmp_path):
    folder = tmp_path / "llama"
    build("LlamaForCausalLM").save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.final_norm.weight"] = weights.pop("model.norm.weight")
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing model\.norm\.weight.*--streaming off"):
        MetaModel(folder)


def test_eta_reports_the_time_left_and_the_end(monkeypatch):
    said, now = [], [100.0]
    monkeypatch.setattr("ticknorm.base.progress.time.monotonic", lambda: now[0])
    eta = Eta(said.append, "writing", total=100, every=10)
    now[0] = 110.0
    eta(25)
    now[0] = 112.0
    eta(30)  # within 10 s of the last report: quiet
    now[0] = 140.0
    eta(100)
    assert said == ["writing: 25%, 10 s, about 30 s left", "writing: 100%, 40 s"]


def test_index_json_of_the_sharded_folder_is_what_transformers_writes(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_a_streamed_bf16_export_measures_its_islands_piece_by_piece(sharded, tmp_path):
    """--precision bf16 on the streamed route: islands from an fp32 run made piece by piece, the
    weights written low one tensor at a time into the file the output links, every block judged
    at bf16's tolerance (each bf16 piece run upcast: ONNX Runtime's CPU has no bf16 MatMul)."""
    result = api.export(str(sharded), IDS, tmp_path / "m.onnx",
                        ExportOptions(streaming="on", precision=Precision("bf16"), external_data_threshold=0))
    assert result.precision == "bf16" and result.conversion is not None
    checks = {c.name: c for c in result.conversion.checks}
    assert {"model.layers.0", "model.layers.1", "model.layers.2", "logits"} <= checks.keys()
    assert all(c.atol == 0.2 for c in checks.values())
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert model.graph.initializer[0].data_type == onnx.TensorProto.BFLOAT16
    assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {"m.onnx.data"}
    assert (tmp_path / "m.onnx.data").stat().st_mode & 0o044  # a file's usual mode, not a temporary's 0600
    assert api.compare(tmp_path / "m.onnx", str(sharded), IDS).passed


def test_the_streamed_route_refuses_torchscript_and_keeps_the_other_options(sharded, tmp_path):
    with pytest.raises(InputSpecError, match="only the dynamo exporter does"):
        api.export(str(sharded), IDS, tmp_path / "t.onnx", ExportOptions(streaming="on", exporter="torchscript"))
    unfused = api.export(str(sharded), IDS, tmp_path / "u.onnx", ExportOptions(streaming="on", fuse=False))
    assert unfused.fusion is None and unfused.passed
    assert not any(n.op_type == "SimplifiedLayerNormalization" for n in onnx.load(str(tmp_path / "u.onnx")).graph.node)
