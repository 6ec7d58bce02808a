"""A plain-autograd reference for the gradient-family methods, with the rule on each ReLU *op*.

Gradient, guided backpropagation and deconvolution differ only in what the backward
pass does at a ReLU; every other op is differentiated as it is. Here each rule is a
custom ``torch.autograd.Function`` applied in place of the ReLU op of an
:class:`~ecgx.training.export.ir_torch.IRModule` (and max pooling is one too, routing the
gradient explicitly to the first maximum of each window, as PyTorch and the exported
graphs do), so the rule acts on exactly one edge of the graph: the gradient flowing
from that ReLU's output back to its input.

Why a second reference next to Captum: Captum's ``GuidedBackprop`` and ``Deconvolution``
hook the ReLU module's *input tensor*. Where that tensor also feeds another op (a
pre-activation residual block: ``y = x + skip`` feeds both ``relu(y)`` and the next
addition), the hook sees the gradient summed over both consumers: guided backprop then
clamps the sum rather than the ReLU path alone, and deconvolution replaces the sum with
the ReLU path's clamped gradient, dropping the addition's path. The rule as published
(and as the package's backward graphs apply it) acts per edge, which is what this module
computes. On networks where no ReLU input is shared the two references agree
(``tests/training/test_autograd_reference.py`` shows both cases).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ecgx.core.errors import InvalidArgument
from ecgx.training.export.ir import RELU, Op
from ecgx.training.export.ir_torch import IRModule, target_indices
from ecgx.training.export.ops import OP_SPECS
from ecgx.training.export.ops.op_mul import GATE, as_broadcast, signal_and_gate
from ecgx.training.export.ops.shapes import pool_output_length

METHODS = ("gradient", "guided_backprop", "deconvolution", "deeplift", "lrp")
DEEPLIFT_EPS = 1e-10  # below this |delta in| a ReLU takes the plain gradient (Captum's DeepLift)


def _rescale(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepLIFT's rescale multiplier on a batch stacked as (inputs, references): where the
    input's difference is tiny (``small``) the caller takes the gradient instead of ``ratio``."""
    half = len(x) // 2
    d_in = (x[:half] - x[half:]).repeat(2, *([1] * (x.dim() - 1)))
    d_out = (y[:half] - y[half:]).repeat(2, *([1] * (x.dim() - 1)))
    small = d_in.abs() < DEEPLIFT_EPS
    return small, d_out / torch.where(small, torch.ones_like(d_in), d_in)


class ReluRule(torch.autograd.Function):
    """``relu`` forward; backward by ``method``'s rule for this edge.

    gradient: pass where the output is > 0; guided_backprop: that, then keep the positive
    part; deconvolution: keep the positive part of the incoming gradient, without the mask.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, method: str) -> torch.Tensor:  # type: ignore[override]
        y = x.clamp_min(0)
        ctx.method = method
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        if ctx.method == "deconvolution":
            return grad.clamp_min(0), None
        masked = grad * (y > 0).to(grad.dtype)
        return (masked.clamp_min(0) if ctx.method == "guided_backprop" else masked), None


def pool_windows(x: torch.Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool) -> torch.Tensor:
    """Every max-pool window of (B, C, L) ``x`` as (B, C, n, kernel): window ``j`` covers padded
    positions ``j * stride ...``, with -inf in the padding and past the right end (ceil_mode's
    last window), so that the padding never wins."""
    length = x.shape[-1]
    n = pool_output_length(length, kernel, stride, padding, ceil_mode)
    right = max(0, (n - 1) * stride + kernel - length - padding)
    padded = F.pad(x, (padding, right), value=float("-inf"))
    return padded.unfold(-1, kernel, stride)[..., :n, :]


class MaxPoolFirst(torch.autograd.Function):
    """Max pooling whose gradient goes to the first maximum of each window (PyTorch's choice)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool
    ) -> torch.Tensor:
        windows = pool_windows(x, kernel, stride, padding, ceil_mode)
        first = windows.argmax(dim=-1)  # argmax returns the first of equal maxima
        n = first.shape[-1]
        # Position of each winner in the padded signal (left padding, then x, then the right end).
        ctx.positions = first + torch.arange(n, device=x.device) * stride
        ctx.left, ctx.length = padding, x.shape[-1]
        ctx.padded_length = max((n - 1) * stride + kernel, padding + x.shape[-1])
        return windows.gather(-1, first.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_zeros(*grad.shape[:-1], ctx.padded_length)
        out.scatter_add_(-1, ctx.positions, grad)
        return out[..., ctx.left : ctx.left + ctx.length], None, None, None, None


class RescaleRelu(torch.autograd.Function):
    """DeepLIFT's rescale rule at one ReLU, on a batch holding the inputs (first half) and their
    references (second half): the gradient times delta-out / delta-in, or the plain gradient
    where |delta-in| < 1e-10."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clamp_min(0)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, y = ctx.saved_tensors
        small, ratio = _rescale(x, y)
        return torch.where(small, grad * (y > 0).to(grad.dtype), grad * ratio)


class EpsilonLayer(torch.autograd.Function):
    """LRP-epsilon at one layer (conv, dense, affine, pooling, addition): the incoming relevance
    divided by the stabilised output ``z + eps * sign(z)`` (sign(0) = +1), taken back through the
    layer's own gradient, and multiplied by each input on its own edge."""

    @staticmethod
    def forward(ctx, fn, epsilon: float, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.fn, ctx.epsilon = fn, epsilon
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):  # type: ignore[override]
        inputs = [a.detach().requires_grad_(True) for a in ctx.saved_tensors]
        with torch.enable_grad():
            z = ctx.fn(*inputs)
            sign = 1.0 - 2.0 * (z < 0).to(z.dtype)
            shares = torch.autograd.grad(z, inputs, relevance / (z + ctx.epsilon * sign))
        return (None, None, *(a.detach() * c for a, c in zip(inputs, shares, strict=True)))


# Gating products (``ops/op_mul.py``). Neither library is the reference here: Captum's DeepLift does
# not special-case products (autograd runs through the mul with each half's own factor, so
# summation-to-delta breaks), and Zennit has no rule for a product. LRP treats the gate as a
# constant and sends all relevance to the signal (Arras et al. 2017/2019): the plain-autograd
# reference is the product with its gate detached. DeepLIFT splits the product's difference exactly,
# delta(s g) = mean(g) delta(s) + mean(s) delta(g) (each factor's multiplier is the other's
# midpoint): the reference is the product with those multipliers.


class MidpointProduct(torch.autograd.Function):
    """``signal * gate`` on a batch of inputs and references (DeepLIFT): each factor's gradient is
    ``grad`` times the other factor's midpoint between input and reference."""

    @staticmethod
    def forward(ctx, signal: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.gate_shape = gate.shape
        gate = as_broadcast(gate, signal)
        ctx.save_for_backward(signal, gate)
        return signal * gate

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        signal, gate = (_midpoints(t) for t in ctx.saved_tensors)
        at_gate = grad * signal
        dims = [d for d in range(1, grad.dim()) if gate.shape[d] == 1 and grad.shape[d] != 1]
        at_gate = at_gate.sum(dim=dims, keepdim=True) if dims else at_gate
        return grad * gate, at_gate.reshape(ctx.gate_shape)


def _midpoints(t: torch.Tensor) -> torch.Tensor:
    """(input + reference) / 2 of a doubled batch, repeated for both halves."""
    half = len(t) // 2
    return ((t[:half] + t[half:]) * 0.5).repeat(2, *([1] * (t.dim() - 1)))


class RelevanceToSignal(torch.autograd.Function):
    """``signal * gate`` for LRP: the relevance reaching the product passes to the signal unchanged
    (relevance form of ``signal * gate.detach()``: ``signal * gate * R / z = R``), the gate gets none."""

    @staticmethod
    def forward(ctx, signal: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return signal * as_broadcast(gate, signal)

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):  # type: ignore[override]
        return relevance, None


def _gate_product(op: Op, inputs: list[torch.Tensor], function) -> torch.Tensor | None:
    """A gating product by ``function`` (signal, gate) if ``op`` is one, else None."""
    if OP_SPECS[op.kind].lrp_role != GATE:
        return None
    signal, gate = signal_and_gate(op, inputs)
    return function.apply(signal, gate)


def _max_pool_first(op: Op, a: torch.Tensor) -> torch.Tensor | None:
    """``op`` on ``a`` by ``MaxPoolFirst`` if it is a max pool (of any kind), else None."""
    window = OP_SPECS[op.kind].max_window(op)
    return None if window is None else MaxPoolFirst.apply(a, *window)


class RescaleActivation(torch.autograd.Function):
    """DeepLIFT's rescale rule at an activation other than ReLU (``module``), on a doubled batch
    as :class:`RescaleRelu`: the gradient times delta-out / delta-in, or the gradient times the
    exact derivative where |delta-in| < 1e-10 (Captum's ``nonlinear``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:  # type: ignore[override]
        y = module(x)
        ctx.module = module
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, y = ctx.saved_tensors
        small, ratio = _rescale(x, y)
        plain = _activation_gradient(ctx.module, x, grad)
        return torch.where(small, plain, grad * ratio), None


def _activation_gradient(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` times the derivative of the element-wise ``module`` at ``x`` (PyTorch's own)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(module(leaf), leaf, grad)
    return g


class _PassActivation(torch.autograd.Function):
    """An activation other than ReLU whose backward passes relevance unchanged (LRP)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:  # type: ignore[override]
        return module(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def _deeplift_substitute(op: Op, module: torch.nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
    if op.kind == RELU:
        return RescaleRelu.apply(inputs[0])
    if (gated := _gate_product(op, inputs, MidpointProduct)) is not None:
        return gated
    if OP_SPECS[op.kind].is_activation:
        if not OP_SPECS[op.kind].monotone:
            raise InvalidArgument(
                f"layer {op.name} ({op.kind}): no DeepLIFT rescale rule for a non-monotone activation"
            )
        return RescaleActivation.apply(inputs[0], module)
    return _max_pool_first(op, inputs[0])  # the plain gradient through each half's own first maximum


def _lrp_substitute(epsilon: float):
    def run(op: Op, module: torch.nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        if op.kind == RELU:  # relevance passes a ReLU unchanged
            return _PassRelu.apply(inputs[0])
        if (gated := _gate_product(op, inputs, RelevanceToSignal)) is not None:
            return gated
        spec = OP_SPECS[op.kind]
        if spec.is_activation:  # and every other activation (ops/activation.py)
            return _PassActivation.apply(inputs[0], module)
        if not spec.is_rule_layer:
            return None  # concatenation, flattening only move relevance: their gradient is the rule
        window = spec.max_window(op)
        fn = module if window is None else (lambda a: MaxPoolFirst.apply(a, *window))
        return EpsilonLayer.apply(fn, epsilon, *inputs)

    return run


class _PassRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def _substitute(method: str):
    def run(op: Op, module: torch.nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        if op.kind == RELU:
            return ReluRule.apply(inputs[0], method)
        return _max_pool_first(op, inputs[0])

    return run


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating-point type ``module`` computes in (its first parameter's; float32 without any)."""
    return next((p.dtype for p in module.parameters()), torch.float32)


def autograd_attribution(
    module: IRModule,
    method: str,
    x: np.ndarray,
    target: np.ndarray | int,
    *,
    baseline: np.ndarray | None = None,
    epsilon: float = 1e-9,
) -> np.ndarray:
    """The attribution of ``method`` for the ``target`` logit (one class index, or one per
    sample) on float32 ``x`` (B, leads, samples), with each rule applied on its op's own edge.

    ``gradient``, ``guided_backprop``, ``deconvolution``: the rule at each ReLU (max pooling to
    the first maximum). ``deeplift``: the rescale rule at each ReLU against ``baseline`` (default
    zeros), max pooling by the plain gradient of each half (the package's ``maxpool_rule
    "gradient"``). ``lrp``: the epsilon rule at every layer with weights or a sum, relevance
    starting at the target logit (as Captum's LRP), passing ReLUs unchanged.

    The arithmetic is the module's own precision: a float64 copy (``reference.as_float64``) gives
    the float64 run the export judges its graphs by (on float64 inputs as given).
    """
    if method not in METHODS:
        raise InvalidArgument(f"no autograd reference for {method!r}; one of {METHODS}")
    if not isinstance(module, IRModule):
        raise TypeError(
            f"autograd_attribution runs on an IRModule (ecgx.training.export.ir_torch.ir_module), "
            f"got {type(module).__name__}"
        )
    module = module.eval()
    dtype = module_dtype(module)
    # A float64 module keeps float64 inputs (the float32-spread estimate moves them by less than a
    # float32 rounding); float32 values convert to float64 exactly.
    x = np.asarray(x, np.float64 if dtype == torch.float64 else np.float32)
    tgt = target_indices(target, len(x))
    rows = torch.arange(len(x))
    if method == "deeplift":
        ref = np.zeros_like(x) if baseline is None else np.asarray(baseline, x.dtype)
        both = torch.tensor(np.concatenate([x, ref]), dtype=dtype, requires_grad=True)
        with torch.enable_grad():
            logits = module.evaluate(both, _deeplift_substitute)
            (grad,) = torch.autograd.grad(logits[rows, tgt].sum(), both)
        return (grad[: len(x)] * (both[: len(x)] - both[len(x) :])).detach().numpy()
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    substitute = _lrp_substitute(epsilon) if method == "lrp" else _substitute(method)
    with torch.enable_grad():
        logits = module.evaluate(xt, substitute)
        # Each sample's logit depends on that sample alone (eval mode), so one backward pass
        # of the summed target logits gives every sample's own gradient.
        start = logits[rows, tgt]
        if method == "lrp":  # the relevance at the output is the target's score itself
            (grad,) = torch.autograd.grad(start, xt, start.detach())
        else:
            (grad,) = torch.autograd.grad(start.sum(), xt)
    return grad.detach().numpy()
