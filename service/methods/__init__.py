"""Every attribution method, selected by its stable name.

A method is one class in a family module (``gradient``, ``deeplift``, ...) that ``@register``
lists (:mod:`~ecgx.service.methods.registry`); its graphs, settings and gated settings are class
attributes. This module imports the family modules, so importing it registers every method.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ecgx.core.errors import FailedPrecondition
from ecgx.service.methods.base import AttributionMethod, Param
from ecgx.service.methods.registry import METHODS, register

if TYPE_CHECKING:
    from ecgx.core.package_reader import ModelPackage

# The family modules, in the order their methods are listed (METHOD_NAMES: within a module, the
# order of its classes). Reports, the CLI's choices and tie-breaks follow this order, and
# tests/service/test_method_registry.py pins it: a new method goes at the end of its family.
_FAMILIES = ("gradient", "deeplift", "modified", "layer", "lrp", "perturbation", "control")
for _family in _FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")

METHOD_NAMES: tuple[str, ...] = METHODS.names()
get_method = METHODS.get


def required_graphs(name: str, params: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The package graphs method ``name`` runs (with ``params``, when a setting selects a graph)."""
    return tuple(get_method(name).required_graphs(dict(params or {})))


def methods_needing(graph: str) -> list[str]:
    """Every method that runs ``graph`` (with its defaults, or with a setting that selects it), in
    ``METHOD_NAMES`` order."""
    return [m for m in METHOD_NAMES if graph in get_method(m).graphs + get_method(m).setting_graphs]


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
    "METHOD_NAMES",
    "AttributionMethod",
    "Param",
    "check_available",
    "get_method",
    "methods_needing",
    "register",
    "required_graphs",
    "unavailable_methods",
    "unavailable_reason",
]
