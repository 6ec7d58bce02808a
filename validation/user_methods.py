"""Gate your own attribution method: load it by ``module:function`` and check what it returns.

A user-supplied method has the engine's call shape::

    def my_method(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray

``x`` is a (B, 12, 600) float32 batch of median beats in millivolts, ``target`` the (B,)
class index each ECG is explained for; the result is one (B, 12, 600) attribution map per
ECG. During the gate ``engine`` is a narrow :class:`GateEngine` of the model under test:
forward passes (``logits``, ``probabilities``) and the built-in methods
(``engine.attribute("saliency", x, target)``), nothing that names or loads the package. The
model under test is the trained one or a changed copy (randomisation, changed-model
faithfulness), and the gate calls the method on them in an order drawn from the operating
system's entropy, so a method cannot tell the shipped model by when it is called. This is no
sandbox (the method runs in the gate's process); it makes the model in front of the method
the only one it is given.

``ecgx validate --method NAME=module:function`` (or ``NAME=path/to/file.py:function``) and
``run_gate(attributors={NAME: fn})`` gate such methods with every check, for information
only: the report lists them under ``user_methods``, apart from the built-in methods, and they
never count towards ``min_passing``, the headline, ``serve`` or another method's scores.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import random
import re
import sys
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ecgx.core.errors import InvalidArgument
from ecgx.service.methods import METHOD_NAMES
from ecgx.validation.policy import CONTROL_METHOD
from ecgx.validation.randomisation import Attributor

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_SHAPE = "fn(engine, x, target) -> np.ndarray"


class MethodError(InvalidArgument):
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


class GateEngine:
    """What a user method is given during the gate: the model under test's forward pass and
    built-in methods, and nothing that names or loads its package."""

    __slots__ = ("attribute", "logits", "probabilities")

    def __init__(self, engine: Any) -> None:
        # Bound to closures, not to an attribute holding the engine, so the object's own
        # surface is exactly these three calls.
        def attribute(method: str, x: np.ndarray, target: Any = None, **params: Any) -> np.ndarray:
            return engine.attribute(method, x, target, **params)

        self.attribute = attribute
        self.logits = lambda x: engine.logits(x)
        self.probabilities = lambda x: engine.probabilities(x)


# A call the gate makes to the user methods: (key naming the model and inputs, a factory of the
# engine of that model, the ECGs, their targets).
UserCall = tuple[Hashable, Callable[[], Any], np.ndarray, np.ndarray]


def run_user_methods(
    methods: dict[str, Attributor], calls: Iterable[UserCall]
) -> dict[Hashable, dict[str, np.ndarray]]:
    """Every user method on every call, in an order drawn from the operating system's entropy
    (trained and changed models interleaved), each through a :class:`GateEngine`; the maps by
    call key. Each call's engine is built when its turn comes and dropped after."""
    todo = list(calls)
    random.SystemRandom().shuffle(todo)
    out: dict[Hashable, dict[str, np.ndarray]] = {}
    for key, make_engine, x, target in todo:
        engine = GateEngine(make_engine())
        out[key] = {name: fn(engine, x, target) for name, fn in methods.items()}
    return out


def user_report(report: dict[str, Any], user: dict[str, Attributor], rows: dict[str, dict[str, Any]]) -> None:
    """Put the user-supplied methods' rows in a gate ``report`` (in place), apart from the
    built-in methods: ``user_methods`` (name -> where it came from, its verdict, reasons and
    checks), and a sentence in the headline saying that they are for information only."""
    report["user_methods"] = {
        name: {"spec": method_spec(fn), "user_supplied": True, **rows[name]} for name, fn in user.items()
    }
    if user:
        verdicts = ", ".join(f"{m} ({rows[m]['verdict']})" for m in user)
        report["headline"] += (
            f" User-supplied method(s) {verdicts}: gated for information only; they never count "
            "towards this verdict, and the service serves only its built-in methods."
        )
