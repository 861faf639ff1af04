"""Precision on foreign graphs: networks inside If and Loop bodies converted (a VAD model's If, an
Optimum merged decoder reading the outer graph's weights), the share of float weights converted and
the refusal of a conversion that converts less than half, and the verdict of the real low-precision
graph in ONNX Runtime with the emulation as the fallback."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import ort_run
from ticknorm import Precision
from ticknorm.base.graph import bodies
from ticknorm.cli import main
from ticknorm.exporter.precision.convert import convert

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
WIDTH = 16
RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, WIDTH)).astype(np.float32)


def _weight(name: str, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal((WIDTH, WIDTH)) * scale).astype(np.float32), name)


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
