"""The gate policy: which checks block a method, their thresholds and their settings.

Defaults live in ``default_policy.toml`` beside this module, except the default
``serving.may_differ`` entries, which each method class declares (its ``may_differ``);
a user's TOML file overrides any subset of its keys. Files are read by the shared
loader (:mod:`ecgx.core.config_file`). Unknown keys and values of the wrong type or
range are errors that name the key, so a typo never silently keeps a default.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecgx.core.config_file import ConfigError, check_tables, read_toml
from ecgx.service.methods import METHOD_NAMES, get_method
from ecgx.service.methods.base import DIRECTIONS

CHECKS = (
    "randomisation",
    "perturbation",
    "changed_model",
    "self_consistency",
    "inter_method",
    "localisation",
)
STRATEGIES = ("zero", "lead_mean", "linear", "noisy_linear")
CONTROL_METHOD = "random"
DEFAULT_POLICY_FILE = Path(__file__).with_name("default_policy.toml")

# The most bootstrap resamples a policy may ask for: the resampled indices are held in memory
# (resamples x ECGs), and beyond this the interval's ends no longer move.
MAX_BOOTSTRAP = 100_000

# key -> (type, lower bound, upper bound); bounds are inclusive, None means open. Every number
# must also be finite: TOML spells NaN and infinity (``nan``, ``inf``), and a NaN threshold
# compares false with everything, so it would silently decide every verdict.
_SCHEMA: dict[str, dict[str, tuple[type, float | None, float | None]]] = {
    "gate": {
        "ecgs": (int, 1, None),
        "seed": (int, 0, None),
        "min_passing": (int, 0, len(METHOD_NAMES) - 1),  # the random control never counts
    },
    "checks.randomisation": {
        "ecgs": (int, 1, None),
        "draws": (int, 1, 100),
        "window": (int, 1, 600),
        "noise_scale": (float, 0, 100),
        "max_similarity": (float, -1, 1),
        "max_top_layer_similarity": (float, -1, 1),
        "max_curve_area": (float, -1, 1),
        "max_independent_similarity": (float, -1, 1),
        "min_noise_floor_gap": (float, -2, 2),
        "confidence": (float, 0.5, 0.9999),
        "bootstrap": (int, 100, MAX_BOOTSTRAP),
    },
    "checks.perturbation": {
        "window": (int, 1, 600),
        "steps": (int, 2, None),
        "noise_scale": (float, 0, 100),
        "margin": (float, -100, 100),
        "confidence": (float, 0.5, 0.9999),
        "bootstrap": (int, 100, MAX_BOOTSTRAP),
    },
    "checks.changed_model": {
        "ecgs": (int, 2, None),
        "draws": (int, 1, 100),
        "margin": (float, -100, 100),
        "confidence": (float, 0.5, 0.9999),
        "bootstrap": (int, 100, MAX_BOOTSTRAP),
    },
    "checks.self_consistency": {"min_correlation": (float, -1, 1)},
    "checks.inter_method": {"min_correlation": (float, -1, 1)},
    "checks.localisation": {"min_auroc": (float, 0, 1)},
}


class PolicyError(ConfigError):
    """A policy file that cannot be read or holds an unknown key or a bad value."""


@dataclass(frozen=True)
class Policy:
    """An effective policy: the defaults with a user's file applied."""

    content: dict[str, Any]
    source: str  # "default" or the file it was read from

    @property
    def sha256(self) -> str:
        """Hash of the effective settings (not of the file's bytes: comments do not matter)."""
        return hashlib.sha256(json.dumps(self.content, sort_keys=True).encode()).hexdigest()

    @property
    def seed(self) -> int:
        return self.content["gate"]["seed"]

    @property
    def min_passing(self) -> int:
        return self.content["gate"]["min_passing"]

    @property
    def n_ecgs(self) -> int:
        return self.content["gate"]["ecgs"]

    @property
    def allow_incomplete_data(self) -> bool:
        """Gate data with fewer ECGs than ``gate.ecgs``, or without a class, instead of refusing it."""
        return bool(self.content["gate"]["allow_incomplete_data"])

    @property
    def label(self) -> str:
        """How reports name the policy: its source and the start of its hash."""
        return f"{self.source} (sha256 {self.sha256[:12]})"

    def check(self, name: str) -> dict[str, Any]:
        return self.content["checks"][name]

    def blocking(self, name: str) -> bool:
        return bool(self.check(name)["blocking"])

    def required_methods(self, available: tuple[str, ...] = METHOD_NAMES) -> list[str]:
        req = self.content["gate"]["required_methods"]
        if req == "all":
            return [m for m in available if m != CONTROL_METHOD]
        return list(req)


def validated(policy: Policy) -> Policy:
    """``policy`` checked as a file would be (a :class:`Policy` built in code skips the file's checks)."""
    try:
        return Policy(content=_validate(copy.deepcopy(policy.content)), source=policy.source)
    except (KeyError, TypeError) as e:
        raise PolicyError(f"policy {policy.source}: incomplete or malformed content ({e!r})") from None
    except PolicyError as e:
        raise PolicyError(f"policy {policy.source}: {e}") from None


def declared_may_differ() -> dict[str, dict[str, str]]:
    """The default ``serving.may_differ`` table: each built-in method's own ``may_differ``."""
    declared = {m: dict(get_method(m).may_differ) for m in METHOD_NAMES}
    return {m: how for m, how in declared.items() if how}


def default_policy() -> Policy:
    """The default policy: ``default_policy.toml``, with the methods' declared ``may_differ``
    entries (an entry in the file replaces a method's, as in a user's file)."""
    content = read_toml(DEFAULT_POLICY_FILE, "default gate policy")
    serving = content.setdefault("serving", {})
    serving["may_differ"] = {**declared_may_differ(), **serving.get("may_differ", {})}
    return Policy(content=_validate(content), source="default")


def load_policy(path: Path | str | None = None) -> Policy:
    """The default policy, with the keys of the TOML file at ``path`` (if given) applied."""
    base = default_policy()
    if path is None:
        return base
    user = _read(Path(path), tuple(base.content))
    merged = _merge(base.content, user, "")
    try:
        return Policy(content=_validate(merged), source=str(path))
    except PolicyError as e:
        raise PolicyError(f"policy file {path}: {e}") from None


def _read(path: Path, tables: tuple[str, ...]) -> dict[str, Any]:
    """A user's policy file (:func:`~ecgx.core.config_file.read_toml`) holding only ``tables`` at
    its top; the shared loader's errors as :class:`PolicyError`, with their messages."""
    try:
        document = read_toml(path, "policy file")
        check_tables(document, tables, f"policy file {path}")
    except ConfigError as e:
        raise PolicyError(str(e)) from None
    return document


def _merge(base: dict[str, Any], user: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in user.items():
        name = f"{where}{key}"
        if key not in base:
            raise PolicyError(f"unknown policy key {name!r}; known here: {', '.join(sorted(base))}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise PolicyError(f"policy key {name!r} must be a table")
            # A method's entry replaces the default one; any built-in method may be named.
            open_table = name == "serving.may_differ"
            out[key] = {**base[key], **value} if open_table else _merge(base[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def _validate(content: dict[str, Any]) -> dict[str, Any]:
    for section, keys in _SCHEMA.items():
        table = content
        for part in section.split("."):
            table = table[part]
        for key, (kind, low, high) in keys.items():
            table[key] = _number(f"{section}.{key}", table[key], kind, low, high)
    if not isinstance(content["gate"]["allow_incomplete_data"], bool):
        raise PolicyError("gate.allow_incomplete_data must be true or false")
    for check in CHECKS:
        if not isinstance(content["checks"][check]["blocking"], bool):
            raise PolicyError(f"checks.{check}.blocking must be true or false")
    _check_required(content["gate"]["required_methods"])
    _check_strategies(content["checks"]["perturbation"]["strategies"])
    _check_may_differ(content["serving"]["may_differ"])
    return content


def _number(name: str, value: Any, kind: type, low: float | None, high: float | None) -> int | float:
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise PolicyError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise PolicyError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise PolicyError(f"{name} must be {bounds}, got {value!r}")
    return kind(value)


def _check_required(req: Any) -> None:
    if req == "all":
        return
    if not isinstance(req, list) or not all(isinstance(m, str) for m in req):
        raise PolicyError('gate.required_methods must be "all" or a list of method names')
    unknown = [m for m in req if m not in METHOD_NAMES]
    if unknown:
        raise PolicyError(f"gate.required_methods names unknown method(s) {unknown}; known: {METHOD_NAMES}")
    if CONTROL_METHOD in req:
        raise PolicyError("gate.required_methods cannot require the random control: it is built to fail")


MAY_DIFFER = DIRECTIONS


def _check_may_differ(table: Any) -> None:
    """``serving.may_differ``: method -> {parameter: "any" | "at_least" | "at_most"}, naming only
    built-in methods and their public parameters."""
    if not isinstance(table, Mapping):
        raise PolicyError("serving.may_differ must be a table of method = { parameter = ... }")
    for method, params in table.items():
        where = f"serving.may_differ.{method}"
        if method not in METHOD_NAMES:
            raise PolicyError(f"{where}: unknown method {method!r}; known: {', '.join(METHOD_NAMES)}")
        if not isinstance(params, Mapping):
            raise PolicyError(f'{where} must be a table, e.g. {{ n_samples = "at_least" }}')
        known = get_method(method).parameters()
        for name, how in params.items():
            if name not in known:
                raise PolicyError(
                    f"{where}.{name}: {method} has no parameter {name!r}; its parameters: "
                    f"{', '.join(sorted(known)) or 'none'}"
                )
            if how not in MAY_DIFFER:
                raise PolicyError(f"{where}.{name} must be one of {', '.join(MAY_DIFFER)}, got {how!r}")


def may_differ(policy: Policy, method: str) -> dict[str, str]:
    """How each setting of ``method`` may differ from what the gate checked when served: the
    policy's ``serving.may_differ`` entry, and ``seed`` "any" for a stochastic method."""
    out = dict(policy.content["serving"]["may_differ"].get(method, {}))
    if method in METHOD_NAMES and get_method(method).stochastic:
        out["seed"] = "any"
    return out


def _check_strategies(strategies: Any) -> None:
    if not isinstance(strategies, list) or not strategies:
        raise PolicyError(f"checks.perturbation.strategies must be a non-empty list from {list(STRATEGIES)}")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise PolicyError(f"checks.perturbation.strategies has unknown {unknown}; known: {list(STRATEGIES)}")


# ---------------------------------------------------------------------------------- the policy floor

# The floor's bound for a key that must be no looser than the default policy's own value.
DEFAULT = "default"

# key -> (comparison, bound, why): the minimum a policy must meet for its report to be servable.
# Every setting that changes what a check can detect is here, each at the default policy's own
# value (DEFAULT), so any single loosening makes the report research-only; the keys that are
# not here are in NOT_IN_FLOOR with the reason. Below the floor the gate refuses (PolicyError)
# unless run in research mode, whose report is marked "research" and never served.
# Comparisons: "==", ">=", "<=", "superset" (a list holding every bound entry) and "within"
# (serving.may_differ allowing no more than the bound allows).
_WIDER_INTERVAL = "a narrower interval makes the verdict a coin toss"
_RESAMPLES = "fewer resamples leave the interval's ends unstable"
_FEWER_ECGS = "fewer ECGs give intervals too wide to tell methods apart"
POLICY_FLOOR: dict[str, tuple[str, Any, str]] = {
    "gate.ecgs": (">=", DEFAULT, _FEWER_ECGS),
    "gate.seed": ("==", DEFAULT, "gating again under other seeds until one passes is shopping for luck"),
    "gate.min_passing": (">=", DEFAULT, "a gate that no method passes must not pass"),
    "gate.allow_incomplete_data": ("==", DEFAULT, "a verdict on less data than the policy asks for"),
    "checks.randomisation.blocking": (
        "==",
        DEFAULT,
        "a method whose maps ignore the model's weights must not pass",
    ),
    "checks.randomisation.ecgs": (">=", DEFAULT, _FEWER_ECGS),
    "checks.randomisation.draws": (">=", DEFAULT, "fewer weight draws let a lucky draw decide"),
    "checks.randomisation.window": (
        "==",
        DEFAULT,
        "the segment unit must be the one perturbation removes; other windows let weight-keyed masks pass",
    ),
    "checks.randomisation.noise_scale": (
        ">=",
        DEFAULT,
        "less noise raises the noise floor every method must fall below",
    ),
    "checks.randomisation.max_similarity": (
        "<=",
        DEFAULT,
        "above it the map is mostly explained by the input",
    ),
    "checks.randomisation.max_top_layer_similarity": (
        "<=",
        DEFAULT,
        "a looser limit lets maps that ignore the output layer pass (guided backprop's failure)",
    ),
    "checks.randomisation.max_curve_area": ("<=", DEFAULT, "a looser limit lets slowly changing maps pass"),
    "checks.randomisation.max_independent_similarity": (
        "<=",
        DEFAULT,
        "a looser limit lets maps that ignore whole layers pass",
    ),
    "checks.randomisation.min_noise_floor_gap": (
        ">=",
        DEFAULT,
        "a smaller gap lets maps that are noise to begin with pass (the unseeded random reference)",
    ),
    "checks.randomisation.confidence": (">=", DEFAULT, _WIDER_INTERVAL),
    "checks.randomisation.bootstrap": (">=", DEFAULT, _RESAMPLES),
    "checks.perturbation.blocking": (
        "==",
        DEFAULT,
        "a method no better than a map that ignores the model must not pass",
    ),
    "checks.perturbation.window": (
        "==",
        DEFAULT,
        "the calibrated segment unit; other windows change what is removed",
    ),
    "checks.perturbation.steps": (">=", DEFAULT, "a coarser curve hides where removal matters"),
    "checks.perturbation.strategies": (
        "superset",
        DEFAULT,
        "each replacement has its own bias; leaving one out lets maps that exploit another's pass",
    ),
    "checks.perturbation.noise_scale": (
        "==",
        DEFAULT,
        "ROAD's noise level decides what the imputation leaks",
    ),
    "checks.perturbation.margin": (">=", DEFAULT, "a smaller margin lets edge detectors and templates pass"),
    "checks.perturbation.confidence": (">=", DEFAULT, _WIDER_INTERVAL),
    "checks.perturbation.bootstrap": (">=", DEFAULT, _RESAMPLES),
    "checks.changed_model.blocking": (
        "==",
        DEFAULT,
        "a map that cannot follow a change of model must not pass",
    ),
    "checks.changed_model.ecgs": (">=", DEFAULT, _FEWER_ECGS),
    "checks.changed_model.draws": (">=", DEFAULT, "fewer weight draws let a lucky draw decide"),
    "checks.changed_model.margin": (">=", DEFAULT, "a smaller margin lets maps that ignore the model pass"),
    "checks.changed_model.confidence": (">=", DEFAULT, _WIDER_INTERVAL),
    "checks.changed_model.bootstrap": (">=", DEFAULT, _RESAMPLES),
    "serving.may_differ": (
        "within",
        DEFAULT,
        "a verdict covers the settings it checked; only the directions known to be safe may differ",
    ),
}
# Policy keys outside the floor, and why loosening them cannot make a map pass.
NOT_IN_FLOOR: dict[str, str] = {
    "gate.required_methods": "requiring a method only adds a condition",
    **{
        f"checks.{c}.{k}": "informative by default; made blocking it only adds a condition"
        for c, k in (
            ("self_consistency", "blocking"),
            ("self_consistency", "min_correlation"),
            ("inter_method", "blocking"),
            ("inter_method", "min_correlation"),
            ("localisation", "blocking"),
            ("localisation", "min_auroc"),
        )
    },
}
_MAY_DIFFER_RANK = {"at_least": 1, "at_most": 1, "any": 2}


def _within(table: Mapping[str, Any], bound: Mapping[str, Any]) -> bool:
    """Whether every setting ``table`` lets differ, ``bound`` lets differ the same way or "any"."""
    for method, params in table.items():
        for name, how in params.items():
            allowed = bound.get(method, {}).get(name)
            if allowed != how and allowed != "any":
                return False
    return True


_COMPARE = {
    "==": lambda v, b: v == b,
    ">=": lambda v, b: v >= b,
    "<=": lambda v, b: v <= b,
    "superset": lambda v, b: set(b) <= set(v),
    "within": _within,
}


def _value(content: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        content = content[part]
    return content


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def floor_violations(policy: Policy) -> list[str]:
    """Each key of ``policy`` looser than :data:`POLICY_FLOOR`, in words (empty: at or above it)."""
    problems = []
    defaults = default_policy().content
    for key, (op, bound, why) in POLICY_FLOOR.items():
        if bound == DEFAULT:
            bound = _value(defaults, key)
        value = _value(policy.content, key)
        if not _COMPARE[op](value, bound):
            floor = _shown(bound) if op == "==" else f"{op} {bound!r}"
            problems.append(f"{key} = {_shown(value)} (floor: {floor}; {why})")
    return problems


def check_floor(policy: Policy, research: bool = False) -> list[str]:
    """Refuse (:class:`PolicyError`) a policy below the floor unless ``research``; returns the
    violations (for a research report's warnings)."""
    problems = floor_violations(policy)
    if problems and not research:
        raise PolicyError(
            f"policy {policy.source} is below the floor this ecgx enforces for servable reports: "
            f"{'; '.join(problems)}. Raise these settings, or gate anyway with --research "
            "(run_gate(research=True)): the report is then marked research and can never be served"
        )
    return problems
