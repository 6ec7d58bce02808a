"""Model randomisation (Adebayo et al. 2018) applied to the package's ONNX initialisers.

Cascading: randomise the parameterised layers one by one from the output layer
towards the input, keeping earlier steps randomised. Independent: randomise one
layer at a time, the rest trained. After each step every method is recomputed
on the same ECGs through the package's own graphs (the engine replaces the
initialisers in memory), and compared with its attributions on the trained model.
A method that explains the model must change; one that only shows the input
will not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.engine import AttributionEngine
from service.package import ModelPackage
from validation.similarity import SIMILARITY_MEASURES

# attribute(engine, x, target) -> (B, 12, 600); lets tests plug in constructed methods.
Attributor = Callable[[AttributionEngine, np.ndarray, np.ndarray], np.ndarray]
EngineFactory = Callable[[Mapping[str, np.ndarray]], AttributionEngine]


@dataclass
class RandomisationCurves:
    """One method's similarity to its trained-model attributions, per randomisation step.

    ``cascading[measure][k]`` is the mean over ECGs after randomising ``layers[: k + 1]``;
    ``independent[measure][k]`` after randomising ``layers[k]`` alone. ``undefined``
    counts comparisons where a map was constant (no ranking): they count as 0.
    ``final_per_ecg`` is each ECG's Spearman |a| with every layer randomised.
    """

    layers: list[str]
    cascading: dict[str, list[float]]
    independent: dict[str, list[float]]
    undefined: int
    final_per_ecg: np.ndarray | None = None

    def final(self, measure: str = "spearman_abs") -> float:
        """Similarity with every layer randomised: what the check's verdict rests on."""
        return self.cascading[measure][-1]


def parameterised_layers(package: ModelPackage) -> list[dict]:
    """Layers that own weights, from the output layer towards the input."""
    return [layer for layer in reversed(package.manifest["layers"]) if layer["parameters"]]


def randomised_weights(
    trained: Mapping[str, np.ndarray], layers: Sequence[dict], seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """Per layer name, fresh Gaussian weights with each tensor's trained standard deviation.

    Keeping the scale keeps activations in range, so a method's change reflects lost
    structure, not exploding or vanishing signals. Layer ``i`` of ``layers`` always gets
    the same draw, so cascading and independent steps randomise a layer identically.
    """
    out = {}
    for i, layer in enumerate(layers):
        rng = np.random.default_rng([seed, i])
        out[layer["name"]] = {
            p: (rng.standard_normal(trained[p].shape) * float(trained[p].std())).astype(np.float32)
            for p in layer["parameters"]
        }
    return out


def randomisation_curves(
    package: ModelPackage,
    make_engine: EngineFactory,
    attribute_all: Callable[[AttributionEngine], Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    seed: int,
    on_step: Callable[[], None] | None = None,
) -> dict[str, RandomisationCurves]:
    """Cascading and independent randomisation curves of every method.

    ``reference[m]`` are method ``m``'s attributions on the trained model;
    ``make_engine(overrides)`` builds an engine on the package with those weights replaced
    and ``attribute_all(engine)`` computes every method on it, for the same ECGs.
    """
    layers = parameterised_layers(package)
    draws = randomised_weights(package.read_parameters(), layers, seed)
    names = [layer["name"] for layer in layers]
    curves = {m: RandomisationCurves(names, _empty(), _empty(), 0) for m in reference}
    for mode in ("cascading", "independent"):
        for k in range(len(layers)):
            chosen = names[: k + 1] if mode == "cascading" else [names[k]]
            overrides = {p: v for n in chosen for p, v in draws[n].items()}
            randomised = attribute_all(make_engine(overrides))
            for m in reference:
                _add_step(curves[m], mode, reference[m], randomised[m])
            if on_step is not None:
                on_step()
    return curves


def n_steps(package: ModelPackage) -> int:
    """How many randomised models :func:`randomisation_curves` builds (for progress bars)."""
    return 2 * len(parameterised_layers(package))


def _empty() -> dict[str, list[float]]:
    return {measure: [] for measure in SIMILARITY_MEASURES}


def _add_step(curves: RandomisationCurves, mode: str, trained: np.ndarray, randomised: np.ndarray) -> None:
    table = curves.cascading if mode == "cascading" else curves.independent
    for measure, fn in SIMILARITY_MEASURES.items():
        values = fn(trained, randomised)
        undefined = ~np.isfinite(values)
        values = np.where(undefined, 0.0, values)
        if measure == "spearman_abs":
            curves.undefined += int(undefined.sum())
            if mode == "cascading":  # the last cascading step randomises every layer
                curves.final_per_ecg = values
        table[measure].append(float(values.mean()))
