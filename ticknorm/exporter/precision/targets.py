"""One runner setup for every runtime of a command: the same shape profile, and per low type one
precision plan, measured once on the command's feeds (the graph's own when it is in that type),
with the graph converted to it where a runtime takes its precision from the graph (TensorRT)."""

from ticknorm.base.errors import InputSpecError
from ticknorm.base.inputs import graph_feeds
from ticknorm.base.precision import Precision
from ticknorm.exporter.precision.lower import low_precision_graph
from ticknorm.exporter.precision.plan import plan_precision
from ticknorm.runtime.registry import LowPrecision, RunnerSetup, Runtimes, converts_graph, runtime_precision
from ticknorm.runtime.trt_runner import profile_for


def runner_setup(model, module, feeds: dict, runtimes: Runtimes, progress=lambda message: None) -> RunnerSetup:
    own = Precision.of_graph(model)
    low = {}
    for dtype in sorted({runtime_precision(r, model) for r in runtimes.names} - {"fp32"}):
        if own.dtype == dtype:
            low[dtype] = LowPrecision(own)
            continue
        if own.low:
            raise InputSpecError(f"the graph is {own.dtype}: a {dtype} runtime needs it in fp32 or {dtype}")
        progress(f"measuring an fp32 run for the {dtype} policy")
        policy = plan_precision(model, graph_feeds(model, feeds), runtimes.precision.with_dtype(dtype))
        from_graph = any(converts_graph(r) and runtime_precision(r, model) == dtype for r in runtimes.names)
        low[dtype] = LowPrecision(policy, low_precision_graph(model, policy) if from_graph else None)
    return RunnerSetup(module, profile_for(model, feeds), runtimes.ort_optimization, low)
