"""Real transformers architectures at tiny sizes (random weights, nothing downloaded), exported from
`save_pretrained` folders as users do: every norm fused, each fused node on its module, named
outputs, PyTorch vs ONNX Runtime; decoders also with a KV cache, run as a generation loop."""

import re

import numpy as np
import onnx
import pytest
import torch

from ticknorm import ExportOptions, Inputs, ModelRef, api
from ticknorm.base.errors import ExportError, InputSpecError
from ticknorm.base.scopes import get_scope
from ticknorm.exporter.inspect import FUSED_NORM_OPS, summarize
from ticknorm.exporter.model_ref import task_feeds
from ticknorm.runtime.ort_runner import OrtRunner

transformers = pytest.importorskip("transformers")
from hf_models import CONFIGS, DECODERS, build, norms_that_run  # noqa: E402

WITH_PAST = "text-generation-with-past"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One save_pretrained folder per architecture, made when first asked for."""
    made = {}

    def folder(architecture):
        if architecture not in made:
            made[architecture] = tmp_path_factory.mktemp(architecture) / "model"
            build(architecture).save_pretrained(made[architecture])
        return str(made[architecture])
    return folder


def _norm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}")
            in FUSED_NORM_OPS]


def _feeds(folder: str, specs: list, task: str = "default") -> tuple:
    module = ModelRef(folder).load(task)
    feeds, _ = task_feeds(module, *Inputs(tuple(specs)).feeds())
    return module, feeds


def export(model, path, specs, **options):
    return api.export(model, Inputs(tuple(specs)), path, ExportOptions(**options))


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_architecture_exports_with_every_norm_fused(architecture, folders, tmp_path):
    specs = CONFIGS[architecture][1]
    path = tmp_path / "model.onnx"
    result = export(folders(architecture), path, specs)
    assert result.passed and max(c.max_abs for c in result.accuracy) < 1e-4
    model = onnx.load(str(path))
    summary = summarize(model)
    assert summary.decomposed_norms == 0, summary.decomposed
    module, feeds = _feeds(folders(architecture), specs)
    expected = norms_that_run(module, feeds)
    norms = _norm_nodes(model)
    assert len(norms) == len(expected) > 0
    assert {get_scope(n) for n in norms} == expected  # each fused node stands on its own module
    assert [o.name for o in model.graph.output][0] in ("last_hidden_state", "logits")
    if "attention_mask" in feeds:
        assert "attention_mask" in [i.name for i in model.graph.input]  # a real input, not a constant


# What TorchScript (frozen since torch 2.5) cannot trace in transformers 5, and the line that says so.
TORCHSCRIPT_REFUSES = {"WhisperForConditionalGeneration": "cannot export op aten::diff in module 'model.decoder' "
                                                          "(WhisperDecoder)"}


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_torchscript_exports_them_too(architecture, folders, tmp_path):
    specs = CONFIGS[architecture][1]
    if architecture in TORCHSCRIPT_REFUSES:
        with pytest.raises(ExportError, match=re.escape(TORCHSCRIPT_REFUSES[architecture])):
            export(folders(architecture), tmp_path / "m.onnx", specs, exporter="torchscript")
        return
    result = export(folders(architecture), tmp_path / "m.onnx", specs, exporter="torchscript")
    assert result.passed
    assert summarize(onnx.load(str(tmp_path / "m.onnx"))).decomposed_norms == 0


@pytest.fixture(scope="module", params=[(a, e) for a in DECODERS for e in ("dynamo", "torchscript")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def with_past(request, folders, tmp_path_factory):
    architecture, exporter = request.param
    path = tmp_path_factory.mktemp("past") / "decoder.onnx"
    result = export(folders(architecture), path, ["input_ids:batch=2xseq=8:int64"], exporter=exporter,
                        task=WITH_PAST)
    return architecture, folders(architecture), path, result


def test_decoder_with_past_has_cache_inputs_and_outputs(with_past):
    architecture, _, path, result = with_past
    model = onnx.load(str(path))
    layers = CONFIGS[architecture][0]().get_text_config().num_hidden_layers
    cache = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"] + [f"past_key_values.{c}" for c in cache]
    assert [o.name for o in model.graph.output] == ["logits"] + [f"present.{c}" for c in cache]
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "total_sequence_length"]
    assert dims["past_key_values.0.key"][0] == "batch" and dims["past_key_values.0.key"][2] == "past_sequence_length"
    steps = {c.name.split(" (")[1].rstrip(")") for c in result.accuracy if " (" in c.name}
    assert steps == {"prefill", "decode 1", "decode 2"} and result.passed


def test_decoder_with_past_serves_a_generation_loop(with_past):
    """ONNX Runtime alone, feeding its own present back as past, gives the logits the Hugging Face
    model gives on the whole sequence at once (no cache, no wrapper)."""
    _, folder, path, _ = with_past
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model = onnx.load(str(path))
    names = [i.name for i in model.graph.input if i.name.startswith("past_key_values.")]
    heads_dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    tokens = np.random.default_rng(3).integers(0, 128, (2, 5))
    past = {n: np.zeros((2, heads_dims[n][1], 0, heads_dims[n][3]), np.float32) for n in names}
    step, logits = tokens, []
    with OrtRunner(model) as runner:
        for _ in range(3):
            length = step.shape[1] + next(iter(past.values())).shape[2]
            out = runner.infer({"input_ids": step, "attention_mask": np.ones((2, length), np.int64), **past}).outputs
            logits.append(out["logits"][:, -1])
            past = {n: out[n.replace("past_key_values", "present")] for n in names}
            step = out["logits"][:, -1:].argmax(-1)
            tokens = np.concatenate([tokens, step], axis=1)
    with torch.no_grad():
        full = reference(input_ids=torch.from_numpy(tokens), use_cache=False).logits.numpy()
    for n, got in enumerate(logits):
        np.testing.assert_allclose(got, full[:, 4 + n], atol=1e-4, rtol=1e-3)


def test_compare_finds_the_task_in_the_graph(with_past):
    _, folder, path, _ = with_past
    report = api.compare(path, folder, Inputs(("input_ids:batch=2xseq=8:int64",)))
    assert report.passed and "present.0.key" in [c.name for c in report.outputs["ort"]]


def test_factory_of_a_transformers_model_exports_the_same_way(tmp_path):
    result = export("tests/hf_models.py:llama", tmp_path / "l.onnx", ["input_ids:batch=2xseq=8:int64"])
    assert result.passed and [c.name for c in result.accuracy] == ["logits"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "l.onnx")).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 5


def test_rms_norm_targets(folders, tmp_path):
    folder = folders("LlamaForCausalLM")
    onnx23 = export(folder, tmp_path / "a.onnx", ["input_ids:2x8:int64"], opset=23)
    assert onnx23.passed
    ops = [n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node]
    assert ops.count("RMSNormalization") == 5 and "SimplifiedLayerNormalization" not in ops
    left = export(folder, tmp_path / "b.onnx", ["input_ids:2x8:int64"], rms_target="onnx")
    assert left.fusion.count("left", "RMSNorm") == 5
    assert "RMSNormalization needs opset 23" in left.fusion.summary()


def test_task_with_past_on_an_encoder_is_one_clear_error(folders, tmp_path):
    with pytest.raises(InputSpecError, match="BertModel takes no KV cache"):
        export(folders("BertModel"), tmp_path / "m.onnx", ["input_ids:2x8:int64"], task=WITH_PAST)
    with pytest.raises(InputSpecError, match="needs a Hugging Face decoder"):
        export("tests/factories.py:small", tmp_path / "m.onnx", ["x:2x8"], task=WITH_PAST)
    assert list(tmp_path.iterdir()) == []


def test_an_input_the_model_does_not_take_is_named(folders, tmp_path):
    with pytest.raises(InputSpecError, match="LlamaForCausalLM.forward has no parameter token_type_ids"):
        export(folders("LlamaForCausalLM"), tmp_path / "m.onnx", ["input_ids:2x8:int64", "token_type_ids:2x8:int64"])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_pytorch_attention_fast_path_is_off_while_exporting(exporter, tmp_path):
    """`nn.TransformerEncoderLayer` in eval runs `aten::_native_multi_head_attention`, which has no
    ONNX translation; the export takes the plain path and still matches the fast one."""
    result = export("tests/factories.py:torch_encoder", tmp_path / "e.onnx", ["x:2x5x16"], exporter=exporter)
    assert result.passed
    ops = [n.op_type for n in onnx.load(str(tmp_path / "e.onnx")).graph.node]
    assert ops.count("LayerNormalization") == 5
    assert torch.backends.mha.get_fastpath_enabled()  # restored for the user's own code


def test_opset_below_17_leaves_channels_first_norms_or_puts_them_on_the_plugin(folders, tmp_path):
    folder, specs = folders("ConvNextModel"), CONFIGS["ConvNextModel"][1]
    left = export(folder, tmp_path / "a.onnx", specs, exporter="torchscript", opset=14)
    assert left.passed and left.opset == 14
    assert left.fusion.count("left", "LayerNorm") > 0 and left.fusion.count("fused") == 0
    plugin = export(folder, tmp_path / "b.onnx", specs, exporter="torchscript", opset=14, ln_target="plugin")
    assert plugin.passed and plugin.opset == 14 and plugin.fusion.verified
    ops = [n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node]
    assert ops.count("LayerNorm") == plugin.fusion.count("fused") == left.fusion.count("left", "LayerNorm")
    assert "LayerNormalization" not in ops


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_an_encoder_decoders_decoder_step_exports_as_optimum_names_it(exporter, folders, tmp_path):
    result = export(folders("T5ForConditionalGeneration"), tmp_path / "d.onnx", ["input_ids:batch=2xseq=4:int64"],
                    exporter=exporter, task="text2text-generation-with-past")
    assert result.passed and result.fusion.count("fused", "RMSNorm") == 7
    model = onnx.load(str(tmp_path / "d.onnx"))
    inputs = [i.name for i in model.graph.input]
    assert inputs[:3] == ["input_ids", "encoder_hidden_states", "encoder_attention_mask"]
    assert inputs[3:7] == [f"past_key_values.0.{a}.{k}" for a in ("decoder", "encoder") for k in ("key", "value")]
    assert [o.name for o in model.graph.output][:2] == ["logits", "present.0.decoder.key"]


def test_whisper_decoder_step_takes_encoder_states_made_from_features(folders, tmp_path):
    """A decoder step of a model whose encoder reads log-mel features: the encoder states it is
    exported and checked on come from features, not tokens."""
    result = export(folders("WhisperForConditionalGeneration"), tmp_path / "d.onnx", ["input_ids:batch=2xseq=3:int64"],
                    task="text2text-generation-with-past")
    assert result.passed and max(c.max_abs for c in result.accuracy) < 1e-4
    inputs = [i.name for i in onnx.load(str(tmp_path / "d.onnx")).graph.input]
    assert inputs[:3] == ["input_ids", "encoder_hidden_states", "encoder_attention_mask"]
