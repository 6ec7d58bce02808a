"""Property: every single-setting loosening of the default policy is refused as servable.

A loosening is any value, within what the policy file accepts, on the loose side of the
default for one setting that changes what a check can detect. Hypothesis draws the setting and
the value; the policy must load (it is a valid file) and the floor must refuse it, naming the
setting. Completeness: every setting of the default policy is either in the floor or listed,
with the reason, as one that cannot loosen the gate.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecgx.service.methods import METHOD_NAMES, get_method
from ecgx.validation.policy import (
    _SCHEMA,
    DEFAULT_POLICY_FILE,
    NOT_IN_FLOOR,
    POLICY_FLOOR,
    STRATEGIES,
    PolicyError,
    check_floor,
    default_policy,
    floor_violations,
    load_policy,
)

DEFAULTS = default_policy().content


def _value(key: str) -> Any:
    out: Any = DEFAULTS
    for part in key.split("."):
        out = out[part]
    return out


def _bounds(key: str) -> tuple[type, float | None, float | None] | None:
    section, name = key.rsplit(".", 1)
    return _SCHEMA.get(section, {}).get(name)


def _numbers(key: str, op: str) -> st.SearchStrategy:
    """Values of ``key`` the file accepts on the loose side of the default (``op`` is the
    floor's comparison: >= means smaller is looser)."""
    kind, low, high = _bounds(key)
    d = _value(key)
    if kind is int:
        low = -(10**6) if low is None else int(low)
        high = 10**6 if high is None else int(high)
        if op == ">=":
            return st.integers(low, d - 1)
        if op == "<=":
            return st.integers(d + 1, high)
        return st.integers(low, high).filter(lambda v: v != d)
    low = -1e6 if low is None else low
    high = 1e6 if high is None else high
    if op == ">=":
        return st.floats(low, d, exclude_max=True, allow_nan=False)
    if op == "<=":
        return st.floats(d, high, exclude_min=True, allow_nan=False)
    return st.floats(low, high, allow_nan=False).filter(lambda v: v != d)


def _may_differ() -> st.SearchStrategy:
    """A serving.may_differ entry that allows more than the default: a setting the default
    does not let differ, or a wider direction for one it does."""
    default = _value("serving.may_differ")
    options = []
    for method in METHOD_NAMES:
        for param in get_method(method).parameters():
            allowed = default.get(method, {}).get(param)
            if param == "seed" or allowed == "any":
                continue
            options += [(method, param, how) for how in ("any", "at_least", "at_most") if how != allowed]
    return st.sampled_from(options).map(lambda o: {o[0]: {**default.get(o[0], {}), o[1]: o[2]}})


def loosened(key: str) -> st.SearchStrategy:
    op = POLICY_FLOOR[key][0]
    d = _value(key)
    if isinstance(d, bool):
        return st.just(not d)
    if op == "superset":  # drop at least one default strategy, keep at least one of any
        return st.lists(st.sampled_from(STRATEGIES), min_size=1, unique=True).filter(
            lambda v: not set(d) <= set(v)
        )
    if op == "within":
        return _may_differ()
    return _numbers(key, op)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write(path: Path, key: str, value: Any) -> Path:
    section, name = key.rsplit(".", 1)
    if key == "serving.may_differ":
        body = "\n".join(f"{m} = {_toml(v)}" for m, v in value.items())
        path.write_text(f"[{key}]\n{body}\n")
    else:
        path.write_text(f"[{section}]\n{name} = {_toml(value)}\n")
    return path


@st.composite
def single_loosening(draw: st.DrawFn) -> tuple[str, Any]:
    key = draw(st.sampled_from(sorted(POLICY_FLOOR)))
    return key, draw(loosened(key))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=single_loosening())
def test_every_single_loosening_of_the_default_policy_is_not_servable(case, tmp_path: Path) -> None:
    key, value = case
    policy = load_policy(write(tmp_path / "loose.toml", key, value))  # a valid policy file
    problems = floor_violations(policy)
    assert len(problems) == 1 and problems[0].startswith(f"{key} = "), (key, value, problems)
    with pytest.raises(PolicyError, match="can never be served"):
        check_floor(policy)


def _leaves(table: dict, where: str = "") -> list[str]:
    out = []
    for k, v in table.items():
        name = f"{where}{k}"
        if isinstance(v, dict) and name != "serving.may_differ":
            out += _leaves(v, f"{name}.")
        else:
            out.append(name)
    return out


def test_every_setting_is_in_the_floor_or_said_to_be_unable_to_loosen_the_gate() -> None:
    keys = set(_leaves(tomllib.loads(DEFAULT_POLICY_FILE.read_text())))
    assert keys == set(POLICY_FLOOR) | set(NOT_IN_FLOOR)
    assert not set(POLICY_FLOOR) & set(NOT_IN_FLOOR)
    assert floor_violations(default_policy()) == []


@pytest.mark.parametrize("key", sorted(k for k, (op, *_) in POLICY_FLOOR.items() if op in (">=", "<=")))
def test_tightening_a_setting_keeps_the_report_servable(key: str, tmp_path: Path) -> None:
    """The floor is not a wall: a stricter value than the default is accepted."""
    op, d = POLICY_FLOOR[key][0], _value(key)
    kind, low, high = _bounds(key)
    step = 1 if kind is int else 0.01
    value = d + step if op == ">=" else d - step
    if (high is not None and value > high) or (low is not None and value < low) or not math.isfinite(value):
        pytest.skip(f"{key}'s default is at its bound")
    assert floor_violations(load_policy(write(tmp_path / "tight.toml", key, value))) == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('nosuch = { n_steps = "at_least" }', "serving.may_differ.nosuch: unknown method 'nosuch'"),
        (
            'smoothgrad = { n_steps = "at_least" }',
            "serving.may_differ.smoothgrad.n_steps: smoothgrad has no parameter",
        ),
        (
            'smoothgrad = { n_samples = "more" }',
            "serving.may_differ.smoothgrad.n_samples must be one of any, at_least",
        ),
        ('smoothgrad = "at_least"', "serving.may_differ.smoothgrad must be a table"),
    ],
)
def test_a_bad_may_differ_entry_is_a_policy_error_naming_the_key(
    line: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[serving.may_differ]\n{line}\n")
    with pytest.raises(PolicyError, match=message.replace(".", r"\.")):
        load_policy(path)


def test_may_differ_narrower_than_the_default_is_accepted_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "narrow.toml"
    path.write_text('[serving.may_differ]\nsmoothgrad = {}\nlime = { n_samples = "at_least" }\n')
    policy = load_policy(path)
    assert floor_violations(policy) == []
    from ecgx.validation.policy import may_differ

    assert may_differ(policy, "smoothgrad") == {"seed": "any"}  # the seed of a stochastic method always
    assert may_differ(policy, "integrated_gradients") == {"n_steps": "at_least"}  # the default kept
    assert may_differ(policy, "saliency") == {}
