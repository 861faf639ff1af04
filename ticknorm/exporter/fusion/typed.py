"""A model in onnx-ir with the shapes ONNX infers (`base.graph.inferred_types`: weights neither
copied nor read) kept beside it: unlike `base.graph.typed`, the types are not written into the
values, so only the few values a rule asks about (`values.dims`) are ever read, and what fusion
writes is typed where the file was. ONNX Runtime's symbolic shape inference stands behind it,
run once and only when a norm needs a type or dims ONNX's inference left unknown (it is slow)."""

import contextlib
import logging

import onnx
import onnx_ir as ir

from ticknorm.base.graph import inferred_types, weightless
from ticknorm.base.write_back import ReadModel, read


def typed_ir(model: onnx.ModelProto) -> ir.Model:
    return typed_read(model).model


def typed_read(model: onnx.ModelProto) -> ReadModel:
    """`model` in onnx-ir (paired with the protos it was read from, which fusion writes back
    where nothing changed), with what ONNX infers of each value's type kept beside it (each
    graph's `meta["inferred"]`, read by `values`) rather than written into the values: what
    fusion writes is typed where the file was, and only the values fusion asks about are read."""
    inferred = inferred_types(model)
    converted = read(model)
    symbolic = SymbolicTypes(model)
    for graph in [converted.model.graph, *(body for _, body in converted.bodies)]:
        graph.meta["inferred"] = inferred
        graph.meta["symbolic"] = symbolic
    return converted


class SymbolicTypes:
    """What ONNX Runtime's symbolic shape inference gives each value of the main graph, by name:
    computed on first use. It knows ops ONNX's inference does not (ONNX Runtime's contrib ops)
    and carries symbolic dims through Reshapes of computed shapes."""

    def __init__(self, model: onnx.ModelProto):
        self._model = model
        self._types: dict[str, onnx.TypeProto] | None = None

    @property
    def ran(self) -> bool:
        return self._types is not None

    def get(self, name: str) -> onnx.TypeProto | None:
        if self._types is None:
            self._types = _symbolic_types(self._model)
        return self._types.get(name)


def _symbolic_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Its `infer_shapes` loop without the last step, which saves a partly inferred model (weights
    and all) into the working directory: partial answers are what fusion wants. It runs on the
    weightless skeleton onnx's inference reads (`base.graph.weightless`): it copies what it is
    given. Private methods, so any change of them in ONNX Runtime leaves the dims unknown, never
    a crash; its logger is quieted while it runs only."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_rank, verbose
        inference._preprocess(weightless(model))
        with contextlib.suppress(Exception):  # it raises on ops it does not know: what it found before stays
            while inference.run_:
                inference._infer_impl()
        inference._update_output_from_vi()
        graph = inference.out_mp_.graph
    except Exception:  # noqa: BLE001 - it raises bare errors
        return {}
    finally:
        logger.setLevel(level)
    return {value.name: value.type for value in [*graph.input, *graph.value_info, *graph.output]}
