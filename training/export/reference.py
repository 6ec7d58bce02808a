"""Reference attributions computed in PyTorch, and where float32 cannot pin them down.

The export checks its ONNX graphs against these before it writes a package, and the
tests compare every engine method with them. They run on the model rebuilt from its IR
(``ecgx.training.export.ir_torch.ir_module``: one module per op, BatchNorm folded as the IR
folds it), whatever form the model arrived in: Captum (``captum_attribution``, with
LRP's epsilon rule attached to every rule layer by ``lrp_model``), GradCAM's layer
activations and gradients, the float64 copy every graph is judged by (``as_float64``), and the
excuses a sample may have (``near_tie_samples``, ``relu_near_ties``,
``ill_conditioned_samples``). The per-edge autograd reference for the gradient family is in
``autograd_reference``. Only the export and tests import this module (it needs
PyTorch and Captum; the engine needs neither).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from captum.attr._utils.lrp_rules import EpsilonRule
from torch import nn

from ecgx.core.errors import InvalidArgument
from ecgx.training.export.ir import ExportError, ModelIR, Op
from ecgx.training.export.ir_torch import IRModule, as_ir_module, target_indices
from ecgx.training.export.ops import OP_SPECS, RELU


class PassRule(EpsilonRule):
    """Relevance passes unchanged (Concat, Flatten: they only move values, so no epsilon division)."""

    def _create_backward_hook_input(self, inputs):
        def _backward_hook_input(grad):
            if self._has_single_input:
                self.relevance_input[grad.device] = grad.data
            else:
                self.relevance_input[grad.device].append(grad.data)
            return grad

        return _backward_hook_input

    def _create_backward_hook_output(self, outputs):
        def _backward_hook_output(grad):
            self.relevance_output[grad.device] = grad.data
            return grad

        return _backward_hook_output


class ActivationPassRule(PassRule):
    """Relevance passes an activation unchanged, as Captum passes ReLU and Tanh (ops/activation.py).

    Captum refuses other activations without a rule, and ``PassRule`` would let the activation's
    own derivative act between its hooks; the output is returned as ``x + (f(x) - x).detach()``, the
    value of f(x) whose gradient with respect to x is the identity."""

    def forward_hook(self, module, inputs, outputs):
        self._handle_input_hooks = []
        self._handle_output_hook = outputs.register_hook(lambda grad: grad)  # Captum removes it after
        x = inputs[0]
        return x + (outputs - x).detach()


def attach_epsilon_rules(module: IRModule, epsilon: float) -> IRModule:
    """(Re)attach Captum's EpsilonRule to every rule layer of ``module`` (conv, linear, affine,
    pools, addition) and a pass-through rule to concatenations and flattens; ReLUs pass relevance
    as Captum's LRP does. Captum's LRP removes the rules after each call, so call this before each."""
    if not isinstance(module, IRModule):
        raise TypeError(
            "LRP rules attach to an IRModule (ecgx.training.export.ir_torch.ir_module(trace_model(model))), "
            f"got {type(module).__name__}"
        )
    for op, layer in module.steps():
        spec = OP_SPECS[op.kind]
        if spec.is_rule_layer:
            layer.rule = EpsilonRule(epsilon)  # one rule object per layer: rules keep per-layer state
        elif spec.moves_values:
            layer.rule = PassRule()
        elif spec.is_activation and op.kind != RELU:
            layer.rule = ActivationPassRule()
    return module


def lrp_model(module: IRModule, epsilon: float) -> IRModule:
    """``module`` (an IRModule, BatchNorm folded as the IR folds it) with the epsilon rules attached,
    ready for ``captum.attr.LRP``."""
    return attach_epsilon_rules(module, epsilon)


def captum_attribution(
    model: nn.Module,
    method: str,
    x: np.ndarray,
    target: np.ndarray | int,
    baseline: np.ndarray | None = None,
    epsilon: float = 1e-9,
) -> np.ndarray:
    """Captum's attribution for the graph-backed methods: gradient, guided_backprop,
    deconvolution, deeplift (against ``baseline``) and lrp (epsilon rule).

    ``model`` is normally an IRModule; LRP needs one (its rules attach to the IR's layers),
    so another module is traced into one for LRP.
    """
    with warnings.catch_warnings():
        # Captum announces its hooks and autograd flags on every call; export logs would drown in them.
        warnings.simplefilter("ignore", UserWarning)
        return _captum(model.eval(), method, x, target, baseline, epsilon)


def _captum(model, method, x, target, baseline, epsilon) -> np.ndarray:
    from captum.attr import LRP, Deconvolution, DeepLift, GuidedBackprop, Saliency

    xt = torch.tensor(x, dtype=torch.float32)
    tgt = target_indices(target, len(x))
    if method == "gradient":
        out = Saliency(model).attribute(xt, target=tgt, abs=False)
    elif method == "guided_backprop":
        out = GuidedBackprop(model).attribute(xt, target=tgt)
    elif method == "deconvolution":
        out = Deconvolution(model).attribute(xt, target=tgt)
    elif method == "deeplift":
        base = torch.zeros_like(xt) if baseline is None else torch.tensor(baseline, dtype=torch.float32)
        out = DeepLift(copy.deepcopy(model)).attribute(xt, baselines=base, target=tgt)
    elif method == "lrp":
        module = as_ir_module(model, tuple(x.shape[1:]))
        out = LRP(lrp_model(module, epsilon)).attribute(xt, target=tgt)
    else:
        raise InvalidArgument(f"no Captum reference for {method!r}")
    return out.detach().numpy()


def layer_activations_and_gradients(
    model: nn.Module, layer: nn.Module, x: np.ndarray, target: np.ndarray | int
) -> tuple[np.ndarray, np.ndarray]:
    """Activations of ``layer`` and the target logit's gradient with respect to them (GradCAM's inputs).

    For an IRModule, ``layer`` is ``model.op_modules[tensor]`` for the IR tensor GradCAM reads.
    """
    from captum._utils.gradient import compute_layer_gradients_and_eval

    from ecgx.training.export.autograd_reference import module_dtype

    xt = torch.tensor(x, dtype=module_dtype(model))  # a float64 copy runs in float64
    grads, acts = compute_layer_gradients_and_eval(
        model.eval(), layer, xt, target_ind=target_indices(target, len(x))
    )
    return acts[0].detach().numpy(), grads[0].detach().numpy()


# --------------------------------------------------------------------------- max-pool ties

NEAR_TIE_REASON = (
    "a max-pool window whose two largest values lie within rel_gap of the layer's largest input "
    "magnitude: float32 rounding in ONNX Runtime and PyTorch may pick different winners, sending the "
    "gradient down another path (windows tied between exact zeros after a ReLU are not counted: "
    "both implementations compute those zeros exactly and route alike)"
)


def _zero_exact_tensors(ir: ModelIR) -> set[str]:
    """Tensors that are non-negative and whose zeros are exact in every float32 implementation:
    a ReLU's output, and what pooling, adding, joining or flattening only such tensors makes
    (a sum of non-negative terms is zero only when each term is)."""
    exact: set[str] = set()
    for op in ir.ops:
        if OP_SPECS[op.kind].zero_exact(all(t in exact for t in op.inputs)):
            exact.add(op.output)
    return exact


def _window_ties(
    windows: torch.Tensor, a: torch.Tensor, rel_gap: float, zero_exact: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: (has a near tie that can change the path, has a near tie only between exact zeros)."""
    if windows.shape[-1] < 2:
        none = torch.zeros(len(a), dtype=torch.bool)
        return none, none
    top2 = windows.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).flatten(1)
    scale = a.abs().flatten(1).max(dim=1).values.clamp_min(1e-30)
    near = gap < rel_gap * scale[:, None]
    if not zero_exact:
        return near.any(dim=1), torch.zeros(len(a), dtype=torch.bool)
    # The top value is never negative here: a tie at the top is either between exact zeros
    # (the same in every implementation, and after a ReLU it carries no gradient) or above zero.
    active = (top2[..., 0] > 0).flatten(1)
    return (near & active).any(dim=1), (near & ~active).any(dim=1)


def _tie_scan(
    model: nn.Module, x: np.ndarray, rel_gap: float
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(flags per sample, flags per sample for each max-pool layer, samples with zero ties only)."""
    from ecgx.training.export.autograd_reference import pool_windows

    try:
        module = as_ir_module(model, tuple(x.shape[1:]))
    except ExportError:
        return _tie_scan_hooks(model, x, rel_gap)
    zero_exact = _zero_exact_tensors(module.ir)
    per_layer: dict[str, np.ndarray] = {}
    ignored = np.zeros(len(x), dtype=bool)

    def scan(op: Op, layer: nn.Module, inputs: list[torch.Tensor]) -> None:
        nonlocal ignored
        a = inputs[0]
        window = OP_SPECS[op.kind].max_window(op)
        if window is None:
            return None
        windows = pool_windows(a, *window)
        tie, zero_tie = _window_ties(windows, a, rel_gap, op.inputs[0] in zero_exact)
        per_layer[op.name] = tie.numpy()
        ignored |= zero_tie.numpy()
        return None

    with torch.no_grad():
        module.eval().evaluate(torch.tensor(x, dtype=torch.float32), scan)
    flags = np.zeros(len(x), dtype=bool)
    for tie in per_layer.values():
        flags |= tie
    return flags, per_layer, ignored & ~flags


def _tie_scan_hooks(model: nn.Module, x: np.ndarray, rel_gap: float):
    """For a module the IR cannot describe (a bare pooling stack in a test): hook its max pools;
    a tie is counted when its top value is positive."""
    from ecgx.training.export.autograd_reference import pool_windows

    per_layer: dict[str, np.ndarray] = {}
    ignored = np.zeros(len(x), dtype=bool)

    def hook(name):
        def run(module, inputs, output):
            nonlocal ignored
            a = inputs[0].detach()
            if isinstance(module, nn.MaxPool1d):
                k, s, p = (
                    v if isinstance(v, int) else v[0]
                    for v in (module.kernel_size, module.stride, module.padding)
                )
                windows = pool_windows(a, k, s, p, module.ceil_mode)
            else:
                windows = a.unsqueeze(-2)
            tie, zero_tie = _window_ties(windows, a, rel_gap, True)
            per_layer[name] = tie.numpy()
            ignored |= zero_tie.numpy()

        return run

    pools = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.MaxPool1d, nn.AdaptiveMaxPool1d))]
    handles = [m.register_forward_hook(hook(n)) for n, m in pools]
    try:
        with torch.no_grad():
            model.eval()(torch.tensor(x, dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
    flags = np.zeros(len(x), dtype=bool)
    for tie in per_layer.values():
        flags |= tie
    return flags, per_layer, ignored & ~flags


def near_tie_samples(model: nn.Module, x: np.ndarray, rel_gap: float = 1e-6) -> np.ndarray:
    """Samples whose forward pass comes within float rounding of a max-pool tie that matters.

    Two float32 implementations (ONNX Runtime, PyTorch) differ by about 1e-7 to 1e-6
    of a layer's largest magnitude, enough to swap the winner of a max-pool window
    whose two largest values are that close. The gradient then takes another path
    through the whole receptive field below, so such a sample cannot be compared
    element by element. Every max pool is scanned (overlapping, padded, ceil_mode and
    global ones) over its windows with -inf padding. Only ties that can change the
    path count: two exact zeros after a ReLU are zero in both implementations and tie
    alike. (A ReLU input that close to 0 flips one unit, which moves few elements: that
    is what the 0.1 % outlier allowance is for.) ``model`` is an IRModule, or a module
    traced into one. Returns one bool per sample (True: near a tie).
    """
    return _tie_scan(model, x, rel_gap)[0]


def near_tie_report(model: nn.Module, x: np.ndarray, rel_gap: float = 1e-6) -> dict:
    """For the manifest: how many samples ``near_tie_samples`` excuses, where, and why.

    ``flagged``: samples near a tie; ``per_layer``: for each max-pool layer (by its name in
    the model), the samples with a near tie there; ``zero_ties_not_counted``: samples whose only
    near ties were between exact zeros after a ReLU (not excused: they cannot change the path).
    """
    return near_ties(model, x, rel_gap)[1]


def near_ties(model: nn.Module, x: np.ndarray, rel_gap: float = 1e-6) -> tuple[np.ndarray, dict]:
    """``near_tie_samples`` and ``near_tie_report`` from one scan of the forward pass."""
    flags, per_layer, ignored = _tie_scan(model, x, rel_gap)
    report = {
        "samples": len(x),
        "flagged": int(flags.sum()),
        "rel_gap": float(rel_gap),
        "per_layer": {name: int(tie.sum()) for name, tie in per_layer.items()},
        "zero_ties_not_counted": int(ignored.sum()),
        "reason": NEAR_TIE_REASON,
    }
    return flags, report


# --------------------------------------------------------------------------- LRP conditioning

FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def ill_conditioned_samples(model: nn.Module, x: np.ndarray, epsilon: float, tol: float) -> np.ndarray:
    """Samples whose LRP-epsilon map is not determined to ``tol`` by float32 arithmetic.

    LRP-epsilon divides each layer's relevance by its stabilised output ``z + eps*sign(z)``.
    After a ReLU a unit's relevance multiplier is ``z / (z + eps)``, whose derivative is
    ``eps / (|z| + eps)**2``: once ``|z|`` is within a few ``eps`` of zero, the rounding
    error of ``z`` itself (about one float32 rounding of the sum's scale,
    ``u * sum|w*a|``) moves the multiplier by more than ``tol``. Two correct float32
    implementations (ONNX Runtime, PyTorch) then legitimately disagree on that unit's
    receptive field. The forward pass here runs in float64 on the IRModule (BatchNorm
    folded: the function LRP is applied to) and flags a sample when any convolution
    (grouped included), dense layer, channel affine, addition or average pooling has a
    unit with ``eps * delta / (|z| + eps)**2 > tol``, ``delta = u * sum|w*a|``, and
    ``z > -delta`` (a unit that float32 may see active; units read by another activation carry
    relevance whatever their sign, and behind a sigmoid, whose relevance does not shrink with ``z``,
    the error is ``delta / (|z| + eps)``). Max pooling picks a value without
    arithmetic, and concatenation and flattening pass relevance exactly: nothing to flag.
    ``model`` is an IRModule, or a module traced into one. Returns one bool per sample
    (True: ill-conditioned).
    """
    module = copy.deepcopy(as_ir_module(model, tuple(x.shape[1:]))).double().eval()
    worst = torch.zeros(len(x), dtype=torch.float64)

    def check(op: Op, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        scale = _magnitude(op, layer, inputs)
        if scale is None:
            return None
        z = layer(*inputs)
        delta = FLOAT32_UNIT_ROUNDOFF * scale
        # With epsilon = 0 the multiplier is z / z: only a unit rounding can switch on or off is sensitive.
        error = epsilon * delta / (z.abs() + epsilon) ** 2 if epsilon > 0 else (z.abs() < delta).to(z.dtype)
        passing = [OP_SPECS[c.kind] for c in module.ir.consumers(op.output)]
        passing = [s for s in passing if s.is_activation and s.kind != RELU]
        if not passing:
            error = torch.where(z > -delta, error, torch.zeros_like(error))
        elif not all(s.zero_at_zero for s in passing):
            # Behind an activation with f(0) != 0 (a sigmoid) the relevance reaching a unit does not
            # shrink with z, so the division by z + eps itself is what rounding moves.
            error = torch.maximum(error, delta / (z.abs() + epsilon))
        worst[:] = torch.maximum(worst, error.flatten(1).max(dim=1).values)
        return z

    with torch.no_grad():
        module.evaluate(torch.tensor(x, dtype=torch.float64), check)
    return (worst > tol).numpy()


def _magnitude(op: Op, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor | None:
    """``sum |w * a|`` (+ |bias|) for each output unit of a layer whose output LRP divides by."""
    return OP_SPECS[op.kind].magnitude(layer, inputs)


# --------------------------------------------------------------------------- ReLU near-ties

RELU_TIE_FACTOR = 8.0

NEAR_RELU_TIE_REASON = (
    "a ReLU input within float32 rounding of zero: its float64 value is smaller than "
    f"{RELU_TIE_FACTOR:g} times what float32 arithmetic moves that layer's values by on this sample "
    "(measured: the largest gap between the rebuilt model's float32 and float64 runs there, and at "
    "least one rounding of the layer's largest value), so a correct float32 implementation may see "
    "it on the other side of zero, switching that unit's gradient on or off (inputs that are exactly "
    "zero in both runs are not counted: every implementation computes them alike)"
)


def as_float64(module: IRModule) -> IRModule:
    """A float64 copy of ``module``: the same computation (its float32 parameters, BatchNorm folded)
    in float64 arithmetic, the yardstick both the engine and PyTorch's float32 are measured by."""
    return copy.deepcopy(module).double().eval()


def _relu_inputs(module: IRModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every ReLU op's input on ``x`` (by op name), and every other op's whose derivative jumps at 0
    (LeakyReLU, ELU with alpha != 1: ``OpKind.kinked_at_zero``)."""
    seen: dict[str, torch.Tensor] = {}

    def record(op: Op, layer: nn.Module, inputs: list[torch.Tensor]) -> None:
        if OP_SPECS[op.kind].kinked_at_zero(op):
            seen[op.name] = inputs[0]
        return None

    with torch.no_grad():
        module.evaluate(x, record)
    return seen


def relu_near_ties(
    model: nn.Module, x: np.ndarray, factor: float = RELU_TIE_FACTOR, module64: IRModule | None = None
) -> tuple[np.ndarray, dict]:
    """Samples with a ReLU input that float32 arithmetic cannot place on one side of zero, and the
    manifest's report of them (``samples``, ``flagged``, ``factor``, ``per_layer``, ``reason``).

    The float32 spread is measured, not assumed: the rebuilt model runs in float32 and in float64
    on the same input, and a layer's spread on a sample is the largest gap between the two over its
    units (at least one float32 rounding of its largest value: ``2**-24 * max|z|``). A unit whose
    float64 value lies within ``factor`` times that spread of zero may flip in any correct float32
    implementation (ONNX Runtime, PyTorch): the gradient below it then differs on its receptive
    field, which is what this excuses, and only this. ``model`` is an IRModule or a module traced
    into one; ``module64`` its float64 copy when the caller has one.
    """
    module = as_ir_module(model, tuple(x.shape[1:])).eval()
    module64 = module64 if module64 is not None else as_float64(module)
    z32 = _relu_inputs(module, torch.tensor(x, dtype=torch.float32))
    z64 = _relu_inputs(module64, torch.tensor(x, dtype=torch.float64))
    flags = np.zeros(len(x), dtype=bool)
    per_layer: dict[str, int] = {}
    for name, exact in z64.items():
        approx = z32[name].double()
        gap = (approx - exact).abs().flatten(1).max(dim=1).values
        floor = FLOAT32_UNIT_ROUNDOFF * exact.abs().flatten(1).max(dim=1).values
        spread = torch.maximum(gap, floor).view(-1, *([1] * (exact.dim() - 1)))
        both_zero = (exact == 0) & (approx == 0)
        near = ((exact.abs() < factor * spread) & ~both_zero).flatten(1).any(dim=1).numpy()
        per_layer[name] = int(near.sum())
        flags |= near
    report = {
        "samples": len(x),
        "flagged": int(flags.sum()),
        "factor": float(factor),
        "per_layer": per_layer,
        "reason": NEAR_RELU_TIE_REASON,
    }
    return flags, report
