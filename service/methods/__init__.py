"""Every attribution method, selected by its stable name (DESIGN.md, "Attribution methods")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ecgx.core.errors import FailedPrecondition, NotFound
from ecgx.service.methods.base import AttributionMethod
from ecgx.service.methods.control import RandomAttribution
from ecgx.service.methods.deeplift import DeepLift, DeepLiftShap
from ecgx.service.methods.gradient import (
    Deconvolution,
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from ecgx.service.methods.layer import GradCam, GuidedGradCam
from ecgx.service.methods.lrp import Lrp
from ecgx.service.methods.perturbation import FeatureAblation, KernelShap, Lime, Occlusion

if TYPE_CHECKING:
    from ecgx.core.package_reader import ModelPackage

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
    """The method called ``name``; a :class:`~ecgx.core.errors.NotFound` lists the names otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise NotFound(f"unknown attribution method {name!r}; known: {', '.join(METHOD_NAMES)}") from None


# The package graphs each method runs. A package may lack a graph (the export could not build or
# check it for that model: its manifest's ``unavailable`` says why); every method that needs it is
# then unavailable for that package, and the engine and the gate refuse it. A method class may
# refine this per call with a ``required_graphs(params)`` method (a setting that selects a graph).
METHOD_GRAPHS: dict[str, tuple[str, ...]] = {
    "saliency": ("gradient",),
    "input_x_gradient": ("gradient",),
    "integrated_gradients": ("gradient",),
    "smoothgrad": ("gradient",),
    "gradient_shap": ("gradient",),
    "deeplift": ("deeplift",),
    "deeplift_shap": ("deeplift",),
    "guided_backprop": ("guided_backprop",),
    "deconvolution": ("deconvolution",),
    "gradcam": ("gradcam",),
    "guided_gradcam": ("gradcam", "guided_backprop"),
    "lrp": ("lrp",),
    "occlusion": ("forward",),
    "feature_ablation": ("forward",),
    "kernel_shap": ("forward",),
    "lime": ("forward",),
    "random": (),
}
if set(METHOD_GRAPHS) != set(METHOD_NAMES):  # a new method must say which graphs it runs
    raise RuntimeError(f"METHOD_GRAPHS and METHOD_NAMES differ: {set(METHOD_GRAPHS) ^ set(METHOD_NAMES)}")


def required_graphs(name: str, params: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The package graphs method ``name`` runs (with ``params``, when a setting selects a graph)."""
    impl = get_method(name)
    refine = getattr(impl, "required_graphs", None)
    if callable(refine):
        return tuple(refine(dict(params or {})))
    return METHOD_GRAPHS[name]


# Graphs a method runs only with some settings (not with its defaults), by name prefix: the LRP
# composite graphs (``lrp_epsilon_plus``, ...) serve lrp's composite setting.
SETTING_GRAPH_PREFIXES: dict[str, str] = {"lrp_": "lrp"}


def methods_needing(graph: str) -> list[str]:
    """Every method that runs ``graph`` (with its defaults, or with a setting that selects it), in
    ``METHOD_NAMES`` order."""
    by_setting = {m for prefix, m in SETTING_GRAPH_PREFIXES.items() if graph.startswith(prefix)}
    return [m for m in METHOD_NAMES if graph in METHOD_GRAPHS[m] or m in by_setting]


def unavailable_reason(
    package: ModelPackage, name: str, params: Mapping[str, Any] | None = None
) -> str | None:
    """Why method ``name`` cannot run on ``package`` (a graph it needs is not in the package, with
    the export's reason), or None when it can."""
    missing = [g for g in required_graphs(name, params) if g not in package.manifest["graphs"]]
    if not missing:
        return None
    why = "; ".join(f"graph {g!r} {package.graph_unavailable_reason(g)}" for g in missing)
    return f"method {name!r} is unavailable for the model package {package.path}: {why}"


def unavailable_methods(package: ModelPackage) -> dict[str, str]:
    """Method -> why it is unavailable for ``package`` (default settings), for every such method."""
    found = {m: unavailable_reason(package, m) for m in METHOD_NAMES}
    return {m: why for m, why in found.items() if why is not None}


def check_available(package: ModelPackage, name: str, params: Mapping[str, Any] | None = None) -> None:
    """Refuse (:class:`~ecgx.core.errors.FailedPrecondition`, naming the reason) a method the package
    cannot run; the engine calls this before any model pass."""
    why = unavailable_reason(package, name, params)
    if why is not None:
        raise FailedPrecondition(why)


__all__ = [
    "METHOD_GRAPHS",
    "METHOD_NAMES",
    "AttributionMethod",
    "check_available",
    "get_method",
    "methods_needing",
    "required_graphs",
    "unavailable_methods",
    "unavailable_reason",
]
