"""Prove a fused graph computes what the original computed, before anything is written.

Both graphs run in ONNX Runtime on the same seeded inputs: the original with its graph
optimizations off (so ORT's own fusions cannot stand in for the decomposed norms it is the
reference for), the fused one as a deployment runs it (every optimization on). Compared: every
graph output and the output of every fused normalization, which survives fusion under its
original name. The fused run's graph outputs are returned too, so an export compares them with
PyTorch instead of building a third session for the same numbers.

Seeded inputs are ordinary rows; the rows where a fused op and its decomposition part are not.
So both graphs, cut down to the norms, also run edge rows fed to the norms' inputs: all zeros,
all one constant, the seeded input scaled to around 1e4 and to around 1e-6 (an epsilon the fused
attribute cannot hold gives NaN on a zero row, where the original gives the bias). The fused
norms' outputs must match there too, NaN and Inf in the same places; only where the original
overflows (an fp16 square at 1e4) may the fused op be finite instead. A mismatch fails the
check with the row it failed on.

Where ONNX Runtime has no kernel for a node of the original (a Pow with an int8 exponent) and
fusion took that node away, the original runs in onnx's reference evaluator instead: slower, but
the reference it is meant to be. The fused graph always runs in ONNX Runtime.
"""

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from ticknorm.base.errors import FusionError, OnnxFileError, RuntimeFailure, first_line
from ticknorm.base.graph import bodies, coarsest_floats, inferred_types, typed
from ticknorm.base.metrics import ArrayComparison, compare_arrays, dtype_tolerance
from ticknorm.base.scopes import exposed
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner


@dataclass
class Verification:
    checks: dict[str, ArrayComparison]  # by tensor, fused vs original
    outputs: list[dict[str, np.ndarray]]  # the fused graph's outputs on `feeds`, then on each of `also`
    reference: str = "ONNX Runtime"  # what ran the original


REFERENCE_EVALUATOR = "onnx's reference evaluator (ONNX Runtime has no kernel for a node of the original)"


@dataclass(frozen=True)
class Checked:
    """What a fused graph is checked on. `tensors` maps each tensor to check (outputs of fused
    nodes) to its element type, `sources` each of them to the fused node's input (edge rows are
    fed there; none without), `inner` the same for norms fused inside If/Loop bodies, which only
    edge rows check here (`_body_edge_checks`). `floats`: the float type each tensor of the
    original was rounded to on its way (`base.graph.coarsest_floats`), the type it is judged at,
    when the caller found them already; else they are found from the original."""

    tensors: dict[str, int]
    sources: dict[str, str] = field(default_factory=dict)
    inner: dict[str, str] = field(default_factory=dict)
    floats: dict[str, int | None] | None = None


def verify_fused(original: onnx.ModelProto, fused: onnx.ModelProto, checked: Checked,
                 feeds: dict[str, np.ndarray], weights_dir=None, also=()) -> Verification:
    """The two sessions run one after the other, so only one holds the weights at a time; the
    fused one also runs each feed dict of `also` (an export's other checks) while it is open."""
    tensors, sources, inner = checked.tensors, checked.sources, checked.inner
    (expected,), reference_by = _original_runs(original, [feeds], [*tensors, *sources.values()], weights_dir)
    with OrtRunner(fused, mapped=MappedWeights.staged(weights_dir), extra_outputs=list(tensors)) as runner:
        actual = runner.infer(feeds).outputs
        outputs = [actual] + [runner.infer(more).outputs for more in also]
    floats = checked.floats
    if floats is None:
        floats = {value.name: found for value, found in coarsest_floats(typed(original).graph).items()
                  if value.name}
    tolerances = {}
    for name in actual:
        coarsest = floats.get(name) or tensors.get(name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(coarsest) if coarsest else expected[name].dtype
        tolerances[name] = dtype_tolerance(dtype)
    checks = {name: compare_arrays(name, expected[name], found, *tolerances[name]) for name, found in actual.items()}
    edges = {row: {**feeds, **edge} for row, edge in edge_feeds({s: expected[s] for s in sources.values()}).items()}
    types = {name: onnx.helper.np_dtype_to_tensor_dtype(expected[name].dtype) for name in [*sources, *sources.values()]}
    for row, (reference, result) in zip(edges, _edge_runs((original, fused), sources, edges, weights_dir, types)):
        for name in sources:
            check = _edge_check(name, reference[name], result[name], tolerances[name])
            if checks[name].passed and not check.passed:
                checks[name] = replace(check, reason=f"changes the numbers on {row}: {check.reason}")
    if inner:
        checks.update(_body_edge_checks(original, fused, inner, weights_dir, _fed_sizes(original, feeds)))
    graph_outputs = [o.name for o in fused.graph.output]
    return Verification(checks, [{name: run[name] for name in graph_outputs} for run in outputs], reference_by)


def _original_runs(model: onnx.ModelProto, feed_sets: list[dict[str, np.ndarray]], extra: list[str],
                   weights_dir) -> tuple[list[dict[str, np.ndarray]], str]:
    """The original's outputs and `extra` tensors on each feed dict, and what computed them: ONNX
    Runtime with its optimizations off, or, where it has no kernel for a node (and the weights
    are in the model), onnx's reference evaluator."""
    extra = list(dict.fromkeys(extra))
    try:
        with OrtRunner(model, optimization="disabled", mapped=MappedWeights.staged(weights_dir),
                       extra_outputs=extra) as runner:
            return [runner.infer(feeds).outputs for feeds in feed_sets], "ONNX Runtime"
    except OnnxFileError as exc:
        if "NOT_IMPLEMENTED" not in str(exc) or weights_dir is not None:
            raise
    names = list(dict.fromkeys([*(o.name for o in model.graph.output), *extra]))
    with exposed(model, [name for name in names if name not in {o.name for o in model.graph.output}]):
        evaluator = ReferenceEvaluator(model)
    try:
        runs = [dict(zip(names, evaluator.run(names, feeds))) for feeds in feed_sets]
    except Exception as exc:  # noqa: BLE001 - the evaluator raises whatever its kernels do
        raise RuntimeFailure(f"neither ONNX Runtime nor onnx's reference evaluator runs the original: "
                             f"{first_line(exc)}") from exc
    return runs, REFERENCE_EVALUATOR


def _edge_runs(models, sources: dict[str, str], edges: dict[str, dict[str, np.ndarray]], weights_dir, types):
    """(original's, fused's) outputs on each edge row: both graphs cut down to what lies between the
    fused nodes' inputs and outputs (`_cut`), so the rows reach the norms themselves; the graph
    inputs stay inputs, for what the cut still reads of them (shapes, a mask). `types`: each
    input's and output's element type, for those shape inference left untyped."""
    if not edges:
        return []
    ends = (list(dict.fromkeys(sources.values())), list(sources))
    cuts = [_cut(model, model.graph, ends, types, list(model.graph.input)) for model in models]
    if cuts[0] is None or cuts[1] is None:
        raise FusionError("the graph cannot be cut down to its fused norms for the edge-row check")
    reference, _ = _original_runs(cuts[0], list(edges.values()), [], weights_dir)
    with OrtRunner(cuts[1], mapped=MappedWeights.staged(weights_dir)) as runner:
        return list(zip(reference, [runner.infer(edge).outputs for edge in edges.values()]))


def _fed_sizes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """The size `feeds` gave each symbolic dim of the graph's inputs (`batch` -> 2)."""
    sizes = {}
    for value in model.graph.input:
        if value.name in feeds:
            for dim, size in zip(value.type.tensor_type.shape.dim, np.shape(feeds[value.name])):
                if dim.dim_param:
                    sizes[dim.dim_param] = int(size)
    return sizes


def _body_edge_checks(original: onnx.ModelProto, fused: onnx.ModelProto, inner: dict[str, str],
                      weights_dir, fed: dict[str, int]) -> dict[str, ArrayComparison]:
    """Edge rows for norms fused inside If/Loop bodies, whose tensors no session can return, nor
    any run of a branch the feeds do not take (a VAD's If on its sample rate): each body, in both
    graphs, cut down to the norm (`_body_cut`) and fed edge rows made from a seeded tensor of the
    input's dims, a symbolic one sized as `fed` sizes it (a norm whose input dims are still not
    known is checked through the graph's outputs only). The first failing row of each norm, by its output."""
    types = inferred_types(original)
    failed: dict[str, ArrayComparison] = {}
    for output, source in inner.items():
        tensor_type = types[source].tensor_type if source in types else onnx.TypeProto.Tensor()
        sizes = [d.dim_value if d.HasField("dim_value") else fed.get(d.dim_param, 0) for d in tensor_type.shape.dim]
        if not sizes or 0 in sizes or not tensor_type.elem_type:
            continue
        cuts = [_body_cut(model, source, output, types) for model in (original, fused)]
        if cuts[0] is None or cuts[1] is None:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        seeded = np.random.default_rng(0).standard_normal(sizes).astype(dtype)
        edges = edge_feeds({source: seeded})
        reference, _ = _original_runs(cuts[0], list(edges.values()), [], weights_dir)
        with OrtRunner(cuts[1], mapped=MappedWeights.staged(weights_dir)) as runner:
            results = [runner.infer(edge).outputs for edge in edges.values()]
        for row, expected, actual in zip(edges, reference, results):
            check = _edge_check(output, expected[output], actual[output], dtype_tolerance(dtype))
            if not check.passed:
                failed[output] = replace(check, reason=f"changes the numbers on {row}: {check.reason}")
                break
    return failed


def _body_cut(model: onnx.ModelProto, source: str, output: str, types) -> onnx.ModelProto | None:
    """The norm computing `output` inside an If/Loop body, cut out (`_cut`); None where no body
    computes it or the cut reads what it cannot hold (a value from an enclosing body's node)."""
    body = next((graph for _, graph in bodies(model.graph) if any(output in n.output for n in graph.node)), None)
    elem_types = {name: types[name].tensor_type.elem_type for name in (source, output) if name in types}
    return None if body is None else _cut(model, body, ([source], [output]), elem_types)


def _cut(model: onnx.ModelProto, graph: onnx.GraphProto, ends: tuple[list[str], list[str]],
         elem_types: dict[str, int], inputs: list[onnx.ValueInfoProto] | None = None) -> onnx.ModelProto | None:
    """The nodes of `graph` (the main graph or a body of `model`) between `ends` (sources, outputs)
    as a model of their own, with only the initializers they read, from any graph of `model` (a
    merged decoder's branches read every weight: only the norms' are copied), and `inputs` (graph
    inputs the cut may still read). No shape inference runs: onnx's Extractor infers the whole
    model, which cannot be serialized past 2 GiB. None where the cut reads anything else."""
    sources, outputs = ends
    made_by = {name: index for index, node in enumerate(graph.node) for name in node.output}
    kept: set[int] = set()
    pending = list(outputs)
    while pending:
        name = pending.pop()
        if name not in sources and name in made_by and made_by[name] not in kept:
            kept.add(made_by[name])
            pending.extend(graph.node[made_by[name]].input)
    nodes = [node for index, node in enumerate(graph.node) if index in kept]
    read = {name for node in nodes for name in node.input if name}
    weights = [t for each in [model.graph, *(body for _, body in bodies(model.graph))] for t in each.initializer
               if t.name in read]
    given = [value for value in inputs or () if value.name not in sources]
    held = {*sources, *(value.name for value in given), *(t.name for t in weights),
            *(name for node in nodes for name in node.output)}
    if not read <= held or any(name not in elem_types for name in [*sources, *outputs]):
        return None
    def declared(names: list[str]) -> list[onnx.ValueInfoProto]:
        return [onnx.helper.make_tensor_value_info(name, elem_types[name], None) for name in names]

    cut = onnx.helper.make_graph(nodes, "cut", declared(sources) + given, declared(outputs), weights)
    return onnx.helper.make_model(cut, opset_imports=model.opset_import, ir_version=model.ir_version,
                                  functions=model.functions)


def edge_feeds(feeds: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """`feeds` with every float input's rows made edge rows, by the row they are (other inputs
    kept). Empty when no input is float."""
    floats = [name for name, array in feeds.items() if np.asarray(array).dtype.kind == "f"]
    if not floats:
        return {}
    rows = {"an all-zero row": lambda a: np.zeros_like(a), "a constant row": lambda a: np.full_like(a, 0.5),
            "a row around 1e4": lambda a: _scaled(a, 1e4), "a row around 1e-6": lambda a: _scaled(a, 1e-6)}
    return {row: {name: (make(np.asarray(array)) if name in floats else array) for name, array in feeds.items()}
            for row, make in rows.items()}


def _scaled(array: np.ndarray, peak: float) -> np.ndarray:
    """`array` scaled so its largest magnitude is `peak`: 1e4 fits fp16 too, so the row is no inf."""
    largest = float(np.abs(array).max()) if array.size else 0.0
    return (array.astype(np.float64) * (peak / largest if largest else 0.0)).astype(array.dtype)


def _edge_check(name: str, reference: np.ndarray, actual: np.ndarray,
                tolerance: tuple[float, float]) -> ArrayComparison:
    """Compared where the original is finite: where it overflowed, a fused op that did not is no fault."""
    if reference.shape == actual.shape and reference.dtype.kind == "f":
        finite = np.isfinite(reference)
        reference, actual = reference[finite], actual[finite]
    return compare_arrays(name, reference, actual, *tolerance)
