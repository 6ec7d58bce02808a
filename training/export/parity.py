"""How a graph's output is compared with its reference: the export's parity criterion, shared with
the tests and the LRP reference, and check records as the manifest holds them (JSON)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

# Parity criterion shared with the tests: relative error (to the reference's largest
# magnitude) above REL_TOL is tolerated on at most MAX_OUTLIER_FRACTION of elements
# (ReLU and max-pool near-ties flip masks for a few elements).
REL_TOL = 1e-4
MAX_OUTLIER_FRACTION = 1e-3


# float32's own spread: where PyTorch's float32 run of the same computation is itself off against
# float64, float32 does not pin the map down, and two correct float32 implementations differ there
# alike, each at times worse than the other. The engine passes such a sample when it is no further
# from float64 than this many times PyTorch's float32 run (xresnet1d50 at 1000 samples, Ribeiro's
# pre-activation ResNet; issue #25). A construction error is of the order of the map and shows on
# the samples float32 does pin down.
FLOAT32_SPREAD_FACTOR = 2.0


def within_float32_spread(engine: Mapping[str, float], float32: Mapping[str, float]) -> bool:
    """True when the engine's error against float64 (``parity``'s figures) is at most
    ``FLOAT32_SPREAD_FACTOR`` times float32's own (``float32``: a float32 run's figures, or an
    estimate of them) on the largest error and on the fraction of elements off."""
    return all(engine[k] <= FLOAT32_SPREAD_FACTOR * float32[k] for k in ("max_rel_error", "outlier_fraction"))


# float32's spread is estimated from several draws of rounding, because one float32 run may round
# luckily (inception1d, LRP-epsilon at 1e-6: PyTorch's float32 run off by 6e-5, the float64 run of
# an input moved by one float32 rounding by 2.2e-4, ONNX Runtime by 1.6e-4): PyTorch's float32
# run, and the float64 run of the input moved by one rounding per value, FLOAT32_DRAWS times.
FLOAT32_DRAWS = 2


def moved_by_float32_rounding(x: np.ndarray, draw: int) -> np.ndarray:
    """``x`` in float64 with each value moved by one float32 rounding (relative 2^-24, a fixed
    pseudo-random sign per value; ``draw`` picks the signs): the effect rounding has on every
    intermediate sum, made on the input. Deterministic, so an export's verdict is reproducible."""
    signs = np.random.default_rng(draw).choice([-1.0, 1.0], size=np.shape(x))
    return np.asarray(x, np.float64) * (1 + signs * 2.0**-24)


def parity(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Largest relative error (to the reference's largest magnitude) and fraction of
    elements above ``REL_TOL``."""
    scale = float(np.abs(ref).max()) or 1.0
    rel = np.abs(np.asarray(got, np.float64) - ref) / scale
    return {"max_rel_error": float(rel.max()), "outlier_fraction": float((rel > REL_TOL).mean())}


def parity_ok(p: dict[str, float]) -> bool:
    """True when at most ``MAX_OUTLIER_FRACTION`` of the elements are off by more than ``REL_TOL``."""
    return p["outlier_fraction"] <= MAX_OUTLIER_FRACTION


def per_sample_parity(
    got: np.ndarray, ref: np.ndarray, excused: Mapping[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """Parity of each sample's map; a sample may disagree only for a reason in ``excused``.

    ``excused`` maps a reason (``"near_max_pool_tie"``, ``"ill_conditioned"``) to one bool
    per sample: samples whose map float32 arithmetic does not pin down, so two correct
    implementations may differ there. ``ok`` needs every disagreeing sample to be excused
    and at least half of the samples to agree: a construction error shows on every
    sample, rounding on a few. ``failing`` holds the figures of each unexcused sample.
    """
    results = [parity(g, r) for g, r in zip(got, ref, strict=True)]
    agree = np.array([parity_ok(r) for r in results])
    reasons = {k: np.asarray(v, bool) for k, v in (excused or {}).items()}
    any_excuse = np.zeros(len(results), bool)
    for flags in reasons.values():
        any_excuse |= flags
    unexplained = ~agree & ~any_excuse
    agreeing = [r for r, a in zip(results, agree, strict=True) if a]
    return {
        "samples": len(results),
        "agreeing": int(agree.sum()),
        # Every sample's figures, excused ones included: what the engine measured against its reference.
        "measured": {
            "max_rel_error": max(r["max_rel_error"] for r in results),
            "outlier_fraction": max(r["outlier_fraction"] for r in results),
        },
        "max_rel_error": max((r["max_rel_error"] for r in agreeing), default=None),
        "outlier_fraction": max((r["outlier_fraction"] for r in agreeing), default=None),
        "excused": {k: np.flatnonzero(~agree & v).tolist() for k, v in reasons.items()},
        "failing": [{"sample": int(i), **results[i]} for i in np.flatnonzero(unexplained)],
        "ok": bool(agree.sum() >= len(results) / 2 and not unexplained.any()),
    }


def describe_parity_failure(name: str, check: dict[str, Any]) -> str:
    """One line per failed check, with the failing samples' own figures."""
    if "error" in check:
        return f"{name}: {check['error']}"
    if "failing" not in check:  # a whole-batch comparison (forward logits, summation)
        against = ""
        if check.get("reference_precision") == "float64":
            f32 = check["float32_reference_vs_float64"]
            against = (
                f" against the float64 run; PyTorch's float32 run is off by max {f32['max_rel_error']:.2e}"
            )
        return (
            f"{name}: {check['outlier_fraction']:.2%} of values off by more than {REL_TOL:g} "
            f"of the largest magnitude (max {check['max_rel_error']:.2e}){against}"
        )
    against = "the float64 run" if check.get("reference_precision") == "float64" else "its reference"
    parts = [
        f"sample {f['sample']}: {f['outlier_fraction']:.2%} of elements off by more than {REL_TOL:g} of the "
        f"largest magnitude (max {f['max_rel_error']:.2e}; limit {MAX_OUTLIER_FRACTION:.1%} of elements), "
        f"the engine against {against}{_float32_side(f)}"
        for f in check["failing"]
    ]
    if check["agreeing"] < check["samples"] / 2:
        parts.append(f"only {check['agreeing']} of {check['samples']} samples agree")
        sides = check.get("excused_sides") or []
        parts += [
            f"excused sample {f['sample']}: {f['outlier_fraction']:.2%} of elements off (max "
            f"{f['max_rel_error']:.2e}), the engine against {against}{_float32_side(f)}"
            for f in sides[:3]
        ]
        if len(sides) > 3:
            parts.append(f"and {len(sides) - 3} more excused samples")
    return f"{name}: " + "; ".join(parts)


def _float32_side(failing: dict[str, Any]) -> str:
    """Where PyTorch's float32 run stands against float64 on a failing sample: which side was off."""
    ref = failing.get("float32_reference_vs_float64")
    if ref is None:
        return ""
    if parity_ok(ref):
        return (
            f"; PyTorch's float32 reference agrees with float64 (max {ref['max_rel_error']:.2e}): "
            "the engine is the side off"
        )
    return (
        f"; PyTorch's float32 reference is off against float64 too ({ref['outlier_fraction']:.2%} of "
        f"elements, max {ref['max_rel_error']:.2e})"
    )


def jsonable(value: Any) -> Any:
    """``value`` as JSON would read it back: NumPy arrays and scalars as lists and numbers,
    anything else JSON lacks as its text."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
