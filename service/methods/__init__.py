"""Every attribution method, selected by its stable name (DESIGN.md, "Attribution methods")."""

from __future__ import annotations

from service.errors import NotFound
from service.methods.base import AttributionMethod
from service.methods.control import RandomAttribution
from service.methods.deeplift import DeepLift, DeepLiftShap
from service.methods.gradient import (
    Deconvolution,
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from service.methods.layer import GradCam, GuidedGradCam
from service.methods.lrp import Lrp
from service.methods.perturbation import FeatureAblation, KernelShap, Lime, Occlusion

_CLASSES: tuple[type[AttributionMethod], ...] = (
    Saliency,
    InputXGradient,
    IntegratedGradients,
    SmoothGrad,
    GradientShap,
    DeepLift,
    DeepLiftShap,
    GuidedBackprop,
    Deconvolution,
    GradCam,
    GuidedGradCam,
    Lrp,
    Occlusion,
    FeatureAblation,
    KernelShap,
    Lime,
    RandomAttribution,
)
METHOD_NAMES: tuple[str, ...] = tuple(c.name for c in _CLASSES)
_BY_NAME = {c.name: c() for c in _CLASSES}


def get_method(name: str) -> AttributionMethod:
    """The method called ``name``; a :class:`~service.errors.NotFound` lists the known names otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise NotFound(f"unknown attribution method {name!r}; known: {', '.join(METHOD_NAMES)}") from None


__all__ = ["METHOD_NAMES", "AttributionMethod", "get_method"]
