"""A package graph run in float64 (``float64_graph``): the engine's own computation without float32
rounding, on ONNX's reference evaluator. On a real LRP graph it equals the float64 rule reference to
float64 rounding, while the same graph on ONNX Runtime in float32 differs by float32 rounding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from zoo_models import fcn_wang, synthetic_ecgs

from ecgx.training.export.autograd_reference import autograd_attribution
from ecgx.training.export.float64_graph import FLOAT64_TOL, as_float64, run_float64
from ecgx.training.export.graphs import build_graph
from ecgx.training.export.ir_torch import ir_module
from ecgx.training.export.reference import as_float64 as module_as_float64
from ecgx.training.export.source import from_module

CLASSES = [{"key": f"c{i}", "code": str(i), "name": f"class {i}"} for i in range(5)]


@pytest.mark.parametrize("epsilon", [1e-2, 1e-6])
def test_a_real_lrp_graph_in_float64_equals_the_float64_reference(epsilon) -> None:
    import onnxruntime as ort

    source = from_module(fcn_wang(leads=12, samples=250, width=0.125), (12, 250), classes=CLASSES)
    graph = build_graph(source.ir, "lrp", None)
    x = synthetic_ecgs(3, 12, 250, seed=3)
    target = np.arange(3) % 5
    feeds = {"x": x, "seed": np.eye(5, dtype=np.float32)[target], "epsilon": np.array(epsilon, np.float32)}
    want = autograd_attribution(module_as_float64(ir_module(source.ir)), "lrp", x, target, epsilon=epsilon)
    got64 = run_float64(graph, feeds)[1]
    got32 = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[1]
    scale = np.abs(want).max()
    assert got64.dtype == np.float64 and np.abs(got64 - want).max() / scale <= FLOAT64_TOL
    assert np.abs(got32 - want).max() / scale > np.abs(got64 - want).max() / scale


def test_constants_casts_and_declared_types_are_widened() -> None:
    """1/3 as a float32 initialiser, a value_float constant and a cast to float32: all float64."""
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["third_c"], value_float=1.0 / 3.0),
            helper.make_node("Mul", ["x", "third"], ["a"]),
            helper.make_node("Add", ["a", "third_c"], ["b"]),
            helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(1.0 / 3.0, np.float32), "third")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    wide = as_float64(model)
    assert wide.graph.output[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    assert onnx.numpy_helper.to_array(wide.graph.initializer[0]).dtype == np.float64
    (y,) = run_float64(model, {"x": np.array([3.0, 6.0], np.float32)})
    # The float32 initialiser's value, widened exactly (1/3 rounded to float32), times x, plus the
    # constant widened alike: float64 arithmetic on the float32 values.
    third = float(np.float32(1.0 / 3.0))
    np.testing.assert_allclose(y, np.array([3.0, 6.0]) * third + third, rtol=1e-15)
    assert y.dtype == np.float64
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # the input unchanged
