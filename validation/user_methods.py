"""Gate your own attribution method: load it by ``module:function`` and check what it returns.

A user-supplied method has the engine's call shape::

    def my_method(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray

``x`` is a (B, 12, 600) float32 batch of median beats in millivolts, ``target`` the (B,)
class index each ECG is explained for; the result is one (B, 12, 600) attribution map per
ECG. ``engine`` computes forward passes and every built-in method on the gated package
(``engine.attribute("saliency", x, target)``, ``engine.predict(x)``), and for the
randomisation check it is the engine of the randomised package, so a method that uses it
is judged on the model it explains.

``ecgx validate --method NAME=module:function`` (or ``NAME=path/to/file.py:function``) and
``run_gate(attributors={NAME: fn})`` gate such methods with every check; the service serves
only its built-in methods, so a user method's verdict is for information (the report marks it
``user_supplied`` and never lists it under ``serve``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ecgx.service.methods import METHOD_NAMES
from ecgx.validation.policy import CONTROL_METHOD
from ecgx.validation.randomisation import Attributor

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_SHAPE = "fn(engine, x, target) -> np.ndarray"


class MethodError(ValueError):
    """A user-supplied method cannot be loaded, has the wrong signature, or returned a bad map."""


def parse_method_option(text: str) -> tuple[str, str]:
    """``NAME=module:function`` (the ``--method`` option) as (name, spec); the name must not be a
    built-in method's (the service would serve its own method under that name)."""
    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise MethodError(
            f"--method {text!r}: expected NAME=module:function (or NAME=path/to/file.py:function)"
        )
    if not _NAME.fullmatch(name):
        raise MethodError(
            f"--method {text!r}: the name {name!r} must start with a letter and hold only letters, digits, "
            "'_', '.' and '-'"
        )
    if name in METHOD_NAMES or name == CONTROL_METHOD:
        raise MethodError(
            f"--method {text!r}: {name!r} is a built-in method's name; give your method another name "
            "(the service serves its built-in method under this one)"
        )
    return name, spec


def load_method(spec: str, name: str | None = None) -> Attributor:
    """The function named by ``spec`` (``module:function`` or ``path/to/file.py:function``), checked
    now for what can be checked without running it (importable, an attribute, callable, a
    signature that accepts ``(engine, x, target)``), and wrapped so that each call's result is
    checked too (:func:`checked_attributor`). Raises :class:`MethodError` saying which step failed."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise MethodError(f"method {spec!r}: expected module:function or path/to/file.py:function")
    module = _import(module_part, spec)
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise MethodError(
                f"method {spec!r}: module {module_part!r} has no attribute {attr!r}"
                + (f" (its callables: {', '.join(public[:10])})" if public else "")
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise MethodError(
            f"method {spec!r}: {attr!r} is a {type(fn).__name__}, not a function; expected {_SHAPE}"
        )
    _check_signature(fn, spec)
    return checked_attributor(name or attr, fn, spec)


def _import(module_part: str, spec: str) -> Any:
    path = Path(module_part)
    if module_part.endswith(".py") or "/" in module_part:
        if not path.is_file():
            raise MethodError(f"method {spec!r}: file {module_part} does not exist")
        module_name = f"ecgx_user_method_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise MethodError(f"method {spec!r}: {module_part} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            raise MethodError(
                f"method {spec!r}: importing {module_part} failed: {type(e).__name__}: {e}"
            ) from None
        return module
    try:
        return importlib.import_module(module_part)
    except ImportError as e:
        raise MethodError(
            f"method {spec!r}: module {module_part!r} cannot be imported ({e}); check the name and that "
            "it is on PYTHONPATH, or give a file: path/to/file.py:function"
        ) from None
    except Exception as e:
        raise MethodError(
            f"method {spec!r}: importing {module_part!r} failed: {type(e).__name__}: {e}"
        ) from None


def _check_signature(fn: Callable[..., Any], spec: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without an introspectable signature: its first call will tell
    try:
        signature.bind(object(), object(), object())
    except TypeError:
        raise MethodError(
            f"method {spec!r}: its signature is {signature}, which cannot be called as {_SHAPE}"
        ) from None


def checked_attributor(name: str, fn: Callable[..., Any], spec: str | None = None) -> Attributor:
    """``fn`` with its every result checked: an array of the input's shape, real numbers, finite.

    A bad result raises :class:`MethodError`, e.g. ``method mine returned shape (8, 12, 599) for
    input (8, 12, 600)``. The result is returned as float32."""

    def attribute(engine: Any, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        out = fn(engine, x, target)
        try:
            arr = np.asarray(out)
        except Exception:
            arr = None
        if arr is None or arr.dtype == object:
            raise MethodError(
                f"method {name} returned a {type(out).__name__}, not an array; expected {_SHAPE}"
            )
        if arr.shape != x.shape:
            raise MethodError(
                f"method {name} returned shape {arr.shape} for input {x.shape}; it must be the input's"
            )
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise MethodError(f"method {name} returned dtype {arr.dtype}; attributions must be real numbers")
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise MethodError(f"method {name} returned {bad} NaN or infinite value(s) for input {x.shape}")
        return arr.astype(np.float32, copy=False)

    attribute.spec = spec or _where(fn)  # type: ignore[attr-defined]
    attribute.__name__ = name
    return attribute


def _where(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def method_spec(fn: Attributor) -> str:
    """Where a (checked) user method came from, for the report."""
    return str(getattr(fn, "spec", None) or _where(fn))


def mark_user_methods(report: dict[str, Any], user: dict[str, Attributor]) -> None:
    """Mark the user-supplied methods of a gate ``report`` (in place): ``user_supplied`` on each,
    ``user_methods`` (name -> where it came from), never under ``serve``, and a sentence in the
    headline saying that their verdicts are for information."""
    if not user:
        report["user_methods"] = {}
        return
    for name in user:
        report["methods"][name]["user_supplied"] = True
    report["user_methods"] = {name: method_spec(fn) for name, fn in user.items()}
    report["serve"] = [m for m in report["serve"] if m not in user]
    verdicts = ", ".join(f"{m} ({report['methods'][m]['verdict']})" for m in user)
    report["headline"] += (
        f" User-supplied method(s) {verdicts}: gated for information only; the service serves only its "
        "built-in methods, so they are not in serve."
    )
