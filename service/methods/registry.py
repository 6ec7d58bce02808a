"""The one list of attribution methods: a class joins it with ``@register`` (as Zennit's rules).

Registration checks the class's declaration at import, so a method that cannot work never
loads: a name, a known kind and its graphs must be set, its settings declared once with distinct
names, ``may_differ`` may name only declared settings and known directions, and ``seed`` is a
setting exactly when the method is stochastic.
"""

from __future__ import annotations

import re
from typing import TypeVar

from ecgx.core.errors import NotFound
from ecgx.service.methods.base import DIRECTIONS, AttributionMethod, Param

KINDS = ("gradient", "modified backward", "layer", "perturbation", "control")
_NAME = re.compile(r"[a-z][a-z0-9_]*")

M = TypeVar("M", bound=type[AttributionMethod])


class RegistrationError(TypeError):
    """A method class whose declaration is incomplete or inconsistent (a programming error)."""


class Registry:
    """Method name -> its one (stateless) instance, in registration order."""

    def __init__(self) -> None:
        self._methods: dict[str, AttributionMethod] = {}

    def register(self, cls: M) -> M:
        """Check ``cls``'s declaration and list it under ``cls.name`` (a class decorator)."""
        check_declaration(cls)
        if cls.name in self._methods:
            other = type(self._methods[cls.name])
            raise RegistrationError(
                f"method name {cls.name!r} of {cls.__qualname__} is already registered by "
                f"{other.__module__}.{other.__qualname__}"
            )
        self._methods[cls.name] = cls()
        return cls

    def names(self) -> tuple[str, ...]:
        return tuple(self._methods)

    def get(self, name: str) -> AttributionMethod:
        """The method called ``name``; :class:`~ecgx.core.errors.NotFound` lists the names otherwise."""
        try:
            return self._methods[name]
        except (KeyError, TypeError):
            raise NotFound(
                f"unknown attribution method {name!r}; known: {', '.join(self._methods)}"
            ) from None


def check_declaration(cls: type) -> None:
    """Refuse (:class:`RegistrationError`, naming the class and what is wrong) a method class
    whose declaration is incomplete or inconsistent."""
    where = getattr(cls, "__qualname__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, AttributionMethod)):
        raise RegistrationError(f"{where} is not an AttributionMethod subclass")
    missing = [a for a in ("name", "kind", "graphs") if not hasattr(cls, a)]
    if missing:
        raise RegistrationError(
            f"method class {where} must set {', '.join(missing)} (class attributes: name, kind, graphs)"
        )
    if not isinstance(cls.name, str) or not _NAME.fullmatch(cls.name):
        raise RegistrationError(f"method class {where}: name must be lower_snake_case, got {cls.name!r}")
    if cls.kind not in KINDS:
        raise RegistrationError(f"method {cls.name!r}: kind must be one of {list(KINDS)}, got {cls.kind!r}")
    for attr in ("graphs", "setting_graphs"):
        value = getattr(cls, attr)
        if not isinstance(value, tuple) or not all(isinstance(g, str) and g for g in value):
            raise RegistrationError(
                f"method {cls.name!r}: {attr} must be a tuple of graph names, got {value!r}"
            )
    if cls.attribute is AttributionMethod.attribute:
        raise RegistrationError(f"method {cls.name!r}: {where} does not implement attribute")
    _check_params(cls)


def _check_params(cls: type[AttributionMethod]) -> None:
    if not isinstance(cls.params, tuple) or not all(isinstance(p, Param) for p in cls.params):
        raise RegistrationError(f"method {cls.name!r}: params must be a tuple of Param")
    names = [p.name for p in cls.params]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RegistrationError(f"method {cls.name!r}: parameter(s) {twice} declared more than once")
    if cls.stochastic != ("seed" in names):
        raise RegistrationError(
            f"method {cls.name!r}: a stochastic method takes a seed setting, and only it does "
            f"(stochastic={cls.stochastic}, settings {names})"
        )
    for setting, how in cls.may_differ.items():
        if setting not in names:
            raise RegistrationError(
                f"method {cls.name!r}: may_differ names {setting!r}, not one of its settings"
            )
        if how not in DIRECTIONS:
            raise RegistrationError(
                f"method {cls.name!r}: may_differ[{setting!r}] must be one of {list(DIRECTIONS)}, got {how!r}"
            )


# The built-in methods (ecgx.service.methods imports every family module, in METHOD_NAMES order).
METHODS = Registry()
register = METHODS.register
