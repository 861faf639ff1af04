"""The profiler: tick aggregation, runtime-name alignment, real profiles on torch and ORT."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from ticknorm import ExportOptions, Inputs, LayerSelection, ModelRef, Timing, api
from ticknorm.base.errors import InputSpecError
from ticknorm.base.onnx_io import load_onnx, model_digest
from ticknorm.base.scopes import get_scope
from ticknorm.cli import main
from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.collect_torch import own_time
from ticknorm.profiler.collect_trtexec import import_trtexec, read_trtexec_log
from ticknorm.runtime.registry import TrtexecFiles
from ticknorm.profiler.profile import ProfileResult, profile_runtimes
from ticknorm.profiler.ticks import ROOT, UNATTRIBUTED, Span, Tick, TickLog
from ticknorm.report import profile_outputs
from ticknorm.report.joined import JoinedReport, join, write_html
from ticknorm.runtime.registry import RunnerSetup
from ticknorm.validate.compare import compare_runtimes

EXAMPLE = "examples/tiny_transformer.py:build"
CHECKPOINT = "examples/tiny_transformer.safetensors"
FEEDS = {"input_ids": np.random.default_rng(0).integers(0, 1000, (2, 16))}


def _span(layer, modules, iteration, begin, end):
    return Span(layer, modules, iteration, Tick("host", begin), Tick("host", end))


def test_ticklog_rolls_up_groups_and_keeps_unattributed():
    log = TickLog("rt", "host", iterations=3, instrumented_ns=[100, 100, 100], end_to_end_ns=[90, 95, 100])
    for i, (a, b) in enumerate([(10, 20), (12, 30), (11, 40)]):
        log.spans += [_span("x", ("enc.layer.0.attn",), i, 0, a), _span("y", ("enc.layer.0.ffn",), i, a, a + b),
                      _span("fused", ("enc.layer.1.attn", "enc.layer.1.ffn", "head"), i, 0, 5),
                      _span("copy", (), i, 0, 7), _span("glue", ("",), i, 0, 3)]
    rows = log.per_module(depth=3)
    assert rows["enc.layer.0"].median_ms == pytest.approx(42e-6)  # per iteration 30, 42, 51 ns
    assert rows["enc.layer.0"].min_ms == pytest.approx(30e-6) and rows["enc.layer.0"].p90_ms == pytest.approx(51e-6)
    assert rows["enc.layer.1 + head"].samples == 3
    assert rows[UNATTRIBUTED].median_ms == pytest.approx(7e-6)
    assert ROOT in rows
    assert log.coverage() == pytest.approx((42 + 5 + 3) / 100)  # the median run's share: 38%, 50%, 59%
    log.instrumented_ns[2] = 10_000  # one run stalled outside the model
    assert log.coverage() == pytest.approx((30 + 5 + 3) / 100)  # moves to the next run's share, not to 2%
    assert log.end_to_end_ms == pytest.approx(95e-6)
    assert log.overhead == pytest.approx(100 / 95 - 1)


def test_the_table_keeps_whole_names_and_marks_spread_rows():
    name = "encoder.layer.11.attention.output.LayerNorm.with.a.very.long.path.indeed"
    log = TickLog("ort", "runtime", iterations=4, instrumented_ns=[10] * 4, end_to_end_ns=[10] * 4)
    log.spans = [_span("n", (name,), i, 0, d) for i, d in enumerate((100, 100, 100, 100))]
    noisy = TickLog("torch", "host", iterations=4, instrumented_ns=[10] * 4, end_to_end_ns=[10] * 4)
    noisy.spans = [_span("m", (name,), i, 0, d) for i, d in enumerate((100, 100, 100, 5000))]
    text = profile_outputs.table(ProfileResult(None, {"torch": noisy, "ort": log}, [name]))
    row = next(line for line in text.splitlines() if line.startswith(name))
    assert row.split()[0] == name and " !" in row and row.rstrip().endswith("?")
    assert "1 row(s) spread wider than 50% of their median" in text


def test_torch_time_goes_to_the_innermost_running_module():
    """A parent's stretch stops where a child starts and resumes where it ends; the root's own ops
    are the root's; nothing overlaps, so rolled up to a depth nothing is counted twice."""
    marks = [("", "begin", 0), ("enc", "begin", 2), ("enc.attn", "begin", 3), ("enc.attn", "end", 7),
             ("enc", "end", 10), ("head", "begin", 10), ("head", "end", 14), ("", "end", 15)]
    spans = own_time(marks, 0, "host")
    assert [(s.layer, s.begin.ns, s.end.ns) for s in spans] == [
        ("", 0, 2), ("enc", 2, 3), ("enc.attn", 3, 7), ("enc", 7, 10), ("head", 10, 14), ("", 14, 15)]
    log = TickLog("torch", "host", spans=spans, iterations=1)
    assert {k: t.median_ms * 1e6 for k, t in log.per_module(depth=1).items()} == pytest.approx(
        {ROOT: 3, "enc": 8, "head": 4})


def test_modules_that_compute_with_their_own_weights_get_a_torch_figure(tmp_path):
    """nn.MultiheadAttention's out_proj never runs as a module: the attention's time is its own."""
    from factories import TorchEncoder

    module = TorchEncoder().eval()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)}
    api.export(module, feeds, tmp_path / "e.onnx", ExportOptions(exporter="torchscript"))
    result = profile_runtimes(onnx.load(str(tmp_path / "e.onnx")), feeds, ("torch", "ort"), RunnerSetup(module),
                              Timing(iterations=3, warmup=1))
    rows = dict(result.rows())
    attention = "encoder.layers.0.self_attn"
    assert set(rows[attention]) == {"torch", "ort"}
    ran = {name for name, _ in module.named_modules()} - {"encoder.layers.0.self_attn.out_proj",
                                                           "encoder.layers.1.self_attn.out_proj"}
    missing = [m for m, timings in rows.items() if "ort" in timings and m in ran and "torch" not in timings]
    assert missing == []


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "tiny.onnx"
    api.export(ModelRef(EXAMPLE, CHECKPOINT), Inputs(("input_ids:batch=2xseq=16:int64:0..1000",)), path,
               ExportOptions(exporter="torchscript"))
    return path, onnx.load(str(path))


@pytest.mark.parametrize("warmup, forwards", [(0, 2 * 7), (2, 2 + 2 * 7 + 1 + 2)])
def test_a_profile_runs_untimed_only_what_its_warm_up_asks_for(exported, warmup, forwards):
    """7 iterations are blocks of 5 and 2, plain then instrumented each: with no warm-up every run
    is timed (no run only to check the model); with warm-up, `warmup` runs first and one untimed
    run before each block that follows a block of the other kind (3 of them)."""
    _, model = exported
    module = ModelRef(EXAMPLE, CHECKPOINT).load()
    ran = []
    module.register_forward_pre_hook(lambda *_: ran.append(1))
    result = profile_runtimes(model, FEEDS, ("torch",), RunnerSetup(module), Timing(iterations=7, warmup=warmup))
    log = result.logs["torch"]
    assert len(log.end_to_end_ns) == len(log.instrumented_ns) == 7 and len(ran) == forwards


def test_a_model_returning_other_outputs_than_the_graph_is_one_line_before_a_profile(exported):
    _, model = exported

    class TwoOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ModelRef(EXAMPLE, CHECKPOINT).load()

        def forward(self, input_ids):
            logits = self.inner(input_ids)
            return logits, logits

    with pytest.raises(InputSpecError, match="the model returned 2 tensors but the ONNX graph has 1 outputs"):
        profile_runtimes(model, FEEDS, ("torch", "ort"), RunnerSetup(TwoOutputs()), Timing(iterations=1, warmup=0))


@pytest.mark.parametrize("warmup", [0, 2])
def test_the_tensorrt_collector_alternates_blocks_and_keeps_gpu_compute_apart(exported, monkeypatch, warmup):
    """TensorRT cannot run on this project's machines: its IProfiler and an engine's runner are
    stood in for, to check the loop around them. 7 iterations are blocks of 5 and 2, plain then
    profiled, each after one untimed run when there is warm-up; the profiler is attached to
    profiled runs only; each timed plain run's GPU compute time is kept apart from its end to end;
    layers map to modules, a fused layer to every module it covers."""
    import sys
    import types

    import ticknorm.profiler.collect_trt as collect_trt

    _, model = exported
    table = ScopeTable(model)
    nodes = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "LayerNormalization")]

    class Context:
        profiler = None

    class Engine:
        name, compute_ns = "trt", 0

        def __init__(self):
            self.context, self.runs = Context(), []

        def infer(self, feeds):
            profiler = self.context.profiler
            self.runs.append("profiled" if profiler else "plain")
            self.compute_ns = 1000 * len(self.runs)
            if profiler:
                profiler.report_layer_time(f"{nodes[0]} + {nodes[1]}", 0.25)
                profiler.report_layer_time("Reformatting CopyNode for Input Tensor 0", 0.01)

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(
        __version__="10.9.0", IProfiler=type("IProfiler", (), {"__init__": lambda self: None})))
    engine = Engine()
    log = collect_trt._timed(engine, FEEDS, Timing(iterations=7, warmup=warmup), table, lambda: None)
    schedule = [("plain", False)] * warmup  # (kind, timed)
    for size in (5, 2):
        for kind in ("plain", "profiled"):
            schedule += [(kind, False)] * bool(warmup) + [(kind, True)] * size
    assert engine.runs == [kind for kind, _ in schedule] and engine.context.profiler is None
    assert log.device_ns == [1000 * (n + 1) for n, (kind, timed) in enumerate(schedule) if kind == "plain" and timed]
    assert len(log.end_to_end_ns) == len(log.instrumented_ns) == 7
    rows = log.per_module()
    fused = " + ".join(sorted({table.modules_for_trt(nodes[0])[0], table.modules_for_trt(nodes[1])[0]}))
    assert rows[fused].median_ms == pytest.approx(0.25) and rows[UNATTRIBUTED].median_ms == pytest.approx(0.01)


def test_runtime_names_map_back_to_modules(exported):
    _, model = exported
    table = ScopeTable(model)
    nodes = {node.name: node for node in model.graph.node}
    ln = next(n for n in nodes if nodes[n].op_type == "LayerNormalization")
    matmuls = [n for n in nodes if nodes[n].op_type in ("MatMul", "Gemm")]
    assert table.modules_for_ort(ln + "/LayerNormFusion/") == table.modules_for_ort(ln)
    assert table.modules_for_ort("Reformat_999") == ()
    fused = table.modules_for_trt(f"{matmuls[0]} + {ln}")
    assert len(fused) == 2
    foreign = table.modules_for_trt(f"{{ForeignNode[{matmuls[0]}...{matmuls[-1]}]}}")
    assert {"layers.0.attention.qkv", "layers.1.feed_forward.2"} <= set(foreign)
    assert table.modules_for_trt("Reformatting CopyNode for Input Tensor 0 to x") == ()


def test_profile_torch_and_ort_aligned_per_module(exported, tmp_path):
    _, model = exported
    setup = RunnerSetup(ModelRef(EXAMPLE, CHECKPOINT).load())
    result = profile_runtimes(model, FEEDS, ("torch", "ort"), setup, Timing(iterations=5, warmup=1, depth=2))
    rows = dict(result.rows())
    for module in ("embeddings", "layers.0", "layers.1", "final_norm", "head"):
        assert set(rows[module]) == {"torch", "ort"}, module
    assert UNATTRIBUTED not in rows  # ORT's own fused nodes mapped back through its optimized graph
    assert [m for m, _ in result.rows()].index("layers.0") < [m for m, _ in result.rows()].index("layers.1")
    for log in result.logs.values():
        assert 0.3 < log.coverage() <= 1.0 and len(log.end_to_end_ns) == 5
    profile_outputs.write_trace(result, tmp_path / "t.json")
    trace = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert {e["pid"] for e in trace} == {1, 2} and any(e.get("args", {}).get("modules") for e in trace)
    profile_outputs.write_csv(result, tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "module,runtime,median_ms,p10_ms,p90_ms,min_ms,samples,unstable"
    profile_outputs.write_plot(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_report_joins_latency_and_error_and_flags_slow_inaccurate_modules(exported, tmp_path):
    _, model = exported
    setup = RunnerSetup(ModelRef(EXAMPLE, CHECKPOINT).load())
    timings = profile_runtimes(model, FEEDS, ("torch", "ort"), setup, Timing(iterations=3, warmup=1, depth=2))
    with torch.no_grad():
        setup.module.get_submodule("layers.1.feed_forward.2").weight.mul_(1.05)
    accuracy = compare_runtimes(model, FEEDS, ["ort"], setup, layers=LayerSelection(depth=2))
    rows = {row.module: row for row in join(timings, accuracy)}
    assert rows["layers.0"].passed == {"ort": True} and rows["layers.1"].passed == {"ort": False}
    assert rows["layers.1"].flagged and not rows["layers.0"].flagged
    assert set(rows["layers.1"].latency_ms) == {"torch", "ort"}
    write_html(JoinedReport(list(rows.values()), timings, accuracy, {"model_digest": "abc"}), tmp_path / "r.html", "tiny")
    page = (tmp_path / "r.html").read_text()
    assert "<tr class='flag'><td>layers.1</td>" in page and "data:image/png;base64," in page
    assert "<p class=\"verdict\">FAIL</p>" in page and "<dt>model_digest</dt><dd>abc</dd>" in page
    assert "at atol 0.0001 rtol 0.001: FAIL" in page


def test_profile_and_report_cli(exported, tmp_path):
    path, _ = exported
    common = [str(path), "--model", EXAMPLE, "--checkpoint", CHECKPOINT, "--input", "input_ids:2x16:int64",
              "--iterations", "3", "--warmup", "1", "--depth", "2"]
    result = CliRunner().invoke(main, ["profile", *common, "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    assert "ort/torch" in result.output and "coverage" in result.output
    assert json.loads((tmp_path / "p.json").read_text())["rows"][0]["module"]
    report = CliRunner().invoke(main, ["report", *common, "-o", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json")])
    assert report.exit_code == 0, report.output
    assert "0 slow and inaccurate" in report.output and report.output.strip().endswith("PASS")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["schema"] == 1 and written["passed"] is True and written["rows"][0]["module"]
    assert {"model_digest", "inputs", "tolerances", "timing", "created", "versions"} <= set(written["meta"])
    assert written["meta"]["model_digest"] == model_digest(load_onnx(path))  # the report read the graph alone
    assert written["meta"]["inputs"] == {"input_ids": "[2, 16] int64"} and written["meta"]["timing"]["iterations"] == 3
    assert written["meta"]["tolerances"] == {"ort": {"atol": 1e-4, "rtol": 1e-3}}
    strict = CliRunner().invoke(main, ["report", *common, "-o", str(tmp_path / "s.html"), "--atol", "0", "--rtol", "0"])
    assert strict.exit_code == 1 and strict.output.strip().endswith("FAIL")  # ORT is not bit-exact: over a zero tolerance
    bad = CliRunner().invoke(main, ["profile", *common[:-6], "--iterations", "0"])
    assert bad.exit_code == 2 and "--iterations must be at least 1" in bad.stderr


def test_trtexec_files_join_the_table_mapped_to_modules(exported, tmp_path):
    """Files in the formats trtexec writes (--exportProfile, --exportLayerInfo with detailed
    verbosity): fused and Myelin layers map to modules through names or metadata; what maps to
    nothing is the (unattributed) row, counted."""
    path, model = exported
    nodes = {node.name: node for node in model.graph.node}
    norm = next(n for n in nodes if nodes[n].op_type == "LayerNormalization"
                and get_scope(nodes[n]) == "layers.0.attention_norm")
    matmuls = [n for n in nodes if nodes[n].op_type in ("MatMul", "Gemm")]
    profile = [{"count": 100},
               {"name": f"{matmuls[0]} + {norm}", "timeMs": 2.0, "averageMs": 0.02, "medianMs": 0.02, "percentage": 40},
               {"name": "myelin_layer_7", "timeMs": 1.0, "averageMs": 0.01, "medianMs": 0.01, "percentage": 20},
               {"name": "Reformatting CopyNode for Input Tensor 0 to x", "timeMs": 0.5, "averageMs": 0.005,
                "medianMs": 0.005, "percentage": 10}]
    layers = {"Layers": [{"Name": "myelin_layer_7", "LayerType": "Myelin",
                          "Metadata": f"[ONNX Layer: {matmuls[-1]}]\x1e[ONNX Layer: {matmuls[-2]}]"}],
              "Bindings": ["input_ids", "output"]}
    (tmp_path / "p.json").write_text(json.dumps(profile))
    (tmp_path / "l.json").write_text(json.dumps(layers))
    table = ScopeTable(model)
    log = import_trtexec(TrtexecFiles(tmp_path / "p.json", tmp_path / "l.json"), table)
    rows = log.per_module(depth=None)
    assert log.runtime == "trt (trtexec)"
    assert "1 of 3 layers map to no module" in log.source and "? (give --trtexec-log" in log.source
    assert UNATTRIBUTED in rows and rows[UNATTRIBUTED].median_ms == pytest.approx(0.005)  # counted, not dropped
    mapped = {key for key in rows if key != UNATTRIBUTED}
    assert any("layers.0.attention_norm" in key for key in mapped)  # the fused layer's group row
    assert {table.scope[matmuls[-1]], table.scope[matmuls[-2]]} & set(" + ".join(mapped).split(" + "))
    common = [str(path), "--model", EXAMPLE, "--checkpoint", CHECKPOINT, "--input", "input_ids:2x16:int64",
              "--iterations", "2", "--warmup", "0", "--runtime", "ort"]
    done = CliRunner().invoke(main, ["profile", *common, "--trtexec-profile", str(tmp_path / "p.json"),
                                     "--trtexec-layers", str(tmp_path / "l.json")])
    assert done.exit_code == 0, done.output
    assert "trt (trtexec) ms" in done.output
    bad = CliRunner().invoke(main, ["profile", *common, "--trtexec-layers", str(tmp_path / "l.json")])
    assert bad.exit_code == 2 and "give that file too" in bad.stderr
    (tmp_path / "x.json").write_text('{"Layers": 3}')
    foreign = CliRunner().invoke(main, ["profile", *common, "--trtexec-profile", str(tmp_path / "x.json")])
    assert foreign.exit_code == 2 and "is not a trtexec --exportProfile file" in foreign.stderr
    line = CliRunner().invoke(main, ["trtexec-command", str(path), "--input", "input_ids:batch=2xseq=16:int64"])
    assert line.exit_code == 0 and "--optShapes=input_ids:2x16" in line.output and "--exportLayerInfo=" in line.output


TRTEXEC_LOG = """&&&& RUNNING TensorRT.trtexec [TensorRT v101600] [b72] # trtexec --onnx=tiny.onnx --stronglyTyped
[12/04/2026-18:00:00] [I] === Build Options ===
[12/04/2026-18:00:00] [I] Precision: FP32
[12/04/2026-18:00:00] [I] === Device Information ===
[12/04/2026-18:00:00] [I] Selected Device: NVIDIA H200
[12/04/2026-18:00:00] [I] Compute Capability: 9.0
[12/04/2026-18:00:00] [I] TensorRT version: 10.16.0
[12/04/2026-18:00:03] [I] === Performance summary ===
[12/04/2026-18:00:03] [I] Latency: min = 0.05 ms, max = 0.9 ms, mean = 0.06 ms, median = 0.055 ms, percentile(90%) = 0.07 ms
[12/04/2026-18:00:03] [I] GPU Compute Time: min = 0.02 ms, max = 0.7 ms, mean = 0.031 ms, median = 0.03 ms, percentile(90%) = 0.04 ms
&&&& PASSED TensorRT.trtexec [TensorRT v101600] [b72] # trtexec --onnx=tiny.onnx --stronglyTyped
"""


def test_trtexec_log_states_version_gpu_precision_and_plain_time(exported, tmp_path):
    """The console output (`| tee`) gives the label and the plain runs' GPU compute time; the
    detailed layer info gives the types the engine runs; layer info at the default verbosity (names
    only) is accepted."""
    path, model = exported
    nodes = [node.name for node in model.graph.node if node.op_type == "LayerNormalization"]
    profile = [{"count": 50}, {"name": "fused_norm", "medianMs": 0.02, "averageMs": 0.02},
               {"name": "__myl_Cast_1", "medianMs": 0.01, "averageMs": 0.01}]
    detailed = {"Layers": [
        {"Name": "fused_norm", "LayerType": "kgen", "Metadata": f"[ONNX Layer: {nodes[0]}]\x1f[ONNX Layer: {nodes[1]}]",
         "Outputs": [{"Name": "a", "Dimensions": [2, 16, 64], "Format/Datatype": "Half"}]},
        {"Name": "__myl_Cast_1", "LayerType": "kgen", "Metadata": "",
         "Outputs": [{"Name": "b", "Dimensions": [2, 16], "Format/Datatype": "Row major linear FP32"}]}],
        "Bindings": ["input_ids", "output"]}
    for name, content in (("p.json", json.dumps(profile)), ("l.json", json.dumps(detailed)), ("t.log", TRTEXEC_LOG),
                          ("names.json", json.dumps({"Layers": ["fused_norm", "__myl_Cast_1"], "Bindings": []}))):
        (tmp_path / name).write_text(content)
    stated = read_trtexec_log(tmp_path / "t.log")
    assert (stated.version, stated.gpu, stated.gpu_compute_ms) == ("10.16.0", "NVIDIA H200", 0.03)
    assert stated.precision.startswith("strongly typed")
    log = import_trtexec(TrtexecFiles(tmp_path / "p.json", tmp_path / "l.json", tmp_path / "t.log"), ScopeTable(model))
    assert log.end_to_end_ms == pytest.approx(0.03) and log.overhead == pytest.approx(0.03 / 0.03 - 1 + 0.0, abs=1e-9)
    assert "TensorRT 10.16.0 on NVIDIA H200" in log.source and "fp16 (1 layers), fp32 (1 layers)" in log.source
    assert "1 of 2 layers map to no module" in log.source
    names_only = import_trtexec(TrtexecFiles(tmp_path / "p.json", tmp_path / "names.json"), ScopeTable(model))
    assert names_only.coverage() == pytest.approx(0.0)  # names alone (no metadata, no scopes in them) map nothing
    common = [str(path), "--model", EXAMPLE, "--checkpoint", CHECKPOINT, "--input", "input_ids:2x16:int64",
              "--iterations", "2", "--warmup", "0", "--runtime", "ort", "--trtexec-profile", str(tmp_path / "p.json")]
    done = CliRunner().invoke(main, ["profile", *common, "--trtexec-layers", str(tmp_path / "l.json"), "--trtexec-log",
                                     str(tmp_path / "t.log"), "--json", str(tmp_path / "out.json")])
    assert done.exit_code == 0, done.output
    assert "trt (trtexec): end-to-end 0.030 ms" in done.output and "TensorRT 10.16.0 on NVIDIA H200" in done.output
    assert "TensorRT 10.16.0" in json.loads((tmp_path / "out.json").read_text())["runtimes"]["trt (trtexec)"]["source"]
    (tmp_path / "other.log").write_text("hello\n")
    for extra, message in ((["--trtexec-log", str(tmp_path / "other.log")], "is not trtexec's console output"),
                           (["--trtexec-log", str(tmp_path / "none.log")], "trtexec log file not found")):
        bad = CliRunner().invoke(main, ["profile", *common, *extra])
        assert bad.exit_code == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ") and message in bad.stderr
        assert "timing ort" not in bad.stderr  # the files are read before anything is timed


def test_overhead_pairs_each_block_with_the_block_beside_it():
    """The machine slowed down between a plain block and its instrumented one, once: a ratio of
    the overall medians reads +110 %, the median of the blocks' ratios the +5 % the other blocks show."""
    from ticknorm.profiler.ticks import BLOCK, TickLog

    log = TickLog("ort", "runtime", iterations=3 * BLOCK)
    for plain, hooked in ((100, 105), (100, 210), (200, 210)):
        log.end_to_end_ns += [plain] * BLOCK
        log.instrumented_ns += [hooked] * BLOCK
    assert log.overhead == pytest.approx(0.05)
