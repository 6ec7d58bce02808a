"""Model-independent reference maps, scored by every gate run beside the real methods.

A check that decides what is served must fail maps that cannot explain the
model. These rows are such maps, each the simplest way to look like an
explanation without being one:

- ``ref:input``: the input's magnitude |x| (what input-multiplied methods fall back to);
- ``ref:edges``: the magnitude of its time derivative |dx/dt| (an edge detector);
- ``ref:class_template``: one fixed map per class, where that class's validation ECGs differ on
  average from all of them (|mean of the class - mean of all|): what a model of the class should
  look at, computed without any model;
- ``ref:constant``: the same value everywhere (no ranking at all);
- ``ref:unseeded_random``: fresh noise on every call (no seed the gate could tie to the model);
- ``ref:other_model``: a real method's map (saliency) computed on another model: the
  first member of the seed family when one is given, else the package with every weight
  redrawn. It is a genuine explanation, of the wrong model.

They go through the same path as any method (``attribute(engine, x, target)``).
Under the default policy each fails at least one blocking check; the gate fails
outright if one passes, since then its checks cannot tell an explanation from a
map that ignores the model (:func:`ecgx.validation.gate.run_gate`). The
perturbation check judges every method against the strongest of
:data:`PERTURBATION_FLOOR` (with the random control), paired on the same ECGs.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import numpy as np

from ecgx.core.package_reader import ModelPackage
from ecgx.service.engine import AttributionEngine
from ecgx.validation.randomisation import Attributor, parameterised_layers, randomised_weights

PREFIX = "ref:"
# The model-independent rows every method's perturbation faithfulness must beat (with the
# random control): the edge detectors and the class template are faithful by construction to
# any model that reads large or steep deflections, so beating only the control proves little.
PERTURBATION_FLOOR = (f"{PREFIX}input", f"{PREFIX}edges", f"{PREFIX}class_template")
# Rows drawn afresh on every call: their maps differ from call to call by design, so a gate run
# never hands one call's map to another (every other row gives the same map for the same model
# and ECGs).
FRESH_DRAWS = (f"{PREFIX}unseeded_random",)
# The weight draw of the redrawn "other model"; the randomisation check's draws count up from 0.
OTHER_MODEL_DRAW = 1_000_003


def is_reference(name: str) -> bool:
    """Whether ``name`` is one of the reference rows (they are never served)."""
    return name.startswith(PREFIX)


def input_magnitude(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.abs(x).astype(np.float32)


def edges(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.abs(np.gradient(np.asarray(x, np.float64), axis=-1)).astype(np.float32)


def constant(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.ones_like(x, dtype=np.float32)


def unseeded_random(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    # Fresh operating-system entropy on purpose: the map is tied to nothing the gate controls.
    return np.random.default_rng().standard_normal(x.shape).astype(np.float32)


def class_templates(x: np.ndarray, target: np.ndarray, n_classes: int) -> np.ndarray:
    """(classes, leads, samples): |mean of the class's ECGs - mean of all ECGs|; a class without
    ECGs gets |mean of all| (the average beat's own shape)."""
    x = np.asarray(x, np.float64)
    overall = x.mean(axis=0)
    out = np.repeat(np.abs(overall)[None], n_classes, axis=0)
    for c in range(n_classes):
        if (target == c).any():
            out[c] = np.abs(x[target == c].mean(axis=0) - overall)
    return out.astype(np.float32)


def class_template(templates: np.ndarray) -> Attributor:
    """Each ECG's map is its target class's template, whatever the model and the ECG."""

    def attribute(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        return templates[np.asarray(target)].copy()

    return attribute


def other_model(
    make_engine: Callable[[], AttributionEngine], memo: bool = False, method: str = "saliency"
) -> Attributor:
    """``method`` (saliency by default) computed on the engine ``make_engine`` builds (once, on
    first use), whatever engine the gate passes in. ``memo``: the map of ECGs and targets seen before is given
    again (a copy) instead of recomputed; the gate asks for the same ECGs on every model."""
    cache: list[AttributionEngine] = []
    maps: dict[str, np.ndarray] = {}
    lock = threading.Lock()

    def attribute(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        key = _inputs_id(x, target) if memo else ""
        with lock:
            if not cache:
                cache.append(make_engine())
            if key in maps:
                return maps[key].copy()
        out = cache[0].attribute(method, x, target)
        if memo:
            with lock:
                maps[key] = out.copy()
        return out

    return attribute


def _inputs_id(x: np.ndarray, target: np.ndarray) -> str:
    h = hashlib.sha256(repr(np.shape(x)).encode())
    h.update(np.ascontiguousarray(x, np.float32).tobytes())
    h.update(np.asarray(target, np.int64).tobytes())
    return h.hexdigest()


def redrawn_weights(package: ModelPackage, seed: int) -> dict[str, np.ndarray]:
    """Every parameter of ``package`` redrawn at its trained scale: another model of the same shape."""
    layers = parameterised_layers(package)
    draws = randomised_weights(package.read_parameters(), layers, seed, OTHER_MODEL_DRAW)
    return {p: v for layer in draws.values() for p, v in layer.items()}


def reference_attributors(
    package: ModelPackage,
    seed: int,
    make_engine: Callable[..., AttributionEngine],
    sibling: ModelPackage | None = None,
    templates: np.ndarray | None = None,
    memo: bool = False,
) -> dict[str, Attributor]:
    """The reference rows. ``make_engine(package=..., overrides=...)`` builds an engine;
    ``sibling`` (a seed-family member) is the other model when given; ``templates`` are
    :func:`class_templates` of the gate's ECGs (None: no template row); ``memo``: the other
    model's maps are computed once per set of ECGs (:func:`other_model`)."""
    if sibling is not None:
        build = lambda: make_engine(package=sibling)  # noqa: E731
    else:
        build = lambda: make_engine(overrides=redrawn_weights(package, seed))  # noqa: E731
    # A partial package (forward pass only) has no gradient: the other model's occlusion map.
    method = "saliency" if "gradient" in package.manifest["graphs"] else "occlusion"
    rows = {
        f"{PREFIX}input": input_magnitude,
        f"{PREFIX}edges": edges,
        f"{PREFIX}class_template": None if templates is None else class_template(templates),
        f"{PREFIX}constant": constant,
        f"{PREFIX}unseeded_random": unseeded_random,
        f"{PREFIX}other_model": other_model(build, memo, method),
    }
    return {name: fn for name, fn in rows.items() if fn is not None}
