"""Zennit as the reference for the LRP composites (tests only: Zennit imports torchvision).

Zennit's composites run on the IR-rebuilt module (``ecgx.training.export.ir_torch.ir_module``)
with two additions that Zennit's own ResNet support makes too:

* a canonizer turning each ``Add`` module into a stack and a ``zennit.layer.Sum`` (what
  ``zennit.torchvision.ResNetCanonizer`` does inside torchvision's residual blocks), so the
  composite's ``Sum -> Norm`` rule applies to additions: Zennit's hooks take a module's
  single input, and ``Add`` has two;
* ``ChannelAffine`` (a BatchNorm the IR could not fold) mapped to ``Pass``, Zennit's rule for
  ``BatchNorm`` modules.

Where the input rule is Flat or ZBox, Zennit's ``SpecialFirstLayerMapComposite`` gives it
to the *first* conv or dense module only. The graphs give it to every layer reading the
ECG; on a network whose input feeds several convolutions at once (an inception stem), the
helper therefore maps the first-layer rule by module identity instead (same rules, same
layer map, the "first layer" being each of the input layers).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

STUBS = Path(__file__).resolve().parent / "stubs"
# Zennit imports torchvision, which is not installed (tests/stubs/README.md): put the stand-in
# first on the path, once, and only when no real torchvision exists.
if importlib.util.find_spec("torchvision") is None and str(STUBS) not in sys.path:
    sys.path.insert(0, str(STUBS))

from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import AttributeCanonizer  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.rules import AlphaBeta, Epsilon, Flat, Pass, ZBox, ZPlus  # noqa: E402
from zennit.types import Convolution  # noqa: E402

from ecgx.training.export.ir_torch import ChannelAffine, IRModule  # noqa: E402
from ecgx.training.export.lrp_rules import STABILIZER, input_layers  # noqa: E402
from ecgx.training.models import Add  # noqa: E402


def _stacked_add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return self.canonizer_sum(torch.stack([a, b], dim=-1))


def add_canonizer() -> AttributeCanonizer:
    """Each ``Add`` computes ``Sum(stack([a, b], -1))``, as Zennit's ResNet canonizer rewrites
    torchvision's residual blocks; the ``Sum`` module is registered on the ``Add``."""

    def attributes(name: str, module: torch.nn.Module) -> dict | None:
        if isinstance(module, Add):
            return {"forward": _stacked_add.__get__(module), "canonizer_sum": Sum()}
        return None

    return AttributeCanonizer(attributes)


def _layer_map(composite: str, epsilon: float) -> list:
    """The composite's layer map (as Zennit's EpsilonPlus / EpsilonAlpha2Beta1 build it), plus
    ChannelAffine -> Pass."""
    extra = [(ChannelAffine, Pass())]
    conv = (
        ZPlus(stabilizer=STABILIZER)
        if composite == "epsilon_plus"
        else AlphaBeta(2, 1, stabilizer=STABILIZER)
    )
    return extra + layer_map_base(STABILIZER) + [(Convolution, conv), (torch.nn.Linear, Epsilon(epsilon))]


def zennit_composite(
    module: IRModule, composite: str, epsilon: float, input_rule: str = "default", low=None, high=None
) -> Composite:
    """Zennit's composite for ``composite`` / ``input_rule`` on ``module`` (see the module docstring).

    Zennit's own classes where they exist (EpsilonPlus, EpsilonAlpha2Beta1 and their Flat
    variants, when one layer reads the ECG); otherwise its rules with the first-layer rule
    mapped to each layer that reads the ECG. ``low``/``high``: ZBox bounds broadcastable to the
    input, e.g. (B,) tensors.
    """
    canonizers = [add_canonizer()]
    extra = [(ChannelAffine, Pass())]
    first_names = input_layers(module.ir)
    if input_rule == "default":
        cls = EpsilonPlus if composite == "epsilon_plus" else EpsilonAlpha2Beta1
        return cls(epsilon=epsilon, stabilizer=STABILIZER, layer_map=extra, canonizers=canonizers)
    if input_rule == "flat" and len(first_names) == 1:
        cls = EpsilonPlusFlat if composite == "epsilon_plus" else EpsilonAlpha2Beta1Flat
        return cls(epsilon=epsilon, stabilizer=STABILIZER, layer_map=extra, canonizers=canonizers)
    first_rule = (
        Flat(stabilizer=STABILIZER) if input_rule == "flat" else ZBox(low, high, stabilizer=STABILIZER)
    )
    first_modules = {id(module.op_modules[op.output]) for op in module.ir.ops if op.name in first_names}
    rest = LayerMapComposite(_layer_map(composite, epsilon))

    def mapping(ctx, name, mod):
        return first_rule if id(mod) in first_modules else rest.mapping(ctx, name, mod)

    return Composite(module_map=mapping, canonizers=canonizers)


def zennit_lrp(
    module: IRModule,
    composite: str,
    x: np.ndarray,
    target: np.ndarray,
    *,
    epsilon: float,
    input_rule: str = "default",
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
) -> np.ndarray:
    """Zennit's relevance at the input for output relevance ``one_hot(target) * logits`` (the
    service's lrp convention); ``low``/``high`` (B,) ZBox bounds, default each ECG's min/max."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    flat = xt.reshape(len(xt), -1)
    lo = flat.min(1).values if low is None else torch.as_tensor(low, dtype=torch.float32)
    hi = flat.max(1).values if high is None else torch.as_tensor(high, dtype=torch.float32)
    # (B,) bounds: Zennit appends singleton axes to fit the layer input, (B, C, L) or (B, F)
    comp = zennit_composite(module, composite, epsilon, input_rule, lo, hi)
    with torch.no_grad():
        logits = module(xt)
    seed = torch.nn.functional.one_hot(torch.as_tensor(target), logits.shape[1]).float() * logits
    with Gradient(model=module, composite=comp) as attributor:
        _, relevance = attributor(xt, seed)
    return relevance.detach().numpy()
