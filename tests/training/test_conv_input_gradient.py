"""``conv_input_gradient`` against PyTorch's autograd, for every stride/padding/dilation/group shape,
including uneven padding (left != right), which today's callers only reach through strided pools
but which a front end folding an explicit Pad into a convolution would produce."""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ecgx.training.export.ops.onnx_helpers import GraphBuilder, conv_input_gradient

CASES = [
    # (kernel, stride, (pad_l, pad_r), dilation, groups)
    *itertools.product([1, 3, 8], [1, 2], [(0, 0), (2, 2), (1, 3), (3, 0)], [1, 2], [1]),
    (5, 1, (4, 1), 1, 2),
    (4, 1, (0, 3), 3, 4),
]


def _input_gradient(kernel, stride, pads, dilation, groups, l_in=23, c_in=4, c_out=4):
    rng = np.random.default_rng(kernel * 100 + stride * 10 + dilation)
    w = rng.normal(size=(c_out, c_in // groups, kernel)).astype(np.float32)
    x = torch.from_numpy(rng.normal(size=(1, c_in, l_in)).astype(np.float32)).requires_grad_(True)
    y = torch.nn.functional.conv1d(
        torch.nn.functional.pad(x, pads), torch.from_numpy(w), stride=stride, dilation=dilation, groups=groups
    )
    g = rng.normal(size=y.shape).astype(np.float32)
    y.backward(torch.from_numpy(g))
    return w, g, x.grad.numpy()


def _onnx_gradient(w, g, kernel, stride, pads, dilation, groups, l_in):
    b = GraphBuilder("conv_t")
    g_in = b.add_input("g", [1, g.shape[1], 1, g.shape[2]])
    w3 = b.param("w", w)
    out = conv_input_gradient(
        b, g_in, w3, kernel, stride, pads, dilation, groups, (l_in, g.shape[2]), w.shape
    )
    b.add_output(out, "dx", [1, w.shape[1] * groups, 1, l_in])
    session = ort.InferenceSession(b.model().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"g": g[:, :, None, :]})[0][:, :, 0, :]


@pytest.mark.parametrize(("kernel", "stride", "pads", "dilation", "groups"), CASES)
def test_the_input_gradient_equals_autograd(kernel, stride, pads, dilation, groups) -> None:
    l_in = 23
    if l_in + sum(pads) < dilation * (kernel - 1) + 1:
        pytest.skip("the kernel is longer than the padded input")
    w, g, expected = _input_gradient(kernel, stride, pads, dilation, groups, l_in)
    got = _onnx_gradient(w, g, kernel, stride, pads, dilation, groups, l_in)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
