"""Precision on foreign graphs: networks inside If and Loop bodies converted (a VAD model's If, an
Optimum merged decoder reading the outer graph's weights), the share of float weights converted and
the refusal of a conversion that converts less than half, and the verdict of the real low-precision
graph in ONNX Runtime with the emulation as the fallback."""

import json
import zlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import ort_run
from ticknorm import Inputs, Precision, api
from ticknorm.base.graph import bodies
from ticknorm.cli import main
from ticknorm.exporter.precision.convert import convert

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
WIDTH = 16
X = np.random.default_rng(0).standard_normal((2, WIDTH)).astype(np.float32)


def _weight(name: str, scale: float = 0.3) -> onnx.TensorProto:
    """The same values for the same name in every model built (a reference is built apart)."""
    values = np.random.default_rng(zlib.crc32(name.encode())).standard_normal((WIDTH, WIDTH)) * scale
    return numpy_helper.from_array(values.astype(np.float32), name)


def _vector(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full(WIDTH, value, np.float32), name)


def _branch(name: str, tag: str) -> onnx.GraphProto:
    """LayerNorm (its own scale and bias) -> MatMul by the outer graph's `w_outer` -> Add its own
    bias -> Relu -> MatMul by its own weight -> Mul by a Constant; one output."""
    nodes = [helper.make_node("LayerNormalization", ["x", f"{tag}_scale", f"{tag}_shift"], [f"{tag}_n"],
                              f"{tag}_ln", axis=-1),
             helper.make_node("MatMul", [f"{tag}_n", "w_outer"], [f"{tag}_h"], f"{tag}_proj"),
             helper.make_node("Add", [f"{tag}_h", f"{tag}_bias"], [f"{tag}_a"], f"{tag}_add"),
             helper.make_node("Relu", [f"{tag}_a"], [f"{tag}_r"], f"{tag}_relu"),
             helper.make_node("MatMul", [f"{tag}_r", f"{tag}_w"], [f"{tag}_m"], f"{tag}_out"),
             helper.make_node("Constant", [], [f"{tag}_half"],
                              value=numpy_helper.from_array(np.array(0.5, np.float32))),
             helper.make_node("Mul", [f"{tag}_m", f"{tag}_half"], [f"{tag}_y"], f"{tag}_scale_out")]
    weights = [_vector(f"{tag}_scale", 1.0), _vector(f"{tag}_shift", 0.1), _vector(f"{tag}_bias", 0.05),
               _weight(f"{tag}_w")]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{tag}_y", FLOAT, [2, WIDTH])], weights)


def if_model() -> onnx.ModelProto:
    """A merged-decoder-like graph: an If on a bool input holds the whole network in both branches,
    which read the outer `w_outer`; the If's output goes through one outer MatMul."""
    branch = helper.make_node("If", ["flag"], ["y"], "merged", then_branch=_branch("then", "t"),
                              else_branch=_branch("else", "e"))
    head = helper.make_node("MatMul", ["y", "w_head"], ["out"], "head")
    graph = helper.make_graph([branch, head], "if_model",
                              [helper.make_tensor_value_info("x", FLOAT, [2, WIDTH]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", FLOAT, [2, WIDTH])],
                              [_weight("w_outer"), _weight("w_head")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def loop_model() -> onnx.ModelProto:
    """A Loop of three steps carrying `h`: LayerNorm -> MatMul by the body's weight -> Tanh -> Add h."""
    nodes = [helper.make_node("LayerNormalization", ["h_in", "l_scale", "l_shift"], ["l_n"], "l_ln", axis=-1),
             helper.make_node("MatMul", ["l_n", "l_w"], ["l_m"], "l_proj"),
             helper.make_node("Tanh", ["l_m"], ["l_t"], "l_tanh"),
             helper.make_node("Add", ["l_t", "h_in"], ["h_out"], "l_res"),
             helper.make_node("Identity", ["cond_in"], ["cond_out"], "l_cond")]
    body = helper.make_graph(nodes, "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                                             helper.make_tensor_value_info("h_in", FLOAT, [2, WIDTH])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("h_out", FLOAT, [2, WIDTH])],
                             [_vector("l_scale", 1.0), _vector("l_shift", 0.0), _weight("l_w")])
    loop = helper.make_node("Loop", ["steps", "go", "x"], ["out"], "steps_loop", body=body)
    graph = helper.make_graph([loop], "loop_model", [helper.make_tensor_value_info("x", FLOAT, [2, WIDTH])],
                              [helper.make_tensor_value_info("out", FLOAT, [2, WIDTH])],
                              [numpy_helper.from_array(np.array(3, np.int64), "steps"),
                               numpy_helper.from_array(np.array(True), "go")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _weight_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Every float weight's type by name: initializers and Constants."""
    found = {t.name: t.data_type for t in graph.initializer}
    found.update({n.output[0]: a.t.data_type for n in graph.node for a in n.attribute if a.name == "value"})
    return found


def _branches(model: onnx.ModelProto) -> dict[str, onnx.GraphProto]:
    return {body.name: body for _, body in bodies(model.graph)}


def _fp32_readers(graph: onnx.GraphProto, kept: set[str]) -> bool:
    """Whether the `kept` nodes read only fp32: from a Cast to fp32, an fp32 weight or one another."""
    fp32 = {t.name for t in graph.initializer if t.data_type == FLOAT}
    fp32 |= {n.output[0] for n in graph.node if n.name in kept or (n.op_type == "Cast" and n.attribute[0].i == FLOAT)}
    return all(name in fp32 for n in graph.node if n.name in kept for name in n.input)


@pytest.mark.parametrize("flag", [True, False])
def test_the_network_in_an_if_is_converted_with_its_islands(flag, tmp_path):
    """Both branches' weights, their Constants and the outer weights they read take fp16; a node
    kept by --keep-fp32 inside a branch stays fp32 with its own weight; both branches give fp32."""
    source, output = tmp_path / "merged.onnx", tmp_path / "merged16.onnx"
    onnx.save(if_model(), source)
    feeds = {"x": X, "flag": np.array(flag)}
    conversion = api.convert(source, output, Precision("fp16", keep_fp32=("t_relu", "t_out")), Inputs(arrays=feeds))
    assert [(i.node, i.reason) for i in conversion.precision.islands] == [
        ("t_relu", "--keep-fp32 t_relu (node name)"), ("t_out", "--keep-fp32 t_out (node name)")]
    written = onnx.load(str(output))
    onnx.checker.check_model(written, full_check=True)
    branches = _branches(written)
    assert _weight_types(written.graph) == {"w_outer": HALF, "w_head": HALF}
    assert _weight_types(branches["then"]) == {"t_scale": HALF, "t_shift": HALF, "t_bias": HALF, "t_w": FLOAT,
                                               "t_half": HALF}
    assert set(_weight_types(branches["else"]).values()) == {HALF}
    assert _fp32_readers(branches["then"], {"t_relu", "t_out"})
    assert [[o.type.tensor_type.elem_type for o in b.output] for b in branches.values()] == [[FLOAT], [FLOAT]]
    share = conversion.weights
    assert (share.low_tensors, share.tensors, share.elements - share.low_elements) == (11, 12, WIDTH * WIDTH)
    reference = ort_run(if_model(), feeds)["out"]
    np.testing.assert_allclose(ort_run(written, feeds)["out"], reference, atol=2e-2, rtol=2e-2)


def test_a_loop_body_is_converted_and_carries_fp32():
    low = convert(loop_model(), {"x": X}, Precision("fp16"))
    onnx.checker.check_model(low.model, full_check=True)
    body = _branches(low.model)["body"]
    assert set(_weight_types(body).values()) == {HALF}
    assert [o.type.tensor_type.elem_type for o in body.output] == [TensorProto.BOOL, FLOAT]
    assert "LayerNormalization" in {n.op_type for n in body.node}
    np.testing.assert_allclose(ort_run(low.model, {"x": X})["out"], ort_run(loop_model(), {"x": X})["out"],
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("allowed", [False, True])
def test_a_partial_conversion_exits_1_unless_allowed_and_is_written_either_way(allowed, tmp_path):
    """Every MatMul kept fp32 keeps 4 of the 12 float weights but 91% of their size in fp32."""
    source, output = tmp_path / "merged.onnx", tmp_path / "partial.onnx"
    onnx.save(if_model(), source)
    np.savez(tmp_path / "feeds.npz", x=X, flag=np.array(True))
    args = ["convert", str(source), "-o", str(output), "--precision", "fp16", "--keep-fp32", "op:MatMul",
            "--input-file", str(tmp_path / "feeds.npz"), "--report", str(tmp_path / "r.json")]
    done = CliRunner().invoke(main, args + (["--allow-partial"] if allowed else []))
    assert done.exit_code == (0 if allowed else 1), done.output
    assert output.exists() and (tmp_path / "r.json").exists()
    assert "weights in fp16: 8.7% of the float weights by size (fp32 bytes), 8 of 12 tensors" in done.output
    assert ("--allow-partial accepts" in done.output) != allowed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["weights"]["partial"] and report["weights"]["low_tensors"] == 8
    kept = {n.input[1] for g in [onnx.load(str(output)).graph, *_branches(onnx.load(str(output))).values()]
            for n in g.node if n.op_type == "MatMul"}
    assert kept == {"w_outer", "w_head", "t_w", "e_w"}  # read by fp32 MatMuls straight from fp32 weights


def test_a_whole_conversion_is_no_partial_one(tmp_path):
    source = tmp_path / "merged.onnx"
    onnx.save(if_model(), source)
    np.savez(tmp_path / "feeds.npz", x=X, flag=np.array(False))
    done = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "m16.onnx"), "--precision", "fp16",
                                     "--input-file", str(tmp_path / "feeds.npz")])
    assert done.exit_code == 0, done.output
    assert "weights in fp16: 100.0% of the float weights by size (fp32 bytes), 12 of 12 tensors" in done.output


def test_the_real_fp16_graph_in_onnx_runtime_is_the_verdict(tmp_path):
    """Its check is the fp16 file's own error, not an emulation's."""
    feeds = {"x": X, "flag": np.array(True)}
    source = tmp_path / "merged.onnx"
    onnx.save(if_model(), source)
    conversion = api.convert(source, tmp_path / "m16.onnx", Precision("fp16"), Inputs(arrays=feeds))
    assert conversion.judged_by == "the fp16 graph itself, run by ONNX Runtime (CPU)"
    assert [c.name for c in conversion.checks] == ["out (fp16 graph, ONNX Runtime CPU)"]
    error = np.abs(ort_run(onnx.load(str(tmp_path / "m16.onnx")), feeds)["out"].astype(np.float32)
                   - ort_run(if_model(), feeds)["out"]).max()
    assert conversion.checks[0].max_abs == pytest.approx(float(error), rel=1e-6)
    assert "judged by the fp16 graph itself" in conversion.summary()


def test_where_onnx_runtime_cannot_run_the_graph_the_emulation_judges(tmp_path):
    """The CPU provider has no bf16 MatMul: the session is refused, the fp32 emulation judges, and
    the report says so and why; the bf16 file then runs upcast (branches too) in ONNX Runtime."""
    feeds = {"x": X, "flag": np.array(False)}
    source, output = tmp_path / "merged.onnx", tmp_path / "mb16.onnx"
    onnx.save(if_model(), source)
    conversion = api.convert(source, output, Precision("bf16"), Inputs(arrays=feeds), report=tmp_path / "r.json")
    assert conversion.judged_by.startswith("its emulation in fp32 (ONNX Runtime cannot run the bf16 graph: ")
    assert "NOT_IMPLEMENTED" in conversion.judged_by
    assert [c.name for c in conversion.checks] == ["out (bf16 emulated in fp32)"] and conversion.passed
    assert json.loads((tmp_path / "r.json").read_text())["judged_by"] == conversion.judged_by
    written = onnx.load(str(output))
    assert set(_weight_types(_branches(written)["else"]).values()) == {TensorProto.BFLOAT16}
    np.testing.assert_allclose(ort_run(written, feeds)["out"], ort_run(if_model(), feeds)["out"], atol=0.2, rtol=0.2)


def test_the_real_run_passes_what_the_emulation_rejects_and_the_summary_notes_it(tmp_path):
    """(x + 1e4) - 1e4: the emulation rounds x + 1e4 to fp16 (steps of 8) and loses x; ONNX
    Runtime's CPU provider computes the fp16 Add and Sub in fp32 and gets x back. Its run is the
    verdict (the issue's conversion rejected at 0.034 by the emulation ran at 0.0034); the
    emulation's disagreement is printed beside it, as what a strongly typed engine would hold."""
    big = numpy_helper.from_array(np.array(1e4, np.float32), "big")
    graph = helper.make_graph([helper.make_node("Add", ["x", "big"], ["shifted"], name="shift"),
                               helper.make_node("Sub", ["shifted", "big"], ["y"], name="unshift")], "cancel",
                              [helper.make_tensor_value_info("x", FLOAT, [2, WIDTH])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, WIDTH])], [big])
    conversion = convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": X},
                         Precision("fp16"))
    assert conversion.passed and conversion.checks[0].max_abs < 1e-3
    [emulated] = conversion.emulation
    assert not emulated.passed and emulated.max_abs > 1
    assert "note: the fp16 emulation in fp32" in conversion.summary()
    assert "y (fp16 emulated in fp32)" in conversion.summary()


def _scaled_norm_in_a_branch() -> onnx.ModelProto:
    """then: x * 300 -> LayerNorm (its mean of squares passes fp16's max inside the branch);
    else: LayerNorm of x; the scale is the outer graph's."""
    def branch(tag: str, nodes: list) -> onnx.GraphProto:
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_n", FLOAT, [2, WIDTH])],
                                 [_vector(f"{tag}_g", 1.0), _vector(f"{tag}_b", 0.0)])

    then = branch("then", [helper.make_node("Mul", ["x", "big"], ["scaled"], "scale"),
                           helper.make_node("LayerNormalization", ["scaled", "then_g", "then_b"], ["then_n"], "then_ln")])
    other = branch("else", [helper.make_node("LayerNormalization", ["x", "else_g", "else_b"], ["else_n"], "else_ln")])
    graph = helper.make_graph([helper.make_node("If", ["flag"], ["out"], "gate", then_branch=then, else_branch=other)],
                              "scaled", [helper.make_tensor_value_info("x", FLOAT, [2, WIDTH]),
                                         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", FLOAT, [2, WIDTH])],
                              [numpy_helper.from_array(np.array(300.0, np.float32), "big")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_island_rules_measure_the_branch_the_run_took():
    """The fp32 run reaches inside the taken branch: its norm's mean of squares keeps it in fp32;
    the other branch is not measured."""
    taken = convert(_scaled_norm_in_a_branch(), {"x": X, "flag": np.array(True)}, Precision("fp16"))
    [island] = taken.precision.islands
    assert island.node == "then_ln" and island.reason.startswith("mean of squares reaches")
    other = convert(_scaled_norm_in_a_branch(), {"x": X, "flag": np.array(False)}, Precision("fp16"))
    assert other.precision.islands == ()


def test_a_loop_body_is_measured_on_its_first_step():
    """A body LayerNorm fed h * 300 keeps its mean of squares in fp32 from the first step on."""
    model = loop_model()
    body = model.graph.node[0].attribute[0].g
    body.initializer.append(numpy_helper.from_array(np.array(300.0, np.float32), "l_big"))
    body.node.insert(0, helper.make_node("Mul", ["h_in", "l_big"], ["l_scaled"], "l_scale"))
    body.node[1].input[0] = "l_scaled"
    islands = convert(model, {"x": X}, Precision("fp16")).precision.islands
    assert [(i.node, i.reason.split(" reaches")[0]) for i in islands] == [("l_ln", "mean of squares")]


@pytest.mark.parametrize("allowed", [False, True])
def test_export_reports_the_share_and_refuses_a_partial_conversion_the_same_way(allowed, tmp_path):
    """The projection kept fp32 holds most of the model's weights: written, exit 1 unless allowed."""
    args = ["export", "--model", "tests/factories.py:overflowing", "--input", "x:2x6x16", "--exporter", "torchscript",
            "-o", str(tmp_path / "e16.onnx"), "--precision", "fp16", "--keep-fp32", "proj"]
    done = CliRunner().invoke(main, args + (["--allow-partial"] if allowed else []))
    assert done.exit_code == (0 if allowed else 1), done.output
    assert (tmp_path / "e16.onnx").exists()
    assert "weights in fp16: " in done.output and ("--allow-partial accepts" in done.output) != allowed


def _decomposed_norm_after_a_matmul() -> onnx.ModelProto:
    """A MatMul then a LayerNorm written out of primitive ops, unfused, as many files hold it."""
    rng = np.random.default_rng(3)
    weights = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
               numpy_helper.from_array(np.array(2.0, np.float32), "two"),
               numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
               numpy_helper.from_array(rng.random(8).astype(np.float32), "gamma"),
               numpy_helper.from_array(rng.random(8).astype(np.float32), "beta"),
               numpy_helper.from_array(10 * rng.random((8, 8)).astype(np.float32), "w")]
    steps = [("MatMul", ["x", "w"], "h"), ("ReduceMean", ["h", "axes"], "mu"), ("Sub", ["h", "mu"], "d"),
             ("Pow", ["d", "two"], "sq"), ("ReduceMean", ["sq", "axes"], "var"), ("Add", ["var", "eps"], "ve"),
             ("Sqrt", ["ve"], "sd"), ("Div", ["d", "sd"], "n"), ("Mul", ["n", "gamma"], "g"), ("Add", ["g", "beta"], "y")]
    nodes = [helper.make_node(op, inputs, [out]) for op, inputs, out in steps]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def test_a_file_onnx_runtimes_own_optimizer_refuses_is_judged_unoptimized_and_the_summary_warns(tmp_path):
    """ORT's LayerNorm fusion binds the fp16 norm after the fp32 MatMul island to two types and
    fails to load the file at its default level: the verdict comes from the graph with
    optimizations off, and the summary says a default load fails and how to avoid it."""
    source = tmp_path / "m.onnx"
    onnx.save(_decomposed_norm_after_a_matmul(), source)
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "m16.onnx"), "--precision", "fp16",
                                       "--keep-fp32", "op:MatMul", "--allow-partial"])
    assert result.exit_code == 0, result.output
    assert "run by ONNX Runtime (CPU) with graph optimizations off; WARNING: with them on, as by default, it fails" \
        in result.output and "fuse the norms first (ticknorm fuse)" in result.output
