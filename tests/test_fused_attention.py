"""`export --target ort|onnx`: each decoder layer's attention written as one op with its KV cache
(ONNX Runtime's GroupQueryAttention, or ONNX's own Attention at opset 23), checked against
PyTorch by the export and then driven as a deployer drives it: a prefill and 3 greedy decode
steps, batch 1 and a left-padded batch 2, logits within 1e-4 and the same tokens.

The tiny folders cover what the fused forward reads off each family: Llama (the plain form),
Qwen2 (Q/K/V biases packed), Mistral (a sliding window shorter than the decode), Gemma (its own
scale and norms), Qwen3 (a norm on each head before the rotary, and a head size of 8, which
GroupQueryAttention's rotary refuses: ONNX Runtime's RotaryEmbedding op before it instead), Gemma 2
(soft-capped logits, a window on every other layer), OLMo 2 (norms over all heads at once); and
BERT's family, whose self-attention becomes ONNX Runtime's Attention."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers as T
from click.testing import CliRunner
from decoding import assert_cached_decode, assert_recomputed_decode, session

from ticknorm.base.scopes import SCOPE_KEY
from ticknorm.cli import main

WITH_PAST = "text-generation-with-past"
SHAPE = dict(vocab_size=128, max_position_embeddings=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "LlamaForCausalLM": lambda: T.LlamaConfig(**SHAPE),
    "Qwen2ForCausalLM": lambda: T.Qwen2Config(**SHAPE),
    "MistralForCausalLM": lambda: T.MistralConfig(**SHAPE, sliding_window=5),
    "GemmaForCausalLM": lambda: T.GemmaConfig(**SHAPE, head_dim=16),
    "Qwen3ForCausalLM": lambda: T.Qwen3Config(**{**SHAPE, "hidden_size": 32}, head_dim=8),
    # its own scale, logit soft-capping, and a sliding window on every other layer
    "Gemma2ForCausalLM": lambda: T.Gemma2Config(**SHAPE, head_dim=16, sliding_window=4, query_pre_attn_scalar=24),
    "Olmo2ForCausalLM": lambda: T.Olmo2Config(**SHAPE),  # q_norm and k_norm over all heads at once
}
STEPS = 3


def _model(architecture: str):
    """Random weights, every norm's scale perturbed so that no two norms share one."""
    torch.manual_seed(0)
    model = getattr(T, architecture)(CONFIGS[architecture]()).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(architecture, target, task) -> (the model, the file, the export's output), made once each
    through the CLI."""
    made = {}

    def get(architecture: str, target: str = "ort", task: str = WITH_PAST, *more: str):
        key = (architecture, target, task, *more)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{architecture}-{target}")
            model = _model(architecture)
            model.save_pretrained(root / "model")
            result = CliRunner().invoke(main, ["export", "--model", str(root / "model"), "--target", target,
                                               "--task", task, "--input", "input_ids:batch=2xseq=8:int64",
                                               "-o", str(root / "m.onnx"), *more])
            assert result.exit_code == 0, result.output
            made[key] = (model, root / "m.onnx", result.output)
        return made[key]

    return get


def _ops(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def test_the_ort_form_is_one_op_per_attention_and_per_norm(exported):
    model, path, output = exported("LlamaForCausalLM")
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    layers = model.config.num_hidden_layers
    # per layer: packed Q/K/V, the output projection, gate, up, down; and the head. The residual Adds
    # stay apart from the RMSNorms: ONNX Runtime's Skip kernel is the slower on CPU
    assert {op: ops[op] for op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization",
                                   "SimplifiedLayerNormalization", "MatMul")} == {
        "GroupQueryAttention": layers, "SkipSimplifiedLayerNormalization": 0,
        "SimplifiedLayerNormalization": 2 * layers + 1, "MatMul": 5 * layers + 1}
    assert not ops.keys() & {"Softmax", "Transpose", "RotaryEmbedding", "Tile"}
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert {node.domain for node in attention} == {"com.microsoft"}
    scopes = [{p.key: p.value for p in node.metadata_props}[SCOPE_KEY] for node in attention]
    assert scopes == [f"model.layers.{i}.self_attn" for i in range(layers)]
    assert "Skip norms" not in output
    # each op against its PyTorch module on the example step, the prefill and 2 decode steps
    assert "fused attention checked per module against PyTorch: 2 modules x 4 steps, worst max abs" in output


@pytest.mark.parametrize("batch", [1, 2])
def test_skip_norms_take_each_residual_add_into_its_norm_and_decode_as_pytorch(exported, batch):
    """--skip-norms: every norm an Add feeds is one SkipSimplifiedLayerNormalization; its sum is
    written where the next residual reads it (each but the final norm's), else left unnamed,
    which ONNX Runtime then does not write."""
    model, path, output = exported("LlamaForCausalLM", "ort", WITH_PAST, "--skip-norms")
    layers = model.config.num_hidden_layers
    graph = onnx.load(str(path), load_external_data=False).graph
    skips = [node for node in graph.node if node.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(skips) == 2 * layers  # the first layer's input norm reads the embeddings, no Add
    assert sum(len(node.output) == 4 and node.output[3] != "" for node in skips) == 2 * layers - 1
    assert f"residual Add + norm: {2 * layers} fused into ONNX Runtime's Skip norms" in output
    assert_cached_decode(model, path, batch, STEPS)


@pytest.mark.parametrize("architecture", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 2])
def test_the_ort_form_decodes_as_pytorch(exported, architecture, batch):
    model, path, _ = exported(architecture)
    assert _ops(path)["GroupQueryAttention"] == model.config.num_hidden_layers
    assert_cached_decode(model, path, batch, STEPS)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_graph_taking_position_ids_rotates_each_row_by_its_own(tmp_path, batch):
    """generate()'s positions for a left-padded batch count each row from its first token:
    GroupQueryAttention's rotary reads a prompt's from its first row only, so ONNX Runtime's
    RotaryEmbedding turns Q and K before it, by each row's own."""
    model = _model("LlamaForCausalLM")
    model.save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "model"), "--target", "ort", "--task",
                                       WITH_PAST, "--input", "input_ids:batch=2xseq=8:int64", "--input",
                                       "position_ids:batch=2xseq=8:int64:0..8", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    ops = _ops(tmp_path / "m.onnx")
    assert (ops["GroupQueryAttention"], ops["RotaryEmbedding"]) == (2, 4)
    assert_cached_decode(model, tmp_path / "m.onnx", batch, STEPS, positions=True)


def test_a_head_size_grouped_query_attention_cannot_rotate_gets_onnx_runtimes_rotary_op(exported):
    model, path, _ = exported("Qwen3ForCausalLM")
    ops = _ops(path)
    assert ops["RotaryEmbedding"] == 2 * model.config.num_hidden_layers  # Q and K of each layer
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 9  # q_norm, k_norm too


def test_the_ort_form_without_a_cache_recomputes_as_pytorch(exported):
    model, path, _ = exported("LlamaForCausalLM", task="default")
    assert _ops(path)["GroupQueryAttention"] == model.config.num_hidden_layers
    assert_recomputed_decode(model, path, 2, STEPS)


@pytest.mark.parametrize("batch", [1, 2])
def test_the_onnx_form_is_opset_23s_attention_and_decodes_as_pytorch(exported, batch):
    model, path, output = exported("LlamaForCausalLM", target="onnx")
    ops, layers = _ops(path), model.config.num_hidden_layers
    assert "opset 23" in output
    assert {op: ops[op] for op in ("Attention", "RotaryEmbedding", "RMSNormalization", "MatMul")} == {
        "Attention": layers, "RotaryEmbedding": 2 * layers, "RMSNormalization": 2 * layers + 1,
        "MatMul": 5 * layers + 1}
    assert "Softmax" not in ops
    assert_cached_decode(model, path, batch, STEPS)


@pytest.mark.parametrize("arguments, expected", [
    (["--target", "onnx", "--opset", "20"], "--target onnx writes ONNX's Attention, which opset 23 brought"),
    (["--target", "ort", "--exporter", "torchscript"], "--target ort writes its ops through the dynamo exporter"),
    (["--target", "ort", "--no-check"], "--target ort writes each fused op only with its check against PyTorch"),
    (["--target", "ort", "--ln-target", "plugin"], "--ln-target plugin TensorRT's: give one"),
    (["--target", "plain", "--skip-norms"], "--skip-norms writes ONNX Runtime's Skip norms, for --target ort only"),
    (["--target", "ort", "--skip-norms", "--no-fuse"], "--skip-norms fuses each residual Add into its norm"),
])
def test_a_target_its_ops_cannot_be_written_for_is_refused_in_one_line(tmp_path, arguments, expected):
    _model("LlamaForCausalLM").save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "model"), "--task", WITH_PAST,
                                       "--input", "input_ids:batch=1xseq=4:int64", "-o", str(tmp_path / "m.onnx"),
                                       *arguments])
    assert result.exit_code == 2 and expected in result.output
    assert len(result.output.strip().splitlines()) <= 2 and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_without_llamas_attention_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        tmp_path / "model")
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "model"), "--task", WITH_PAST,
                                       "--target", "ort", "--input", "input_ids:batch=1xseq=4:int64",
                                       "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2, result.output
    assert "GPT2LMHeadModel has no attention written as q/k/v/o projections" in result.output
    assert not (tmp_path / "m.onnx").exists()


ENCODER_SHAPE = dict(vocab_size=128, max_position_embeddings=64, hidden_size=64, intermediate_size=96,
                     num_hidden_layers=2, num_attention_heads=4)
ENCODERS = {
    "BertModel": (lambda: T.BertConfig(**ENCODER_SHAPE), "last_hidden_state"),
    "RobertaForSequenceClassification": (lambda: T.RobertaConfig(**ENCODER_SHAPE), "logits"),
}


def _session_ops(path, tmp_path) -> Counter:
    """The ops ONNX Runtime's CPU session runs once its default optimizations rewrote the file."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # what runs, less NCHWc
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _ops(tmp_path / "session.onnx")


@pytest.mark.parametrize("skip_norms", [False, True])
@pytest.mark.parametrize("architecture", list(ENCODERS))
def test_an_encoders_ort_form_is_onnx_runtimes_attention_and_matches_pytorch_on_a_padded_batch(
        tmp_path, architecture, skip_norms):
    """BERT's family: each self-attention as ONNX Runtime's `Attention` (what its transformers
    optimizer makes of BERT); each post-LN residual over token rows, which ONNX Runtime's session
    keeps as Add + LayerNormalization rather than its slow SkipLayerNormalization (with
    --skip-norms: as SkipLayerNormalization); a batch whose second row is padded at its end runs
    as PyTorch runs it."""
    config, output = ENCODERS[architecture]
    torch.manual_seed(0)
    model = getattr(T, architecture)(config()).eval()
    model.save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "model"), "--target", "ort",
                                       "--input", "input_ids:batch=2xseq=8:int64", "-o", str(tmp_path / "m.onnx"),
                                       *(["--skip-norms"] if skip_norms else [])])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph
    ops, layers = Counter(node.op_type for node in graph.node), model.config.num_hidden_layers
    assert (ops["Attention"], ops["Softmax"]) == (layers, 0)
    # each residual's norm, and the embeddings' where its last Add is of two same-shaped sums (RoBERTa's)
    rewritten = 2 * layers + (architecture.startswith("Roberta"))
    if skip_norms:  # the Add taken into the norm
        assert (ops["SkipLayerNormalization"], ops["LayerNormalization"]) == (rewritten, 2 * layers + 1 - rewritten)
        assert all(len(node.output) == 1 for node in graph.node if node.op_type == "SkipLayerNormalization")
    else:  # both operands of the Add flattened to rows
        assert (ops["SkipLayerNormalization"], ops["LayerNormalization"], ops["Flatten"]) == (
            0, 2 * layers + 1, 2 * rewritten)
        assert f"residual Add + LayerNorm: {rewritten} written over token rows" in result.output
    session_ops = _session_ops(tmp_path / "m.onnx", tmp_path)
    norms = ("SkipLayerNormalization", "LayerNormalization")
    assert {op: session_ops[op] for op in norms} == {op: ops[op] for op in norms}
    scopes = [{p.key: p.value for p in node.metadata_props}[SCOPE_KEY] for node in graph.node
              if node.op_type == "Attention"]
    assert scopes == [f"{'roberta.' if 'Roberta' in architecture else ''}encoder.layer.{i}.attention.self"
                      for i in range(layers)]
    ids = np.random.default_rng(0).integers(3, 128, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, 4:] = 0
    got = session(tmp_path / "m.onnx").run([output], {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        expected = getattr(model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)), output)
    if output == "last_hidden_state":  # a padded position's row is no one's answer
        got, expected = got[mask.astype(bool)], expected.numpy()[mask.astype(bool)]
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=0)


def test_an_encoder_for_the_onnx_form_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**ENCODER_SHAPE)).save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "model"), "--target", "onnx",
                                       "--input", "input_ids:batch=1xseq=4:int64", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2, result.output
    assert "BertModel's bidirectional attention is fused for ONNX Runtime only (--target ort)" in result.output


def test_the_trt_target_writes_the_plain_form_and_says_why(exported):
    model, path, output = exported("LlamaForCausalLM", target="trt")
    ops = _ops(path)
    assert "GroupQueryAttention" not in ops and "Attention" not in ops and ops["Softmax"] == 2
    assert "--target trt: the attention as the exporter writes it, which TensorRT fuses itself" in output


def test_feeds_cut_for_grouped_query_attention_keep_what_is_not_batched():
    """A prompt continued on a cache runs at batch 1 in GroupQueryAttention: the batched feeds
    keep their first row; a 1-D position_ids and a scalar stay as given; a decode step and a
    prompt on an empty cache are not cut."""
    from ticknorm.base.graph_feeds import grouped_query_cut

    feeds = {"input_ids": np.zeros((2, 3), np.int64), "attention_mask": np.ones((2, 7), np.int64),
             "past_key_values.0.key": np.zeros((2, 2, 4, 8), np.float32), "position_ids": np.arange(3),
             "scale": np.float32(1)}
    cut = grouped_query_cut(feeds)
    assert {name: np.shape(value) for name, value in cut.items()} == {
        "input_ids": (1, 3), "attention_mask": (1, 7), "past_key_values.0.key": (1, 2, 4, 8), "position_ids": (3,),
        "scale": ()}
    decode = {**feeds, "input_ids": np.zeros((2, 1), np.int64)}
    prompt = {**feeds, "past_key_values.0.key": np.zeros((2, 2, 0, 8), np.float32)}
    assert grouped_query_cut(decode) is decode and grouped_query_cut(prompt) is prompt
