"""What fusion leaves behind, said first and made a verdict: a refused norm leads the summary,
`fuse --strict` fails on it (the file still written), and the nodes the fused norms bypass are
removed (but never one an If body reads, nor a graph output)."""

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import op_types
from test_fusion_spellings import CONSTANTS, _const, _x, different_axes, fused, layer_norm, model, node
from ticknorm.cli import main

REFUSAL = "the mean is over axes [1] but the variance over [2]"


def _prefixed(nodes, prefix, keep):
    """`nodes` with every tensor they compute renamed `prefix`+name except `keep`, so that two
    norms built by the same helper sit in one graph."""
    made = {out for n in nodes for out in n.output} - set(keep)
    for n in nodes:
        n.input[:] = [prefix + name if name in made else name for name in n.input]
        n.output[:] = [prefix + name if name in made else name for name in n.output]
        n.name = prefix + n.name
    return nodes


def _one_fused_one_refused():
    fusable = _prefixed(layer_norm(out="a"), "f_", ["x", "two", "eps", "scale", "bias", "a"])
    return model(fusable + _prefixed(different_axes(out="b"), "r_", ["x", "eps", "b"]) + [node("Add", ["a", "b"], "y")])


def test_the_summary_leads_with_the_refused_norm_and_its_reason():
    summary = fused(_one_fused_one_refused()).report.summary().splitlines()
    assert summary[0] == f"not fused: 1 decomposed norm remains: refused LayerNorm at (root) (r_/ReduceMean_mean): " \
                         f"{REFUSAL}"
    assert summary[1] == "LayerNorm: found 2, fused 1, refused 1, left 0"


def _fuse_cli(tmp_path, m, *args):
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, str(source))
    return CliRunner().invoke(main, ["fuse", str(source), "-o", str(out), *args]), out


def test_strict_exits_1_on_a_refused_norm_and_still_writes_the_others_fused(tmp_path):
    # The file read back gets scopes from its node names (`scopes.ensure_scopes`): `r_/...` is module r_.
    result, out = _fuse_cli(tmp_path, _one_fused_one_refused(), "--strict")
    assert result.exit_code == 1, result.output
    assert (f"error: --strict: 1 decomposed norm not fused, the first refused LayerNorm at r_ (r_/ReduceMean_mean);"
            f" {out} was written with the others fused") in result.output
    assert op_types(onnx.load(str(out))).count("LayerNormalization") == 1


def test_strict_exits_0_when_every_norm_is_fused_and_without_strict_a_refusal_exits_0(tmp_path):
    assert _fuse_cli(tmp_path, model(layer_norm()), "--strict")[0].exit_code == 0
    result, _ = _fuse_cli(tmp_path, _one_fused_one_refused())
    assert result.exit_code == 0 and "not fused: 1 decomposed norm remains" in result.output


def test_casts_the_fused_norms_bypass_are_removed_with_any_other_dead_node():
    """Two fp32-island LayerNorms read one Cast: neither can absorb it, both fuse from the fp16
    input, and the Cast is left reading into nothing."""
    first = _prefixed(layer_norm(source="x32", out="a32", affine="none"), "p_", ["x32", "two", "eps", "a32"])
    second = _prefixed(layer_norm(source="x32", out="b32", affine="none"), "q_", ["x32", "two", "eps", "b32"])
    nodes = [node("Cast", ["x"], "x32", to=TensorProto.FLOAT), *first, *second,
             node("Cast", ["a32"], "a", to=TensorProto.FLOAT16), node("Cast", ["b32"], "b", to=TensorProto.FLOAT16),
             node("Identity", ["x"], "unread"), node("Add", ["a", "b"], "y")]
    result = fused(model(nodes, dtype=TensorProto.FLOAT16), feeds={"x": _x(dtype=np.float16)})
    assert sorted(op_types(result.model)) == ["Add", "LayerNormalization", "LayerNormalization"]
    assert result.report.dead_removed == 2 and "removed 2 nodes nothing read any more" in result.report.summary()


def test_a_node_read_only_inside_an_if_body_and_the_graph_outputs_stay():
    then = helper.make_graph([node("Identity", ["negated"], "t")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([node("Identity", ["x"], "e")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    CONSTANTS["always"] = _const("always", True, np.bool_)
    nodes = [*layer_norm(out="ln"), node("Neg", ["x"], "negated"), node("Abs", ["x"], "side"),
             node("If", ["always"], "branch", then_branch=then, else_branch=other), node("Add", ["ln", "branch"], "y")]
    result = fused(model(nodes, extra_outputs=("side",)))
    assert op_types(result.model) == ["LayerNormalization", "Neg", "Abs", "If", "Add"]
    assert [o.name for o in result.model.graph.output] == ["y", "side"] and result.report.dead_removed == 0


def test_a_fused_norm_nothing_reads_is_removed_and_its_record_says_unverified():
    result = fused(model([*layer_norm(out="unread"), node("Neg", ["x"], "y")]))
    assert op_types(result.model) == ["Neg"] and result.report.records[0].status == "fused"
    assert result.report.records[0].notes[-1] == "its output was read by nothing: removed as dead, so not verified"


def test_what_fusion_did_not_touch_is_written_back_as_it_was_read():
    """`base.write_back` copies the protos of untouched nodes, the graph's value_info of tensors
    still there, its metadata and its quantization annotations (onnx-ir's serializer kept those)."""
    nodes = [*layer_norm(out="ln"), node("Relu", ["ln"], "r"), node("Neg", ["r"], "y")]
    nodes[-1].doc_string = "kept as written"
    m = model(nodes)
    m.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    m.graph.value_info.append(helper.make_tensor_value_info("gone", TensorProto.FLOAT, None))
    m.graph.metadata_props.append(onnx.StringStringEntryProto(key="who", value="a test"))
    annotation = m.graph.quantization_annotation.add()
    annotation.tensor_name = "r"
    annotation.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value="scale")
    result = fused(m)
    graph = result.model.graph
    assert op_types(result.model) == ["LayerNormalization", "Relu", "Neg"]
    assert graph.node[-1] == nodes[-1] and graph.node[-1].doc_string == "kept as written"
    assert [v.name for v in graph.value_info] == ["r"] and graph.metadata_props[0].value == "a test"
    assert [a.tensor_name for a in graph.quantization_annotation] == ["r"]
