"""Reference attributions computed by Captum on the PyTorch model.

The export checks its ONNX graphs against these before it writes a package,
and the tests compare every engine method with them. Only the export and
tests import this module (it needs PyTorch and Captum; the engine needs neither).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.export.ir import trace_model
from training.models import Add


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each BatchNorm1d folded into the Conv1d before it.

    The folded model computes the same function. LRP is run on it because the
    package applies LRP's rules to folded convolutions (as Zennit's canonizers do).
    The pairs are the ones the export folds (found by tracing), and each folded
    BatchNorm becomes a Dropout(0), which Captum's LRP passes relevance through.
    """
    model = copy.deepcopy(model).eval()
    for op in trace_model(model).ops:
        bn_path = op.params.get("folded")
        if bn_path:
            _fold_into(model.get_submodule(op.name), model.get_submodule(bn_path))
            parent, _, name = bn_path.rpartition(".")
            setattr(model.get_submodule(parent), name, nn.Dropout(0.0))
    return model


def _fold_into(conv: nn.Conv1d, bn: nn.BatchNorm1d) -> None:
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale[:, None, None])
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


def lrp_model(model: nn.Module, epsilon: float) -> nn.Module:
    """The folded model prepared for Captum's LRP with the epsilon rule on every linear layer."""
    return attach_epsilon_rules(fold_batchnorm(model), epsilon)


def attach_epsilon_rules(model: nn.Module, epsilon: float) -> nn.Module:
    """(Re)attach EpsilonRule to every linear layer; Captum's LRP removes the rules after each call."""
    from captum.attr._utils.lrp_rules import EpsilonRule

    rule_types = (nn.Conv1d, nn.Linear, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, Add)
    for m in model.modules():
        if isinstance(m, rule_types):
            m.rule = EpsilonRule(epsilon)
    return model


def _targets(target: np.ndarray | int, n: int) -> torch.Tensor:
    return torch.as_tensor(np.broadcast_to(np.asarray(target, dtype=np.int64), (n,)).copy())


def captum_attribution(
    model: nn.Module,
    method: str,
    x: np.ndarray,
    target: np.ndarray | int,
    baseline: np.ndarray | None = None,
    epsilon: float = 1e-9,
) -> np.ndarray:
    """Captum's attribution for the graph-backed methods: gradient, guided_backprop,
    deconvolution, deeplift (against ``baseline``) and lrp (epsilon rule)."""
    with warnings.catch_warnings():
        # Captum announces its hooks and autograd flags on every call; export logs would drown in them.
        warnings.simplefilter("ignore", UserWarning)
        return _captum(model.eval(), method, x, target, baseline, epsilon)


def _captum(model, method, x, target, baseline, epsilon) -> np.ndarray:
    from captum.attr import LRP, Deconvolution, DeepLift, GuidedBackprop, Saliency

    xt = torch.tensor(x, dtype=torch.float32)
    tgt = _targets(target, len(x))
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
        out = LRP(lrp_model(model, epsilon)).attribute(xt, target=tgt)
    else:
        raise ValueError(f"no Captum reference for {method!r}")
    return out.detach().numpy()


def layer_activations_and_gradients(
    model: nn.Module, layer: nn.Module, x: np.ndarray, target: np.ndarray | int
) -> tuple[np.ndarray, np.ndarray]:
    """Activations of ``layer`` and the target logit's gradient with respect to them (GradCAM's inputs)."""
    from captum._utils.gradient import compute_layer_gradients_and_eval

    xt = torch.tensor(x, dtype=torch.float32)
    grads, acts = compute_layer_gradients_and_eval(
        model.eval(), layer, xt, target_ind=_targets(target, len(x))
    )
    return acts[0].detach().numpy(), grads[0].detach().numpy()


def near_tie_samples(model: nn.Module, x: np.ndarray, rel_gap: float = 1e-6) -> np.ndarray:
    """Samples whose forward pass comes within float rounding of a max-pool tie.

    Two float32 implementations (ONNX Runtime, PyTorch) differ by about 1e-7 to 1e-6
    of a layer's largest magnitude, enough to swap the winner of a max-pool window
    whose two largest values are that close. The gradient then takes another path
    through the whole receptive field below, so such a sample cannot be compared
    element by element. (A ReLU input that close to 0 flips one unit, which moves
    few elements: that is what the 0.1 % outlier allowance is for.)
    Returns one bool per sample (True: near a tie).
    """
    flags = np.zeros(len(x), dtype=bool)

    def pool_hook(module, inputs, output):
        a = inputs[0].detach()
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        if k < 2:
            return
        n = a.shape[-1] // k
        top2 = a[..., : n * k].reshape(*a.shape[:-1], n, k).topk(2, dim=-1).values
        gap = (top2[..., 0] - top2[..., 1]).flatten(1)
        scale = a.abs().flatten(1).max(dim=1).values.clamp_min(1e-30)
        # Exact (0, 0) windows after a ReLU tie in both implementations alike and carry no gradient.
        active = (top2[..., 0] > 0).flatten(1)
        flags[:] |= ((gap < rel_gap * scale[:, None]) & active).any(dim=1).numpy()

    handles = [m.register_forward_hook(pool_hook) for m in model.modules() if isinstance(m, nn.MaxPool1d)]
    try:
        with torch.no_grad():
            model.eval()(torch.tensor(x, dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
    return flags


FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def ill_conditioned_samples(model: nn.Module, x: np.ndarray, epsilon: float, tol: float) -> np.ndarray:
    """Samples whose LRP-epsilon map is not determined to ``tol`` by float32 arithmetic.

    LRP-epsilon divides each layer's relevance by its stabilised output ``z + eps*sign(z)``.
    After a ReLU a unit's relevance multiplier is ``z / (z + eps)``, whose derivative is
    ``eps / (|z| + eps)**2``: once ``|z|`` is within a few ``eps`` of zero, the rounding
    error of ``z`` itself (about one float32 rounding of the sum's scale,
    ``u * sum|w*a|``) moves the multiplier by more than ``tol``. Two correct float32
    implementations (ONNX Runtime, PyTorch) then legitimately disagree on that unit's
    receptive field. The forward pass here runs in float64 on the BatchNorm-folded
    model (the function LRP is applied to) and flags a sample when any convolution,
    dense layer or addition has a unit with ``eps * delta / (|z| + eps)**2 > tol``,
    ``delta = u * sum|w*a|``, and ``z > -delta`` (a unit that float32 may see active).
    Pooling layers are exempt: they add or pick non-negative values, without cancellation.
    Returns one bool per sample (True: ill-conditioned).
    """
    folded = fold_batchnorm(model).double()
    worst = torch.zeros(len(x), dtype=torch.float64)

    def hook(module, inputs, z):
        if isinstance(module, Add):
            scale = inputs[0].abs() + inputs[1].abs()
        else:
            a, w = inputs[0].abs(), module.weight.abs()
            bias = None if module.bias is None else module.bias.abs()
            if isinstance(module, nn.Conv1d):
                scale = F.conv1d(a, w, bias, module.stride, module.padding, module.dilation, module.groups)
            else:
                scale = F.linear(a, w, bias)
        delta = FLOAT32_UNIT_ROUNDOFF * scale
        # With epsilon = 0 the multiplier is z / z: only a unit rounding can switch on or off is sensitive.
        error = epsilon * delta / (z.abs() + epsilon) ** 2 if epsilon > 0 else (z.abs() < delta).to(z.dtype)
        error = torch.where(z > -delta, error, torch.zeros_like(error))
        worst[:] = torch.maximum(worst, error.flatten(1).max(dim=1).values)

    layers = [m for m in folded.modules() if isinstance(m, (nn.Conv1d, nn.Linear, Add))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            folded(torch.tensor(x, dtype=torch.float64))
    finally:
        for h in handles:
            h.remove()
    return (worst > tol).numpy()
