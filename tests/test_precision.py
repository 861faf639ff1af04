"""fp16/bf16 in the graph: measured fp32 islands, strongly typed graphs that ONNX checks and ONNX
Runtime runs, one policy in every command, and the refusals."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper

from conftest import ort_run
from factories import Overflowing
from ticknorm import ExportOptions, Inputs, ModelRef, Precision, Runtimes, api
from ticknorm.base.errors import InputSpecError, RuntimeUnavailable
from ticknorm.base.precision import Fp32Island
from ticknorm.base.scopes import SCOPE_KEY, get_scope
from ticknorm.cli import main
from ticknorm.exporter.precision.lower import lay_out, write_emulated, write_low
from ticknorm.exporter.precision.measure import float_tensors
from ticknorm.exporter.precision.plan import plan_precision
from ticknorm.exporter.precision.targets import runner_setup
from ticknorm.runtime.registry import make_runner

FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 6, 16)).astype(np.float32)}
FLOAT, HALF, BF16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision") / "o.onnx"
    torch.manual_seed(0)
    module = Overflowing().eval()
    api.export(module, FEEDS, path, ExportOptions(exporter="torchscript"))
    return path, module


def _types(model: onnx.ModelProto) -> dict:
    return {"inputs": [i.type.tensor_type.elem_type for i in model.graph.input],
            "outputs": [o.type.tensor_type.elem_type for o in model.graph.output],
            "weights": sorted({t.data_type for t in model.graph.initializer})}


@pytest.mark.parametrize("io_types", ["fp32", "low"])
def test_fp16_export_keeps_the_overflowing_norm_in_fp32(io_types, tmp_path):
    torch.manual_seed(0)
    module = Overflowing().eval()
    path = tmp_path / "o16.onnx"
    result = api.export(module, FEEDS, path, ExportOptions(exporter="torchscript", precision=Precision("fp16", io_types)),
                        report=tmp_path / "r.json")
    islands = result.conversion.precision.islands
    assert [(i.module, i.node) for i in islands] == [("norm", "/norm/LayerNormalization")]
    assert islands[0].reason.startswith("mean of squares reaches")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)  # strongly typed: every type is consistent
    io = HALF if io_types == "low" else FLOAT
    assert _types(model) == {"inputs": [io], "outputs": [io], "weights": [FLOAT, HALF]}  # the island keeps its scale fp32
    norm = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    assert next((a.i for a in norm.attribute if a.name == "stash_type"), 1) == 1
    # the fp16 graph itself in ONNX Runtime is the verdict (issue 29: the emulation is the fallback)
    assert {c.name.split(" (")[1] for c in result.conversion.checks} == {"fp16 graph, ONNX Runtime CPU)"}
    assert result.conversion.passed
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["precision"]["islands"][0]["module"] == "norm" and written["records"]  # fusion report and islands
    feeds = {"x": FEEDS["x"].astype(np.float16)} if io_types == "low" else FEEDS
    with torch.no_grad():
        expected = module(torch.from_numpy(FEEDS["x"])).numpy()
    np.testing.assert_allclose(ort_run(model, feeds)["output"].astype(np.float32), expected, atol=1e-2, rtol=1e-2)


def test_bf16_export_is_judged_through_its_emulation_and_ort_cpu_runs_it_upcast(fp32_export, tmp_path):
    path, module = fp32_export
    result = api.export(module, FEEDS, tmp_path / "b.onnx", ExportOptions(exporter="torchscript",
                                                                            precision=Precision("bf16")))
    assert result.conversion.precision.islands == ()  # bf16 has fp32's range
    assert [c.name for c in result.conversion.checks] == ["output (bf16 emulated in fp32)"]
    model = onnx.load(str(tmp_path / "b.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert BF16 in _types(model)["weights"]
    # the CPU provider has no bf16 kernels: compare runs the graph's fp32 emulation, at bf16's tolerance
    compared = CliRunner().invoke(main, ["compare", str(tmp_path / "b.onnx"), "--model", "tests/factories.py:overflowing",
                                         "--input", "x:2x6x16"])
    assert compared.exit_code == 0, compared.output
    assert "ort vs torch (atol 0.2, rtol 0.2):" in compared.output


def test_one_policy_and_the_types_tolerance_in_compare(fp32_export, tmp_path):
    path, module = fp32_export
    api.export(module, FEEDS, tmp_path / "o16.onnx", ExportOptions(exporter="torchscript", precision=Precision("fp16")))
    report = api.compare(tmp_path / "o16.onnx", module, FEEDS, runtimes=["ort", "torch-fp16"])
    assert report.passed and report.tolerances == {"ort": (2e-2, 2e-2), "torch-fp16": (2e-2, 2e-2)}
    assert [i.module for i in report.fp32_islands["fp16"]] == ["norm"]  # the graph's own islands, for torch too
    fp32 = api.compare(path, module, FEEDS, runtimes=["ort", "torch-bf16"])
    assert fp32.tolerances == {"ort": (1e-4, 1e-3), "torch-bf16": (2e-1, 2e-1)} and fp32.passed


def test_keep_fp32_globs_and_their_refusal(fp32_export, tmp_path):
    path, module = fp32_export
    kept = api.convert(path, tmp_path / "k.onnx", Precision("fp16", keep_fp32=("proj",)), Inputs(arrays=FEEDS))
    assert {(i.module, i.reason) for i in kept.precision.islands} >= {("proj", "--keep-fp32 proj")}
    with pytest.raises(InputSpecError, match=r"--keep-fp32 'encoder\.\*' matches no module of the graph"):
        api.convert(path, tmp_path / "none.onnx", Precision("fp16", keep_fp32=("encoder.*",)), Inputs(arrays=FEEDS))
    assert not (tmp_path / "none.onnx").exists()


def test_convert_command_and_its_bad_input(fp32_export, tmp_path):
    path, _ = fp32_export
    np.savez(tmp_path / "calibration.npz", **FEEDS)
    done = CliRunner().invoke(main, ["convert", str(path), "-o", str(tmp_path / "c.onnx"), "--precision", "fp16",
                                     "--input-file", str(tmp_path / "calibration.npz"), "--report", str(tmp_path / "c.json")])
    assert done.exit_code == 0, done.output
    assert "fp16: 1 node(s) kept in fp32, I/O fp32" in done.output and "norm [/norm/LayerNormalization]" in done.output
    assert json.loads((tmp_path / "c.json").read_text())["precision"]["islands"][0]["module"] == "norm"
    again = CliRunner().invoke(main, ["convert", str(tmp_path / "c.onnx"), "-o", str(tmp_path / "d.onnx"), "--precision", "fp16"])
    assert again.exit_code == 2 and "is already fp16" in again.stderr and not (tmp_path / "d.onnx").exists()
    nan = {"x": np.full((2, 6, 16), np.nan, np.float32)}
    np.savez(tmp_path / "nan.npz", **nan)
    bad = CliRunner().invoke(main, ["convert", str(path), "-o", str(tmp_path / "n.onnx"), "--precision", "fp16",
                                    "--input-file", str(tmp_path / "nan.npz")])
    assert bad.exit_code == 2 and "already holds NaN or Inf" in bad.stderr and not (tmp_path / "n.onnx").exists()


def test_tensorrt_low_precision_targets_build_a_converted_graph(fp32_export):
    """TensorRT takes its types from the graph: `trt-fp16` on an fp32 file gets the graph the
    policy converted (built here without TensorRT; the engine build needs a GPU)."""
    path, module = fp32_export
    model = onnx.load(str(path))
    setup = runner_setup(model, module, FEEDS, Runtimes(("trt-fp16", "torch-fp16")))
    runner = make_runner("trt-fp16", model, setup)
    assert runner.name == "trt-fp16" and Precision.of_graph(runner.model).dtype == "fp16"
    assert HALF in _types(runner.model)["weights"] and runner.model is setup.low["fp16"].graph
    torch_runner = make_runner("torch-fp16", model, setup)
    assert torch_runner.fp32_modules == ("norm",)
    with pytest.raises(RuntimeUnavailable):
        make_runner("trt", model, setup).check_available()


def test_a_real_transformer_exports_in_fp16(tmp_path):
    pytest.importorskip("transformers")
    from hf_models import CONFIGS, build

    model, inputs = build("BertModel"), Inputs(tuple(CONFIGS["BertModel"][1]))
    result = api.export(ModelRef(model), inputs, tmp_path / "bert16.onnx", ExportOptions(precision=Precision("fp16"),
                                                                                         external_data_threshold=1000))
    assert result.conversion.passed
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    data = tmp_path / "bert16.onnx.data"  # the converted weights only, not the staged fp32 file beside them
    assert data.is_file() and data.stat().st_size < 0.6 * fp32_bytes
    graph = onnx.load(str(tmp_path / "bert16.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert [n.op_type for n in graph.graph.node].count("LayerNormalization") == 5
    report = api.compare(tmp_path / "bert16.onnx", ModelRef(model), inputs)
    assert report.passed and report.tolerances["ort"] == (2e-2, 2e-2)


def test_convert_takes_a_file_another_exporter_wrote(tmp_path):
    """A plain torch.onnx.export file: no ticknorm scopes, yet --keep-fp32 finds modules by the
    exporter's own node names."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16),
                                 torch.nn.LayerNorm(16)).eval()
    torch.onnx.export(module, (torch.randn(2, 4, 16),), str(tmp_path / "plain.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"])
    done = CliRunner().invoke(main, ["convert", str(tmp_path / "plain.onnx"), "-o", str(tmp_path / "p16.onnx"),
                                     "--precision", "fp16", "--keep-fp32", "3"])
    assert done.exit_code == 0, done.output
    assert "3 [/3/LayerNormalization]: --keep-fp32 3" in done.output
    onnx.checker.check_model(onnx.load(str(tmp_path / "p16.onnx")), full_check=True)


def test_a_constant_of_shape_without_value_makes_its_zeros_in_the_low_type():
    """ConstantOfShape's default `value` is an fp32 zero: lowered without one, it would feed fp32
    beside fp16 (DeepSeek-V3's ScatterND into a zero cache failed to load)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
             helper.make_node("Add", ["zeros", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    low = write_low(lay_out(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), Precision("fp16")))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(ort_run(low, {"x": x})["y"], x)


# A hand-built graph pins where the lowering puts its Casts and roundings, node by node:
# x -> MatMul (proj) -> h -> LayerNormalization (norm, the fp32 island) -> n -> Mul by a Constant
# (head, unnamed) -> m -> Add h -> y; outputs y, n (the island's) and Shape(n).
ISLAND = (Fp32Island("norm", "ln", "pinned"),)


def _toy() -> onnx.ModelProto:
    def scoped(node, scope):
        node.metadata_props.add(key=SCOPE_KEY, value=scope)
        return node

    nodes = [scoped(helper.make_node("MatMul", ["x", "w"], ["h"], "mm"), "proj"),
             scoped(helper.make_node("LayerNormalization", ["h", "s", "b"], ["n"], "ln"), "norm"),
             scoped(helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
                    "head"),
             scoped(helper.make_node("Mul", ["n", "two"], ["m"]), "head"),
             helper.make_node("Shape", ["n"], ["shape"]),
             scoped(helper.make_node("Add", ["m", "h"], ["y"], "add"), "head")]
    weights = [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w"),
               numpy_helper.from_array(np.ones(4, np.float32), "s"), numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    outputs = [helper.make_tensor_value_info(name, elem_type, dims) for name, elem_type, dims in
               (("y", FLOAT, [2, 4]), ("n", FLOAT, [2, 4]), ("shape", onnx.TensorProto.INT64, [2]))]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", FLOAT, [2, 4])], outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _lines(model: onnx.ModelProto) -> list[str]:
    lines = []
    for node in model.graph.node:
        to = [a.i for a in node.attribute if a.name == "to"]
        lines.append(f"{node.name or '-'}: {node.op_type}({', '.join(node.input)}) -> {', '.join(node.output)}"
                     + (f" to {to[0]}" if to else "") + f" @{get_scope(node)}")
    return lines


LOW_LINES = {"fp32": [
    "x_cast_float16: Cast(x) -> x_float16 to 10 @proj",
    "mm: MatMul(x_float16, w) -> h @proj",
    "h_cast_fp32: Cast(h) -> h_fp32 to 1 @norm",
    "ln: LayerNormalization(h_fp32, s, b) -> n @norm",
    "-: Constant() -> two @head",
    "n_cast_float16: Cast(n) -> n_float16 to 10 @head",
    "-: Mul(n_float16, two) -> m @head",
    "-: Shape(n) -> shape @None",
    "add: Add(m, h) -> y_low @head",
    "y_cast: Cast(y_low) -> y to 1 @head",
], "low": [
    "mm: MatMul(x, w) -> h @proj",
    "h_cast_fp32: Cast(h) -> h_fp32 to 1 @norm",
    "ln: LayerNormalization(h_fp32, s, b) -> n_fp32 @norm",
    "-: Constant() -> two @head",
    "n_cast_float16: Cast(n_fp32) -> n_float16 to 10 @head",
    "-: Mul(n_float16, two) -> m @head",
    "-: Shape(n_fp32) -> shape @None",
    "add: Add(m, h) -> y @head",
    "n_cast: Cast(n_fp32) -> n to 10 @norm",
]}


@pytest.mark.parametrize("io_types", ["fp32", "low"])
def test_the_low_graph_casts_once_per_tensor_and_type_before_its_first_reader(io_types):
    low = write_low(lay_out(_toy(), Precision("fp16", io_types, islands=ISLAND)))
    assert _lines(low) == LOW_LINES[io_types]
    io = HALF if io_types == "low" else FLOAT
    assert [(t.name, t.data_type) for t in low.graph.initializer] == [("w", HALF), ("s", FLOAT), ("b", FLOAT)]
    assert [v.type.tensor_type.elem_type for v in low.graph.input] == [io]
    assert [v.type.tensor_type.elem_type for v in low.graph.output] == [io, io, onnx.TensorProto.INT64]
    assert not low.graph.value_info and Precision.of_graph(low).nodes == ["ln"]
    onnx.checker.check_model(low, full_check=True)
    two = next(n for n in low.graph.node if n.op_type == "Constant").attribute[0].t
    assert two.data_type == HALF  # a low node's constant is written in the low type


@pytest.mark.parametrize("io_types", ["fp32", "low"])
def test_the_emulation_rounds_each_low_value_where_it_is_made_or_read(io_types):
    emulated = write_emulated(lay_out(_toy(), Precision("fp16", io_types, islands=ISLAND)))
    n = "n_unrounded" if io_types == "low" else "n"  # an fp32 output leaves a low-I/O graph rounded
    assert _lines(emulated) == [
        "x_rounded_round: Cast(x) -> x_rounded_low to 10 @proj",
        "x_rounded_unround: Cast(x_rounded_low) -> x_rounded to 1 @proj",
        "mm: MatMul(x_rounded, w) -> h_unrounded @proj",
        "h_round: Cast(h_unrounded) -> h_low to 10 @proj",
        "h_unround: Cast(h_low) -> h to 1 @proj",
        f"ln: LayerNormalization(h, s, b) -> {n} @norm",
        "-: Constant() -> two_unrounded @head",
        "two_round: Cast(two_unrounded) -> two_low to 10 @head",
        "two_unround: Cast(two_low) -> two to 1 @head",
        f"n_rounded_round: Cast({n}) -> n_rounded_low to 10 @head",
        "n_rounded_unround: Cast(n_rounded_low) -> n_rounded to 1 @head",
        "-: Mul(n_rounded, two) -> m_unrounded @head",
        "m_round: Cast(m_unrounded) -> m_low to 10 @head",
        "m_unround: Cast(m_low) -> m to 1 @head",
        f"-: Shape({n}) -> shape @None",
        "add: Add(m, h) -> y_unrounded @head",
        "y_round: Cast(y_unrounded) -> y_low to 10 @head",
        "y_unround: Cast(y_low) -> y to 1 @head",
    ] + (["n_round: Cast(n_unrounded) -> n_low to 10 @", "n_unround: Cast(n_low) -> n to 1 @"] if io_types == "low" else [])
    assert {t.data_type for t in emulated.graph.initializer} == {FLOAT}
    weight = numpy_helper.to_array(next(t for t in emulated.graph.initializer if t.name == "w"))
    assert np.array_equal(weight, weight.astype(np.float16).astype(np.float32))  # rounded in place
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    assert ort_run(emulated, {"x": x})["y"].shape == (2, 4)


def test_the_plan_reads_every_float_tensor_and_names_unnamed_nodes_by_position():
    assert float_tensors(_toy()) == ["x", "h", "n", "two", "m", "y"]  # the Constant's output too, no weights
    huge = {"x": np.full((2, 4), 30000, np.float32)}
    islands = plan_precision(_toy(), huge, Precision("fp16", keep_fp32=("head",))).islands
    assert [(i.module, i.node, i.reason) for i in islands] == [
        ("proj", "mm", "output h reaches 1.032e+05 > fp16 max 65504"),
        ("norm", "ln", "input h reaches 1.032e+05 > fp16 max 65504"),
        ("head", "Constant#2", "--keep-fp32 head"), ("head", "Mul#3", "--keep-fp32 head"),
        ("head", "add", "--keep-fp32 head")]
    tiny = plan_precision(_toy(), {"x": np.full((2, 4), 1e-6, np.float32)}, Precision("fp16")).islands
    assert [(i.node, i.reason) for i in tiny] == [("mm", "100.0% of h's nonzero values underflow fp16"),
                                                  ("ln", "25.0% of n's nonzero values underflow fp16")]


def test_staged_weights_are_lowered_one_by_one_into_one_new_file(tmp_path):
    """Weights referenced in a staging folder go, low or kept fp32, into one new file there
    (the output links it), each read from its own file and referenced at its offset."""
    model = _toy()
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    _stage(model, tmp_path)
    done = []
    low = write_low(lay_out(model, Precision("fp16", islands=ISLAND)), tmp_path, lambda d, total: done.append((d, total)))
    assert done == [(1, 3), (2, 3), (3, 3)]
    (written,) = [p for p in tmp_path.iterdir() if p.name.startswith("low-")]
    assert written.suffix == ".data" and written.stat().st_mode & 0o777 == 0o666 & ~_umask()
    entries = [(t.name, t.data_type, {e.key: e.value for e in t.external_data}) for t in low.graph.initializer]
    assert entries == [("w", HALF, {"location": written.name, "offset": "0", "length": "32"}),
                       ("s", FLOAT, {"location": written.name, "offset": "32", "length": "16"}),
                       ("b", FLOAT, {"location": written.name, "offset": "48", "length": "16"})]
    data = written.read_bytes()
    assert data[:32] == values["w"].astype(np.float16).tobytes() and data[32:] == values["s"].tobytes() + values["b"].tobytes()


def test_a_staged_graph_is_typed_with_its_small_weights_unread(tmp_path):
    """Inference takes staged weights as typed inputs: ONNX cannot read their file, and an Unsqueeze
    on staged axes it tried to read would leave its output untyped, and what follows it."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Unsqueeze", ["r", "axes"], ["u"]),
             helper.make_node("Relu", ["u"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", FLOAT, None)],
                              [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert float_tensors(model) == float_tensors(_stage(model, tmp_path)) == ["x", "r", "u", "y"]


def _stage(model: onnx.ModelProto, folder) -> onnx.ModelProto:
    """`model` with every weight moved into `folder`/staged.data, referenced by offset."""
    from onnx.external_data_helper import set_external_data

    offset = 0
    with open(folder / "staged.data", "wb") as staged:
        for tensor in model.graph.initializer:
            staged.write(tensor.raw_data)
            set_external_data(tensor, "staged.data", offset, len(tensor.raw_data))
            offset += len(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
    return model


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
