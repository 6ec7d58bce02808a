"""Model-independent reference maps, scored by every gate run beside the real methods.

A check that decides what is served must fail maps that cannot explain the
model. These rows are such maps, each the simplest way to look like an
explanation without being one:

- ``ref:input``: the input's magnitude |x| (what input-multiplied methods fall back to);
- ``ref:edges``: the magnitude of its time derivative |dx/dt| (an edge detector);
- ``ref:constant``: the same value everywhere (no ranking at all);
- ``ref:unseeded_random``: fresh noise on every call (no seed the gate could tie to the model);
- ``ref:other_model``: a real method's map (saliency) computed on another model: the
  first member of the seed family when one is given, else the package with every weight
  redrawn. It is a genuine explanation, of the wrong model.

They go through the same path as any method (``attribute(engine, x, target)``).
Under the default policy each fails at least one blocking check; the gate fails
outright if one passes, since then its checks cannot tell an explanation from a
map that ignores the model (:func:`ecgx.validation.gate.run_gate`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ecgx.service.engine import AttributionEngine
from ecgx.service.package import ModelPackage
from ecgx.validation.randomisation import Attributor, parameterised_layers, randomised_weights

PREFIX = "ref:"
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


def other_model(make_engine: Callable[[], AttributionEngine]) -> Attributor:
    """Saliency computed on the engine ``make_engine`` builds (once, on first use), whatever
    engine the gate passes in."""
    cache: list[AttributionEngine] = []

    def attribute(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        if not cache:
            cache.append(make_engine())
        return cache[0].attribute("saliency", x, target)

    return attribute


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
) -> dict[str, Attributor]:
    """The reference rows. ``make_engine(package=..., overrides=...)`` builds an engine;
    ``sibling`` (a seed-family member) is the other model when given."""
    if sibling is not None:
        build = lambda: make_engine(package=sibling)  # noqa: E731
    else:
        build = lambda: make_engine(overrides=redrawn_weights(package, seed))  # noqa: E731
    return {
        f"{PREFIX}input": input_magnitude,
        f"{PREFIX}edges": edges,
        f"{PREFIX}constant": constant,
        f"{PREFIX}unseeded_random": unseeded_random,
        f"{PREFIX}other_model": other_model(build),
    }
