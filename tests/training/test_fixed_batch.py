"""A forward graph exported for a fixed batch, run on any batch (``fixed_batch.any_batch``): an ONNX
Loop over chunks of that batch, the last padded with zeros and trimmed. The wrapped graph must equal
the graph run chunk by chunk for every batch size, never let a padding row reach a real ECG's
logits, and keep the model's weights in the outer graph (where the package makes them external)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ecgx.training.export.fixed_batch import any_batch, fixed_batch

LEADS, SAMPLES, CLASSES = 3, 8, 4


def _fixed_model(batch: int, opset: int = 17) -> onnx.ModelProto:
    """A linear model whose Reshape bakes the batch in (as a recurrent layer's initial state does):
    ONNX Runtime refuses any other batch. The Reshape's target shape is an initialiser."""
    w = np.random.default_rng(0).normal(size=(LEADS * SAMPLES, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["ecg", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["scores"]),
        ],
        "fixed",
        [helper.make_tensor_value_info("ecg", TensorProto.FLOAT, [batch, LEADS, SAMPLES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, CLASSES])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([batch, -1], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ecg": x})[0]


def _chunk_by_chunk(model: onnx.ModelProto, x: np.ndarray, batch: int) -> np.ndarray:
    outs = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *x.shape[1:]), np.float32)])
        outs.append(_run(model, padded)[: len(chunk)])
    return np.concatenate(outs)


def test_the_fixed_batch_is_read_from_the_input() -> None:
    assert fixed_batch(_fixed_model(2), "ecg") == 2
    dynamic = _fixed_model(2)
    dim = dynamic.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = "batch"
    assert fixed_batch(dynamic, "ecg") is None
    assert fixed_batch(dynamic, "no_such_input") is None


def test_the_model_as_exported_refuses_another_batch() -> None:
    with pytest.raises(Exception, match=r"(?i)invalid dimensions"):
        _run(_fixed_model(2), np.zeros((3, LEADS, SAMPLES), np.float32))


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 4), n=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_any_batch_equals_the_model_chunk_by_chunk(batch: int, n: int, seed: int) -> None:
    model = _fixed_model(batch)
    x = np.random.default_rng(seed).normal(size=(n, LEADS, SAMPLES)).astype(np.float32)
    got = _run(any_batch(model, "ecg", "scores", batch), x)
    assert got.shape == (n, CLASSES)
    np.testing.assert_allclose(got, _chunk_by_chunk(model, x, batch), rtol=0, atol=1e-6)


def test_a_padding_row_never_reaches_a_real_ecgs_logits() -> None:
    """Each ECG's logits alone equal its logits in any batch, whatever the padding beside it."""
    model = any_batch(_fixed_model(3), "ecg", "scores", 3)
    x = np.random.default_rng(1).normal(size=(5, LEADS, SAMPLES)).astype(np.float32)
    alone = np.concatenate([_run(model, x[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(_run(model, x), alone, rtol=0, atol=1e-6)


def test_the_weights_stay_in_the_outer_graph() -> None:
    """The package writes the outer graph's initialisers as external data from weights.bin, which the
    gate's randomisation replaces: a weight copied into the loop body would escape both."""
    wrapped = any_batch(_fixed_model(2), "ecg", "scores", 2)
    assert "w" in {i.name for i in wrapped.graph.initializer}
    loop = next(n for n in wrapped.graph.node if n.op_type == "Loop")
    assert not loop.attribute[0].g.initializer
    onnx.checker.check_model(wrapped, full_check=True)


def test_an_old_opset_and_a_bad_batch_are_refused() -> None:
    with pytest.raises(ValueError, match="opset 13 on; this one is opset 12"):
        any_batch(_fixed_model(2, opset=12), "ecg", "scores", 2)
    with pytest.raises(ValueError, match="at least 1"):
        any_batch(_fixed_model(2), "ecg", "scores", 0)
