"""LayerNorm/RMSNorm fusion on real exports of real modules, checked against PyTorch itself."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import norm_modules as nm
from conftest import export, op_types, ort_outputs, ort_run, torch_outputs
from ticknorm.base.errors import AccuracyError, FusionError
from ticknorm.exporter.fusion import NormTargets, fuse_norms, rewrite as rewrite_module
from ticknorm.base.scopes import get_scope

EXPORTERS = ["dynamo", "torchscript"]


class Holder(nn.Module):
    """Puts the norm at scope 'block.norm' behind a real op, as inside a model."""

    def __init__(self, norm):
        super().__init__()
        self.block = nn.Module()
        self.block.norm = norm

    def forward(self, x):
        return self.block.norm(x * 2.0)


def _fuse_and_check(module, x, exporter, opset=None, fuse_opset=None, atol=1e-5):
    torch.manual_seed(0)
    model = Holder(module).eval()
    feeds = {"x": x}
    exported = export(model, feeds, exporter, opset)
    result = fuse_norms(exported, opset=fuse_opset)
    assert result.report.verified == bool(result.report.count("fused"))
    expected = torch_outputs(model, feeds)
    actual = ort_outputs(result.model, feeds)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a.astype(np.float32), e, atol=atol, rtol=atol)
    return result


POSITIVE = [
    (nm.PowSqrtDiv, (2, 6, 16)),
    (nm.MulRsqrt, (2, 6, 16)),
    (nm.VarMean, (2, 6, 16)),
    (nm.ReciprocalSqrt, (2, 6, 16)),
    (nm.TwoTrailingAxes, (2, 3, 4, 16)),
    (nm.ChannelsFirst, (2, 8, 5, 5)),
    (lambda: nm.PowSqrtDiv(scale=False, bias=False), (2, 6, 16)),
    (lambda: nm.PowSqrtDiv(scale=True, bias=False), (2, 6, 16)),
    (lambda: nm.PowSqrtDiv(scale=False, bias=True), (2, 6, 16)),
]
POSITIVE_IDS = ["pow-sqrt-div", "mul-rsqrt", "var_mean", "reciprocal", "two-axes", "channels-first",
                "no-affine", "scale-only", "bias-only"]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("make, shape", POSITIVE, ids=POSITIVE_IDS)
def test_every_layer_norm_spelling_fuses_to_one_node(make, shape, exporter, rng):
    torch.manual_seed(0)
    x = rng.standard_normal(shape).astype(np.float32)
    result = _fuse_and_check(make(), x, exporter)
    ops = op_types(result.model)
    assert ops.count("LayerNormalization") == 1
    assert not {"ReduceMean", "ReduceSum", "Sqrt", "Pow", "Div", "Reciprocal"} & set(ops), ops
    assert [r.status for r in result.report.records] == ["fused"]
    fused = next(n for n in result.model.graph.node if n.op_type == "LayerNormalization")
    assert get_scope(fused) == "block.norm"
    epsilon = next(a.f for a in fused.attribute if a.name == "epsilon")
    assert epsilon == pytest.approx(nm.EPS, rel=1e-6)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_channels_first_layer_norm_is_wrapped_in_transposes(exporter, rng):
    x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    result = _fuse_and_check(nm.ChannelsFirst(), x, exporter)
    assert op_types(result.model).count("Transpose") == 2
    assert "moved last" in result.report.records[0].notes[0]


def test_torchscript_opset13_layer_norm_is_fused_and_opset_raised(rng):
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    result = _fuse_and_check(nn.LayerNorm(16), x, "torchscript", opset=13)
    assert result.report.opset_before == 13 and result.report.opset_after == 17
    assert op_types(result.model).count("LayerNormalization") == 1
    assert {get_scope(n) for n in result.model.graph.node} == {"", "block.norm"}  # survived the conversion


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_fp16_cast_island_becomes_one_fp16_node(exporter, rng):
    x = rng.standard_normal((2, 6, 16)).astype(np.float16)
    result = _fuse_and_check(nm.HalfIsland().half(), x, exporter, atol=1e-2)
    fused = next(n for n in result.model.graph.node if n.op_type == "LayerNormalization")
    ops = op_types(result.model)
    assert "Cast" not in ops, ops
    assert next(a.i for a in fused.attribute if a.name == "stash_type") == 1
    assert "Cast pair absorbed" in " ".join(result.report.records[0].notes)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_an_output_rounded_to_fp16_on_its_way_is_judged_at_fp16_tolerance(exporter, tmp_path):
    """The fused LayerNorm differs from the decomposed one by ~1e-7 before an fp16 rounding, which
    flips some values by one fp16 step (0.00195 near 3); the shift after it makes that step large
    against fp32's rtol. Export must pass: the output went through fp16."""
    from ticknorm import ExportOptions, api

    torch.manual_seed(0)
    x = torch.randn(64, 128, 16) * 3
    result = api.export(nm.IslandThenShift().eval(), (x,), tmp_path / "m.onnx", ExportOptions(exporter=exporter))
    assert result.fusion.count("fused") == 1 and result.passed
    assert 2 ** -11 <= result.accuracy[0].max_abs <= 2 ** -9  # fp16 steps flipped, far above fp32 atol 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_rms_norm_is_onnx_runtimes_op_below_opset_23_and_onnxs_from_23(exporter, rng):
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    below = _fuse_and_check(nm.T5RMSNorm(), x, exporter)
    assert [(r.status, r.op) for r in below.report.records] == [("fused", "SimplifiedLayerNormalization")]
    assert op_types(below.model).count("SimplifiedLayerNormalization") == 1
    assert below.report.opset_after == below.report.opset_before
    left = fuse_norms(export(Holder(nm.T5RMSNorm()), {"x": x}, exporter), targets=NormTargets(rms="onnx"))
    assert [r.status for r in left.report.records] == ["left"]
    assert "needs opset 23" in left.report.records[0].reason
    assert "RMSNormalization" not in op_types(left.model)
    fused = _fuse_and_check(nm.T5RMSNorm(), x, exporter, fuse_opset=23)
    assert op_types(fused.model).count("RMSNormalization") == 1
    assert fused.report.opset_after == 23


REFUSED = [
    (nm.AxesDiffer, "axes"),
    (nm.EpsOutsideSqrt, "outside the square root"),
    (nm.UnbiasedVariance, "N-1"),
    (nm.CenteredAlsoReturned, "escapes (a graph output"),
    (nm.CenteredReusedInside, "also read by"),
]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("make, reason", REFUSED, ids=[r[1] for r in REFUSED])
def test_look_alikes_are_refused_with_a_reason_and_left_unchanged(make, reason, exporter, rng):
    x = rng.standard_normal((2, 6, 6)).astype(np.float32)
    exported = export(make(), {"x": x}, exporter)
    result = fuse_norms(exported)
    statuses = {(r.kind, r.status) for r in result.report.records}
    assert ("LayerNorm", "refused") in statuses and ("LayerNorm", "fused") not in statuses
    assert any(reason in r.reason for r in result.report.records), result.report.records
    assert op_types(result.model) == op_types(exported)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_non_constant_epsilon_is_refused(exporter, rng):
    feeds = {"x": rng.standard_normal((2, 6, 16)).astype(np.float32), "eps": np.array(1e-5, np.float32)}
    result = fuse_norms(export(nm.EpsInput(), feeds, exporter), feeds=feeds)
    assert [(r.status, r.reason) for r in result.report.records] == [("refused", "epsilon is not a constant")]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_input_scale_of_the_normalized_dims_is_read_by_the_fused_node(exporter, rng):
    """Issue 29: a graph input of exactly the normalized dims is the fused node's scale (it was left
    outside as its own Mul before)."""
    feeds = {"x": rng.standard_normal((2, 6, 16)).astype(np.float32),
             "gamma": rng.standard_normal((16,)).astype(np.float32)}
    module = nm.InputScale()
    result = fuse_norms(export(module, feeds, exporter), feeds=feeds)
    assert op_types(result.model) == ["LayerNormalization"]
    fused = next(n for n in result.model.graph.node if n.op_type == "LayerNormalization")
    assert fused.input[1] == "gamma"
    np.testing.assert_allclose(ort_outputs(result.model, feeds)[0], torch_outputs(module, feeds)[0], atol=1e-5)


def test_per_token_constant_is_not_absorbed_as_scale(rng):
    feeds = {"x": rng.standard_normal((2, 6, 16)).astype(np.float32)}
    module = nm.PerTokenScale()
    result = fuse_norms(export(module, feeds, "torchscript"), feeds=feeds)
    ops = op_types(result.model)
    assert ops.count("LayerNormalization") == 1 and "Mul" in ops
    np.testing.assert_allclose(ort_outputs(result.model, feeds)[0], torch_outputs(module, feeds)[0], atol=1e-5)


def test_a_wrong_rewrite_is_caught_by_verification(monkeypatch, rng):
    feeds = {"x": rng.standard_normal((2, 6, 16)).astype(np.float32)}
    exported = export(Holder(nm.PowSqrtDiv()), feeds, "dynamo")
    real_param = rewrite_module._param
    # Fault injection: every fused scale doubled, as a buggy rewrite would do.
    monkeypatch.setattr(rewrite_module, "_param", lambda value, *rest: real_param(np.asarray(value) * 2.0, *rest))
    with pytest.raises(AccuracyError, match="block.norm"):
        fuse_norms(exported, feeds=feeds)


def test_opset_that_cannot_hold_layer_norm_leaves_it_decomposed(rng):
    feeds = {"x": rng.standard_normal((2, 6, 16)).astype(np.float32)}
    exported = export(Holder(nn.LayerNorm(16)), feeds, "torchscript", opset=13)
    result = fuse_norms(exported, opset=13)
    assert [(r.status, r.op) for r in result.report.records] == [("left", "LayerNormalization")]
    assert "needs opset 17, the target is 13" in result.report.records[0].reason
    assert result.model.opset_import[0].version == 13
    with pytest.raises(FusionError, match="never lowers"):
        fuse_norms(exported, opset=12)


def test_shared_weights_are_reused_not_copied(rng):
    feeds = {"x": rng.standard_normal((2, 6, 16)).astype(np.float32)}
    exported = export(Holder(nm.PowSqrtDiv()), feeds, "torchscript")
    result = fuse_norms(exported)
    before = {t.name for t in exported.graph.initializer}
    fused = next(n for n in result.model.graph.node if n.op_type == "LayerNormalization")
    assert set(fused.input[1:]) <= before  # the model's own weight and bias initializers
    onnx.checker.check_model(result.model)


class TwoNormsOneInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.LayerNorm(16, eps=1e-5), nn.LayerNorm(16, eps=1e-3)

    def forward(self, x):
        return self.a(x) + 2 * self.b(x)


@pytest.mark.parametrize("opset", [13, 16])
def test_two_layer_norms_reading_one_input_are_both_fused(opset, rng):
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    feeds = {"x": x}
    module = TwoNormsOneInput().eval()
    result = fuse_norms(export(module, feeds, "torchscript", opset=opset), feeds=feeds)
    assert [(r.scope, r.status) for r in result.report.records] == [("a", "fused"), ("b", "fused")]
    epsilons = sorted(next(a.f for a in n.attribute if a.name == "epsilon")
                      for n in result.model.graph.node if n.op_type == "LayerNormalization")
    assert epsilons == pytest.approx([1e-5, 1e-3])
    np.testing.assert_allclose(ort_outputs(result.model, feeds)[0], torch_outputs(module, feeds)[0], atol=1e-5)


def test_tensors_read_inside_subgraphs_are_never_removed(rng):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["y"])]
    branch = helper.make_graph([helper.make_node("Identity", ["d"], ["out"])], "then", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 8])])
    other = helper.make_graph([helper.make_node("Identity", ["y"], ["out2"])], "else", [],
                              [helper.make_tensor_value_info("out2", TensorProto.FLOAT, [2, 8])])
    nodes.append(helper.make_node("If", ["flag"], ["z"], then_branch=branch, else_branch=other))
    graph = helper.make_graph(nodes, "g", [x, helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32), "flag": np.array(True)}
    result = fuse_norms(model, feeds=feeds)
    assert [r.status for r in result.report.records] == ["refused"]
    assert "escapes" in result.report.records[0].reason  # `d` is read inside the If branch


def test_a_decoder_with_its_kv_cache_is_fused_and_verified_on_feeds_that_fit(tmp_path):
    """A with-past decoder file and no inputs: the feeds derived from its graph fit together (the
    mask spans past + new tokens, positions continue the past), for a decode step and a prefill;
    random sizes made ONNX Runtime fail on a Gather index instead."""
    import sys
    from pathlib import Path

    from ticknorm import ExportOptions, Inputs, ModelRef, api
    from ticknorm.base.graph_feeds import feed_sets_for_graph

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_models import build

    path = tmp_path / "decoder.onnx"
    api.export(ModelRef(build("LlamaForCausalLM")), Inputs(("input_ids:batch=1xseq=4:int64:0..128",)), path,
               ExportOptions(task="text-generation-with-past", fuse=False))
    decode, prefill = feed_sets_for_graph(onnx.load(str(path)))
    assert decode["past_key_values.0.key"].shape[2] == 3 and decode["attention_mask"].shape[-1] == 3 + 2
    assert prefill["past_key_values.0.key"].shape[2] == 0 and prefill["attention_mask"].shape[-1] == 2
    assert decode["input_ids"].max() < 128  # inside the embedding table
    result, _ = api.fuse(path, tmp_path / "fused.onnx")
    assert result.report.verified and result.report.count("fused") == 5  # 2 layers x 2 RMSNorms + the final one


def _branch_with_layer_norm(name: str, square: str) -> onnx.GraphProto:
    """A branch normalizing the outer graph's `x` the decomposed way (its scale and bias live in
    the outer graph, as in a merged decoder), squaring by Pow or by Mul."""
    from onnx import helper

    nodes = [helper.make_node("ReduceMean", ["x"], [f"{name}_mean"], axes=[-1]),
             helper.make_node("Sub", ["x", f"{name}_mean"], [f"{name}_d"])]
    nodes += ([helper.make_node("Pow", [f"{name}_d", "two"], [f"{name}_sq"])] if square == "pow" else
              [helper.make_node("Mul", [f"{name}_d", f"{name}_d"], [f"{name}_sq"])])
    nodes += [helper.make_node("ReduceMean", [f"{name}_sq"], [f"{name}_var"], axes=[-1]),
              helper.make_node("Add", [f"{name}_var", "eps"], [f"{name}_ve"]),
              helper.make_node("Sqrt", [f"{name}_ve"], [f"{name}_std"]),
              helper.make_node("Div", [f"{name}_d", f"{name}_std"], [f"{name}_n"]),
              helper.make_node("Mul", [f"{name}_n", "scale"], [f"{name}_s"]),
              helper.make_node("Add", [f"{name}_s", "bias"], [f"{name}_y"])]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", onnx.TensorProto.FLOAT, None)])


def test_norms_inside_the_branches_of_an_if_are_fused_and_verified_on_both_branches(rng):
    """Optimum's merged decoder keeps the decoder in both branches of one If: each branch's norm is
    fused, and the graph's outputs are checked on feeds taking each branch."""
    from onnx import helper, numpy_helper

    from ticknorm.exporter.inspect import summarize

    hidden = 8
    initializers = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                    numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
                    numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "scale"),
                    numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "bias")]
    branch = helper.make_node("If", ["use_cache_branch"], ["y"], name="optimum::if",
                              then_branch=_branch_with_layer_norm("with_past", "pow"),
                              else_branch=_branch_with_layer_norm("without_past", "mul"))
    graph = helper.make_graph([branch], "merged", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, hidden]),
                                                  helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, hidden])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 3, hidden)).astype(np.float32)
    taken = [{"x": x, "use_cache_branch": np.array([flag])} for flag in (True, False)]
    summary = summarize(model)  # inspect sees inside the branches
    assert summary.decomposed_norms == 2 and summary.nodes == 1 + 2 * 9
    result = fuse_norms(model, feeds=taken[0], also=taken[1:])
    fused = [r for r in result.report.records if r.status == "fused"]
    assert len(fused) == 2 and result.report.verified and all("inside If 'optimum::if'" in r.notes[-1] for r in fused)
    branches = {a.name: a.g for a in result.model.graph.node[0].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["LayerNormalization"]
    assert [n.op_type for n in branches["else_branch"].node] == ["LayerNormalization"]
    assert len(model.graph.node[0].attribute[0].g.node) == 9  # the caller's model is left as it was
    assert summarize(result.model).fused_norms == 2
    for feeds, expected in zip(taken, result.outputs):
        np.testing.assert_allclose(ort_run(result.model, feeds)["y"], expected["y"], atol=1e-5)
        np.testing.assert_allclose(ort_run(model, feeds)["y"], expected["y"], atol=1e-4)


def test_feeds_the_graph_cannot_be_guessed_for_name_the_inputs_to_give(tmp_path, rng):
    """A dynamic input reshaped into rows of 4: the guessed size (2) cannot be, so `fuse` says which
    inputs to give, in one line, and writes nothing; given them, it fuses."""
    from click.testing import CliRunner
    from onnx import helper, numpy_helper

    from ticknorm.cli import main

    nodes = [helper.make_node("Reshape", ["x", "rows"], ["r"]), *_branch_with_layer_norm("n", "pow").node]
    for node in nodes[1:]:
        node.input[:] = ["r" if name == "x" else name for name in node.input]
    initializers = [numpy_helper.from_array(np.array([-1, 4], np.int64), "rows"),
                    numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                    numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
                    numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "scale"),
                    numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias")]
    graph = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("n_y", onnx.TensorProto.FLOAT, None)], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "rows.onnx"))
    out = tmp_path / "fused.onnx"
    refused = CliRunner().invoke(main, ["fuse", str(tmp_path / "rows.onnx"), "-o", str(out)])
    assert refused.exit_code == 2 and "give the inputs it takes with --input" in refused.stderr
    assert "guessed here: x[n]" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1 and not out.exists()
    done = CliRunner().invoke(main, ["fuse", str(tmp_path / "rows.onnx"), "-o", str(out), "--input", "x:8"])
    assert done.exit_code == 0, done.output
