"""Constructed maps that do not explain the model, fed to the gate as user methods: the
adversarial suite (tests/validation/test_gate_adversarial.py) and the calibration
(benchmarks/calibrate_gate.py) both use them.

Each is ``fn(engine, x, target)`` as ``ecgx validate --method`` takes it; ``engine`` is the
gate's narrow engine of the model under test (logits, probabilities, built-in methods).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

Map = Callable[..., np.ndarray]


def _unit_rank(a: np.ndarray) -> np.ndarray:
    """Per ECG, the ranks of |a| scaled to [0, 1] (so maps of any scale blend evenly)."""
    flat = np.abs(np.asarray(a, np.float64)).reshape(len(a), -1)
    r = rankdata(flat, axis=1)
    return ((r - 1) / max(flat.shape[1] - 1, 1)).reshape(a.shape)


def input_magnitude(engine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.abs(x)


def edges(engine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.abs(np.gradient(np.asarray(x, np.float64), axis=-1))


def builtin(method: str) -> Map:
    return lambda engine, x, target: engine.attribute(method, x, target)


def last_call_cached(fn: Map) -> Map:
    """``fn`` remembering its last call: the cheats that share one real method's map on the same
    engine and ECGs (the gate calls every user method on one model in a row) compute it once."""
    last: dict[str, object] = {}

    def attribute(engine, x, target):
        # The engine itself is kept (not its id, which a later engine could reuse).
        key = (x.ctypes.data, x.shape, np.asarray(target).tobytes())
        if last.get("engine") is not engine or last.get("key") != key:
            last.update(engine=engine, key=key, map=fn(engine, x, target))
        return last["map"]

    return attribute


def blend(edge: Map, method: Map, edge_weight: float) -> Map:
    """``edge_weight`` x rank(|edge|) + (1 - edge_weight) x rank(|method|): the issue's blend,
    each ingredient passing the check the other fails."""

    def attribute(engine, x, target):
        return edge_weight * _unit_rank(edge(engine, x, target)) + (1 - edge_weight) * _unit_rank(
            method(engine, x, target)
        )

    return attribute


def _looks_trained(engine, x: np.ndarray, target: np.ndarray) -> bool:
    """A detector's guess: a trained model ranks the target first on many ECGs; a randomised
    one on about one in nine."""
    logits = engine.logits(x)
    return float((logits.argmax(axis=1) == target).mean()) > 0.25


def randomisation_detector(honest: Map | None = None) -> Map:
    """|x| on a model that looks trained, and on any other model noise (``honest`` None) or a
    real method (``honest``): it 'changes' under randomisation and scores |x|'s faithfulness."""

    def attribute(engine, x, target):
        if _looks_trained(engine, x, target):
            return np.abs(x)
        if honest is None:
            return np.random.default_rng(0).standard_normal(x.shape)
        return honest(engine, x, target)

    return attribute


def per_class_template(engine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """One fixed map per class: a QRS-centred window in every lead, wider and later per class."""
    t = np.arange(x.shape[-1])
    out = np.empty(x.shape, np.float32)
    for b, c in enumerate(np.asarray(target)):
        centre, width = 0.45 * x.shape[-1] + 6 * int(c), 15 + 3 * int(c)
        out[b] = np.exp(-0.5 * ((t - centre) / width) ** 2)[None]
    return out


def batch_class_template(engine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per class, where its ECGs in the batch differ on average from all of them, times |x|."""
    x = np.asarray(x, np.float64)
    overall = x.mean(axis=0)
    out = np.empty_like(x)
    for c in np.unique(target):
        out[target == c] = np.abs(x[target == c].mean(axis=0) - overall)
    return out * np.abs(x)


def _weights_key(engine) -> int:
    """A number that changes whenever any weight does: the hash of the model's logits on a fixed
    probe input (the narrow engine names no package, but its outputs still give the weights away)."""
    probe = np.random.default_rng(12345).standard_normal((2, 12, 600)).astype(np.float32)
    return int(hashlib.sha256(np.round(engine.logits(probe), 4).tobytes()).hexdigest()[:8], 16)


def weight_keyed_mask(window: int = 50, share: float = 0.5) -> Map:
    """|x| on a random ``share`` of the lead x window segments, chosen by the weights' key: it
    changes with every weight, yet says nothing about what the model uses."""

    def attribute(engine, x, target):
        rng = np.random.default_rng(_weights_key(engine))
        segments = -(-x.shape[-1] // window)
        keep = rng.random((x.shape[1], segments)) < share
        mask = np.repeat(keep, window, axis=1)[:, : x.shape[-1]]
        return np.abs(x) * (0.1 + mask)

    return attribute


def weight_keyed_noise(engine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """|x| times noise seeded by the weights' key."""
    rng = np.random.default_rng(_weights_key(engine))
    return np.abs(x) * (1 + rng.random(x.shape))


def cheats(strong: str = "occlusion", weights: tuple[float, ...] = (0.35, 0.5, 0.65, 0.8)) -> dict[str, Map]:
    """Every family of the issue, by name: blends of |x| and of |dx/dt| with ``strong`` (a real
    method) at each edge weight, randomisation detectors, templates, weight-keyed masks and noise."""
    out: dict[str, Map] = {}
    real = last_call_cached(builtin(strong))
    for w in weights:
        out[f"cheat:blend_input_{w:g}"] = blend(input_magnitude, real, w)
        out[f"cheat:blend_edges_{w:g}"] = blend(edges, real, w)
    out["cheat:detector_noise"] = randomisation_detector()
    out["cheat:detector_honest"] = randomisation_detector(real)
    out["cheat:class_template"] = per_class_template
    out["cheat:batch_template"] = batch_class_template
    out["cheat:weight_keyed_mask"] = weight_keyed_mask()
    out["cheat:weight_keyed_noise"] = weight_keyed_noise
    return out
