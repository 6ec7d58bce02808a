"""The gate policy: which checks block a method, their thresholds and their settings.

Defaults live in ``default_policy.toml`` beside this module; a user's TOML file
overrides any subset of its keys. Unknown keys and values of the wrong type or
range are errors that name the key, so a typo never silently keeps a default.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecgx.service.methods import METHOD_NAMES

CHECKS = ("randomisation", "perturbation", "self_consistency", "inter_method", "localisation")
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
    "checks.self_consistency": {"min_correlation": (float, -1, 1)},
    "checks.inter_method": {"min_correlation": (float, -1, 1)},
    "checks.localisation": {"min_auroc": (float, 0, 1)},
}


class PolicyError(ValueError):
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


def default_policy() -> Policy:
    text = DEFAULT_POLICY_FILE.read_text()
    return Policy(content=_validate(tomllib.loads(text)), source="default")


def load_policy(path: Path | str | None = None) -> Policy:
    """The default policy, with the keys of the TOML file at ``path`` (if given) applied."""
    base = default_policy()
    if path is None:
        return base
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"policy file {path} does not exist")
    if not path.is_file():
        raise PolicyError(
            f"policy file {path} is not a regular file (a folder or a device?); give a TOML file"
        )
    try:
        user = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"policy file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise PolicyError(f"policy file {path} cannot be read: {e.strerror or e}") from None
    merged = _merge(base.content, user, "")
    try:
        return Policy(content=_validate(merged), source=str(path))
    except PolicyError as e:
        raise PolicyError(f"policy file {path}: {e}") from None


def _merge(base: dict[str, Any], user: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in user.items():
        name = f"{where}{key}"
        if key not in base:
            raise PolicyError(f"unknown policy key {name!r}; known here: {', '.join(sorted(base))}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise PolicyError(f"policy key {name!r} must be a table")
            out[key] = _merge(base[key], value, f"{name}.")
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
# Below it the gate refuses (PolicyError) unless run in research mode, whose report is marked
# "research" and never served. Add a key with one line; a bound of DEFAULT means the value in
# default_policy.toml.
POLICY_FLOOR: dict[str, tuple[str, bool | float | str, str]] = {
    "checks.randomisation.blocking": (
        "==",
        True,
        "a method whose maps ignore the model's weights must not pass",
    ),
    "checks.perturbation.blocking": ("==", True, "a method no better than random removal must not pass"),
    "checks.randomisation.max_similarity": ("<=", 0.5, "above it the map is mostly explained by the input"),
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
    "checks.randomisation.draws": (">=", 2, "one weight draw can be lucky"),
    "checks.perturbation.margin": (">=", DEFAULT, "a smaller margin lets noise-level methods pass"),
    "checks.randomisation.confidence": (">=", 0.9, "a narrower interval makes the verdict a coin toss"),
    "checks.perturbation.confidence": (">=", 0.9, "a narrower interval makes the verdict a coin toss"),
    "checks.randomisation.bootstrap": (">=", 1000, "fewer resamples leave the interval's ends unstable"),
    "checks.perturbation.bootstrap": (">=", 1000, "fewer resamples leave the interval's ends unstable"),
    "gate.ecgs": (">=", 64, "fewer ECGs give intervals too wide to tell methods apart"),
    "checks.randomisation.ecgs": (">=", 16, "fewer ECGs give intervals too wide to tell methods apart"),
}
_COMPARE = {
    "==": lambda v, b: v == b,
    ">=": lambda v, b: v >= b,
    "<=": lambda v, b: v <= b,
}


def _value(content: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        content = content[part]
    return content


def floor_violations(policy: Policy) -> list[str]:
    """Each key of ``policy`` looser than :data:`POLICY_FLOOR`, in words (empty: at or above it)."""
    problems = []
    for key, (op, bound, why) in POLICY_FLOOR.items():
        if bound == DEFAULT:
            bound = _value(default_policy().content, key)
        value = _value(policy.content, key)
        if not _COMPARE[op](value, bound):
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            floor = str(bound).lower() if isinstance(bound, bool) else f"{op} {bound!r}"
            problems.append(f"{key} = {shown} (floor: {floor}; {why})")
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
