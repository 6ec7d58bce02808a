"""Per-sample output lengths of the windowed ops, shared by the op kinds, the front ends and the IR."""

from __future__ import annotations


def pool_output_length(length: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """PyTorch's (and ONNX's) pooled length, including ceil_mode's rule that the last
    window must start inside the input or its left padding."""
    span = length + 2 * padding - kernel
    n = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (n - 1) * stride >= length + padding:
        n -= 1
    return n


def conv_output_length(length: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
