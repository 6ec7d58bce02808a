"""Model randomisation (Adebayo et al. 2018) applied to the package's ONNX initialisers.

Cascading: randomise the parameterised layers one by one from the output layer
towards the input, keeping earlier steps randomised. Independent: randomise one
layer at a time, the rest trained. After each step every method is recomputed
on the same ECGs through the package's own graphs (the engine replaces the
initialisers in memory), and compared with its attributions on the trained model.
A method that explains the model must change; one that only shows the input
will not.

Each comparison is made at two resolutions: Spearman of |a| per sample, and
Spearman of the segment relevance perturbation ranks (signed sums over a window
of the 8 independent leads, :func:`ecgx.validation.perturbation.segment_relevance`).
A map can look changed per sample yet keep every segment's relevance, which is
what perturbation sees; the check takes the more similar of the two. Every
value is kept per weight draw and ECG, so the verdict's interval resamples both
and one lucky draw does not decide. The method's own noise
floor, its similarity to itself on the same ECG with a little of the ECG's own
high-frequency noise added (and other random draws for stochastic methods), is
what a drop must be measured against: a map that is noise to begin with
(Hedström et al. 2023, smooth MPRT) cannot show that it lost anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

from ecgx.core.ecg_noise import high_frequency_noise
from ecgx.core.package_reader import ModelPackage
from ecgx.core.similarity import SIMILARITY_MEASURES, pearson_rows, spearman_rows
from ecgx.service.engine import AttributionEngine
from ecgx.validation.perturbation import LeadBasis, segment_relevance

# attribute(engine, x, target) -> (B, 12, 600); lets tests plug in constructed methods.
Attributor = Callable[[AttributionEngine, np.ndarray, np.ndarray], np.ndarray]
EngineFactory = Callable[[Mapping[str, np.ndarray]], AttributionEngine]
# attribute_all(engine, x, key, same_model): every method's maps on the model ``key`` names;
# ``same_model`` holds maps already computed on a model with exactly these weights (None if
# there is none), which the caller may hand back instead of recomputing them.
StepAttributor = Callable[
    [AttributionEngine, np.ndarray, "ModelKey", Mapping[str, np.ndarray] | None], Mapping[str, np.ndarray]
]
# Which model a set of maps was computed on: ("noisy",) for the trained model on noisy inputs,
# (mode, draw, step) for a randomised one (see randomisation_models).
ModelKey = tuple

RESOLUTIONS = ("sample", "segment")


@dataclass
class RandomisationCurves:
    """One method's similarity to its trained-model attributions under randomisation.

    ``cascading[measure][k]`` (for plots) is the mean over ECGs and draws, per sample,
    after randomising ``layers[: k + 1]``; ``independent[measure][k]`` after randomising
    ``layers[k]`` alone. The per-ECG arrays the verdict rests on hold the Spearman |a|
    at each resolution: ``per_ecg_cascading[draw, step, resolution, ecg]`` (and
    ``per_ecg_independent`` likewise), ``noise_floor[resolution, ecg]``. NaN marks an
    undefined comparison (a constant map has no ranking); ``constant_maps`` counts why.
    """

    layers: list[str]
    cascading: dict[str, list[float]]
    independent: dict[str, list[float]]
    per_ecg_cascading: np.ndarray
    per_ecg_independent: np.ndarray
    noise_floor: np.ndarray
    constant_maps: dict[str, int] = field(default_factory=dict)

    def worst(self, mode: str, step: int | slice) -> np.ndarray:
        """(draws, ECGs): the higher of the two resolutions' similarity at cascading or
        independent ``step`` (a slice averages the steps first: the curve's area)."""
        table = self.per_ecg_cascading if mode == "cascading" else self.per_ecg_independent
        chosen = table[:, step]
        if chosen.ndim == 4:  # (draws, steps, resolutions, ecgs)
            chosen = chosen.mean(axis=1)
        return chosen.max(axis=1)

    def gap_to_noise_floor(self) -> np.ndarray:
        """(draws, ECGs): how far the fully randomised similarity falls below the method's own
        noise floor, at the resolution where it falls least."""
        final = self.per_ecg_cascading[:, -1]  # (draws, resolutions, ecgs)
        return (self.noise_floor[None] - final).min(axis=1)


def parameterised_layers(package: ModelPackage) -> list[dict]:
    """Layers that own weights, from the output layer towards the input."""
    return [layer for layer in reversed(package.manifest["layers"]) if layer["parameters"]]


def randomised_weights(
    trained: Mapping[str, np.ndarray], layers: Sequence[dict], seed: int, draw: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Per layer name, fresh Gaussian weights with each tensor's trained standard deviation.

    Keeping the scale keeps activations in range, so a method's change reflects lost
    structure, not exploding or vanishing signals. Layer ``i`` of one ``draw`` always gets
    the same values, so cascading and independent steps randomise a layer identically.
    """
    out = {}
    for i, layer in enumerate(layers):
        rng = np.random.default_rng([seed, draw, i])
        out[layer["name"]] = {
            p: (rng.standard_normal(trained[p].shape) * float(trained[p].std())).astype(np.float32)
            for p in layer["parameters"]
        }
    return out


@dataclass
class RandomisationSetup:
    """What the randomisation of one gate run needs besides the methods."""

    package: ModelPackage
    make_engine: EngineFactory
    x: np.ndarray
    target: np.ndarray
    window: int
    draws: int
    noise_scale: float
    seed: int
    basis: LeadBasis

    def noisy_x(self) -> np.ndarray:
        """The ECGs with noise at their own high-frequency level: the input of the noise floor."""
        rng = np.random.default_rng([self.seed, 11])
        return (self.x + high_frequency_noise(self.x, rng, self.noise_scale)).astype(np.float32)


def randomisation_models(
    package: ModelPackage, seed: int, draws: int
) -> Iterator[tuple[ModelKey, dict[str, np.ndarray]]]:
    """Every randomised model of the check as (key, overrides): per draw, the cascading steps
    (output layer first) and then each layer alone; key = (mode, draw, step)."""
    layers = parameterised_layers(package)
    names = [layer["name"] for layer in layers]
    params = package.read_parameters()
    for draw in range(draws):
        weights = randomised_weights(params, layers, seed, draw)
        for mode in ("cascading", "independent"):
            for k in range(len(layers)):
                chosen = names[: k + 1] if mode == "cascading" else [names[k]]
                yield (mode, draw, k), {p: v for n in chosen for p, v in weights[n].items()}


def randomisation_curves(
    setup: RandomisationSetup,
    attribute_all: StepAttributor,
    reference: Mapping[str, np.ndarray],
    trained: AttributionEngine,
    on_step: Callable[[], None] | None = None,
    reuse: bool = False,
) -> dict[str, RandomisationCurves]:
    """Cascading and independent randomisation curves of every method, over several draws.

    ``reference[m]`` are method ``m``'s attributions on the trained model for ``setup.x``;
    ``attribute_all(engine, x, key, same_model)`` computes every method on ``engine`` (the
    model ``key`` names) for those ECGs' targets. ``trained`` is the engine of the trained
    package, for the noise floor. ``reuse``: a model whose weights equal an earlier one's (the
    first cascading step and the first independent step randomise the same layer) keeps that
    model's engine and is given its maps as ``same_model``, and each method compares its
    trained-model map's ranks once, not once per step; the curves are the same either way.
    """
    names = [layer["name"] for layer in parameterised_layers(setup.package)]
    floor_maps = attribute_all(trained, setup.noisy_x(), ("noisy",), None)
    curves = {
        m: _Accumulator(names, setup.draws, reference[m], floor_maps[m], setup.window, setup.basis, reuse)
        for m in reference
    }
    seen: dict[str, tuple[AttributionEngine, Mapping[str, np.ndarray]]] = {}
    for key, overrides in randomisation_models(setup.package, setup.seed, setup.draws):
        mode, draw, k = key
        weights = weights_id(overrides) if reuse else ""
        if reuse and (mode, k) == ("cascading", 0):
            seen.clear()  # one draw's models never equal another draw's: hold one draw's engines only
        if weights in seen:
            engine, same_model = seen[weights]
            randomised = attribute_all(engine, setup.x, key, same_model)
        else:
            engine = setup.make_engine(overrides)
            randomised = attribute_all(engine, setup.x, key, None)
            if reuse:
                seen[weights] = (engine, randomised)
        for m, acc in curves.items():
            acc.add(mode, draw, k, randomised[m])
        if on_step is not None:
            on_step()
    return {m: acc.result() for m, acc in curves.items()}


def weights_id(overrides: Mapping[str, np.ndarray]) -> str:
    """Hash of a set of replaced parameters (names, shapes and values): equal ids, equal models."""
    h = hashlib.sha256()
    for name in sorted(overrides):
        value = np.ascontiguousarray(overrides[name])
        h.update(f"{name}{value.shape}{value.dtype}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def n_steps(package: ModelPackage, draws: int = 1) -> int:
    """How many randomised models :func:`randomisation_curves` builds (for progress bars)."""
    return 2 * len(parameterised_layers(package)) * draws


def resolution_similarity(
    trained: np.ndarray, other: np.ndarray, window: int, basis: LeadBasis
) -> np.ndarray:
    """(resolutions, B): Spearman |a| per sample, and Spearman of the signed segment relevance
    perturbation ranks (``window`` samples of ``basis``'s independent leads); NaN undefined."""
    per_sample = spearman_rows(trained, other, absolute=True)
    per_segment = spearman_rows(
        segment_relevance(trained, window, basis), segment_relevance(other, window, basis), absolute=False
    )
    return np.stack([per_sample, per_segment])


def is_constant(maps: np.ndarray) -> np.ndarray:
    """Per ECG, whether its map has one value everywhere (no ranking, no correlation)."""
    flat = np.asarray(maps, np.float64).reshape(len(maps), -1)
    return flat.max(axis=1) - flat.min(axis=1) <= 0


class _Accumulator:
    """Collects one method's comparisons step by step."""

    def __init__(
        self,
        layers: list[str],
        draws: int,
        trained: np.ndarray,
        floor: np.ndarray,
        window: int,
        basis: LeadBasis,
        reuse: bool = False,
    ):
        n, b = len(layers), len(trained)
        self.layers, self.trained, self.window, self.draws = layers, trained, window, draws
        self.basis = basis
        self.tables = {
            "cascading": np.full((draws, n, len(RESOLUTIONS), b), np.nan),
            "independent": np.full((draws, n, len(RESOLUTIONS), b), np.nan),
        }
        self.curves = {"cascading": _empty(n), "independent": _empty(n)}
        self.constant = {
            "trained": int(is_constant(trained).sum()),
            "noisy_input": int(is_constant(floor).sum()),
            "randomised": 0,
        }
        # With reuse: the trained map ranked once (not once per step), and the last map compared
        # with its results, for the maps that come back unchanged (those that ignore the model).
        self.ranked = _RankedTrained(trained, window, basis) if reuse else None
        self.noise_floor = (
            resolution_similarity(trained, floor, window, basis)
            if self.ranked is None
            else self.ranked.resolution_similarity(floor)
        )
        self.last: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]] | None = None

    def compare(self, randomised: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(resolutions, B) similarity table and the per-ECG values of each plotted measure."""
        if self.ranked is None:
            table = resolution_similarity(self.trained, randomised, self.window, self.basis)
            # The per-sample Spearman |a| is the table's first row; the others are for plots only.
            measures = {
                m: table[0] if m == "spearman_abs" else fn(self.trained, randomised)
                for m, fn in SIMILARITY_MEASURES.items()
            }
            return table, measures
        if self.last is not None and np.array_equal(self.last[0], randomised):
            return self.last[1], self.last[2]
        table = self.ranked.resolution_similarity(randomised)
        measures = {
            m: table[0]
            if m == "spearman_abs"
            else self.ranked.signed(randomised)
            if m == "spearman"
            else fn(self.trained, randomised)
            for m, fn in SIMILARITY_MEASURES.items()
        }
        self.last = (randomised, table, measures)
        return table, measures

    def add(self, mode: str, draw: int, step: int, randomised: np.ndarray) -> None:
        table, measures = self.compare(randomised)
        self.tables[mode][draw, step] = table
        self.constant["randomised"] += int(is_constant(randomised).sum())
        for measure, values in measures.items():
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            # A running mean over draws, so plots show the average curve.
            curve = self.curves[mode][measure]
            curve[step] = mean if draw == 0 else curve[step] + (mean - curve[step]) / (draw + 1)

    def result(self) -> RandomisationCurves:
        return RandomisationCurves(
            self.layers,
            {k: list(v) for k, v in self.curves["cascading"].items()},
            {k: list(v) for k, v in self.curves["independent"].items()},
            self.tables["cascading"],
            self.tables["independent"],
            self.noise_floor,
            self.constant,
        )


class _RankedTrained:
    """A trained-model map's ranks, computed once: the same numbers as :func:`spearman_rows` and
    :func:`resolution_similarity` against it (the other map ranked the same way, the same
    Pearson correlation of the ranks), without ranking the trained map again for every step."""

    def __init__(self, trained: np.ndarray, window: int, basis: LeadBasis):
        self.window, self.basis = window, basis
        rows = _rows(trained)
        self.absolute = average_ranks(np.abs(rows))
        self.plain = average_ranks(rows)
        self.segments = average_ranks(_rows(segment_relevance(trained, window, basis)))

    def resolution_similarity(self, other: np.ndarray) -> np.ndarray:
        per_sample = pearson_rows(self.absolute, average_ranks(np.abs(_rows(other))))
        segments = _rows(segment_relevance(other, self.window, self.basis))
        per_segment = pearson_rows(self.segments, average_ranks(segments))
        return np.stack([per_sample, per_segment])

    def signed(self, other: np.ndarray) -> np.ndarray:
        return pearson_rows(self.plain, average_ranks(_rows(other)))


def average_ranks(rows: np.ndarray) -> np.ndarray:
    """``scipy.stats.rankdata(rows, axis=1)`` (ties share their average rank), the same numbers
    about 3x faster: scipy sorts stably, which average ranks do not need (a tie group gets one
    rank whatever order its members come in). A row holding NaN is left to scipy."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] == 0 or np.isnan(rows).any():
        return rankdata(rows, axis=1)
    b, n = rows.shape
    order = np.argsort(rows, axis=1)
    flat = (order + (np.arange(b) * n)[:, None]).ravel()  # each sorted element's place in rows
    ordered = rows.ravel()[flat].reshape(b, n)
    starts = np.ones(rows.shape, bool)  # where a group of equal values starts, in sorted order
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=starts[:, 1:])
    index = np.arange(n)
    sorted_ranks = np.empty(rows.shape)
    sorted_ranks[:] = index + 1.0
    tied = ~starts.all(axis=1)
    if tied.any():
        starts = starts[tied]
        ends = np.ones(starts.shape, bool)
        ends[:, :-1] = starts[:, 1:]
        first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
        last = np.minimum.accumulate(np.where(ends, index, n)[:, ::-1], axis=1)[:, ::-1]
        # scipy's 0.5 * (count[dense] + count[dense - 1] + 1): integers and halves, exact either way.
        sorted_ranks[tied] = 0.5 * (first + last + 2)
    ranks = np.empty(b * n)
    ranks[flat] = sorted_ranks.ravel()
    return ranks.reshape(b, n)


def _rows(a: np.ndarray) -> np.ndarray:
    """(B, ...) as float64 rows, as :func:`spearman_rows` ranks them."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1)


def _empty(n: int) -> dict[str, list[float]]:
    return {measure: [float("nan")] * n for measure in SIMILARITY_MEASURES}
