"""`--keep-fp32` on foreign graphs (Paddle2ONNX, tf2onnx, names that carry no module): globs match ONNX node names
and `op:` op types, a glob that matches nothing is refused in one line, and the glob a drifting
conversion suggests is one of this graph's."""

import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from ticknorm.base.scopes import SCOPE_KEY, ensure_scopes, get_scope
from ticknorm.cli import main

TF2ONNX = ("model/dense_1/MatMul", "model/dense_1/BiasAdd", "model/softmax/Softmax")
PADDLE = ("p2o.MatMul.3", "p2o.Add.4", "p2o.Softmax.5")
SCOPELESS = ("MatMul_0", "Add_1", "Softmax_2")  # names no scope source reads: the graph has only its root


def _classifier(names: tuple[str, ...]) -> onnx.ModelProto:
    """x @ W + b, then Softmax: the head of a classifier as a foreign exporter names it."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W"),
               numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name=names[0]),
             helper.make_node("Add", ["h", "b"], ["logits"], name=names[1]),
             helper.make_node("Softmax", ["logits"], ["y"], name=names[2], axis=-1)]
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _cancelling(*scopes: str) -> onnx.ModelProto:
    """(x + 1000.3) - 1000: fp16 holds 1000.3 as 1000.5 and x + 1000.3 only to 0.5, so the low graph is
    off by up to 0.45; no rule sees it. (Not (x + 1e4) - 1e4: ONNX Runtime's CPU provider, whose
    run of the fp16 graph is the verdict, computes that Add and Sub in fp32 and gets x back.)
    `scopes`: the two nodes' modules, as ticknorm's export records them."""
    weights = [numpy_helper.from_array(np.array(1000.3, np.float32), "shift"),
               numpy_helper.from_array(np.array(1000.0, np.float32), "unshift")]
    nodes = [helper.make_node("Add", ["x", "shift"], ["shifted"], name="p2o.Add.0"),
             helper.make_node("Sub", ["shifted", "unshift"], ["y"], name="p2o.Sub.1")]
    graph = helper.make_graph(nodes, "cancel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], weights)
    for node, scope in zip(graph.node, scopes):
        node.metadata_props.add(key=SCOPE_KEY, value=scope)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _convert(model: onnx.ModelProto, tmp_path, *globs: str, allow_partial: bool = False):
    onnx.save(model, str(tmp_path / "in.onnx"))
    arguments = ["convert", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx"), "--precision", "fp16"]
    arguments += ["--allow-partial"] if allow_partial else []
    return CliRunner().invoke(main, [*arguments, *(a for glob in globs for a in ("--keep-fp32", glob))])


def _computed_in(path) -> dict[str, int]:
    """Node name -> the type its first output is held in, in the written graph."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    return {node.name: types.get(node.output[0]) for node in model.graph.node if node.name}


@pytest.mark.parametrize("names, glob, kept, key", [
    (TF2ONNX, "model/dense_1/*", TF2ONNX[:2], "node name"),
    (PADDLE, "p2o.MatMul.*", PADDLE[:1], "node name"),
    (PADDLE, "op:Softmax", PADDLE[2:], "op type"),
    (TF2ONNX, "op:MatMul", TF2ONNX[:1], "op type")])
def test_globs_keep_nodes_by_name_and_op_type(names, glob, kept, key, tmp_path):
    # keeping the classifier's only weighted layer in fp32 is a partial conversion (exit 1 without this)
    done = _convert(_classifier(names), tmp_path, glob, allow_partial=True)
    assert done.exit_code == 0, done.output
    scopes = {node.name: get_scope(node) or "(root)" for node in ensure_scopes(_classifier(names)).graph.node}
    for name in kept:  # the module each name maps to (`scopes`: tf2onnx and Paddle2ONNX names carry one)
        assert f"{scopes[name]} [{name}]: --keep-fp32 {glob} ({key})" in done.output
    types = _computed_in(tmp_path / "out.onnx")
    assert {name: types[name] for name in names} == {
        name: TensorProto.FLOAT if name in kept else TensorProto.FLOAT16 for name in names}


@pytest.mark.parametrize("glob", ["encoder.*", "Softmax", "op:LayerNorm*"])
def test_a_glob_that_matches_nothing_is_refused_in_one_line(glob, tmp_path):
    """A bare op type is no op: glob (it would keep a module or node of that name), so it is refused too."""
    done = _convert(_classifier(SCOPELESS), tmp_path, glob)
    assert done.exit_code == 2
    [line] = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert f"--keep-fp32 '{glob}' matches no module of the graph" in line
    assert ("modules look like (only the root module), node names like 'MatMul_0', 'Add_1', 'Softmax_2', "
            "op types like 'op:MatMul', 'op:Add', 'op:Softmax'") in line
    assert not (tmp_path / "out.onnx").exists()


def test_the_suggested_globs_match_nodes_of_the_graph_and_lead_to_a_pass(tmp_path):
    """Each failure suggests the last low node before the output by name, and its op type: both are
    accepted when fed back, and following the name upstream ends in a conversion that passes."""
    kept: list[str] = []
    for expected, op in (("Sub.1", "Sub"), ("Add.0", "Add")):  # Paddle's p2o.Sub.1 maps to module Sub.1
        failed = _convert(_cancelling(), tmp_path, *kept)
        assert failed.exit_code == 1, failed.output
        assert re.findall(r"--keep-fp32 (\S+)", failed.output) == [expected, f"op:{op}"]
        by_type = _convert(_cancelling(), tmp_path, *kept, f"op:{op}")
        assert by_type.exit_code in (0, 1) and "matches no" not in by_type.output
        kept.append(expected)
    done = _convert(_cancelling(), tmp_path, *kept, allow_partial=True)  # both weights kept fp32: all of them
    assert done.exit_code == 0, done.output
    assert _computed_in(tmp_path / "out.onnx") == {"p2o.Add.0": TensorProto.FLOAT, "p2o.Sub.1": TensorProto.FLOAT}


def test_on_a_graph_with_modules_the_suggestion_names_the_module(tmp_path):
    failed = _convert(_cancelling("head.shift", "head.unshift"), tmp_path)
    assert failed.exit_code == 1, failed.output
    assert re.findall(r"--keep-fp32 (\S+)", failed.output) == ["head.unshift", "op:Sub"]
    done = _convert(_cancelling("head.shift", "head.unshift"), tmp_path, "head.*", allow_partial=True)
    assert done.exit_code == 0, done.output
    assert "head.unshift [p2o.Sub.1]: --keep-fp32 head.*\n" in done.output
