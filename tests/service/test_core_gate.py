"""A gate verdict covers the settings it checked, on every protocol (issue 19): one rule in the
serving core (``settings_violation``), over real loopback channels on ecgx.v1 and the OIP.

Before the serving core, the OIP computed ``method=lrp, composite=epsilon_plus`` on a version whose
gate checked only lrp's default rule and returned it with ``ungated=false``; ecgx.v1 refused it.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from core_helpers import (
    IG_CHECKED_STEPS,
    CoreServer,
    attribution_of,
    beats_of,
    failure,
    make_core_repo,
    param,
)
from hypothesis import given
from hypothesis import strategies as st

from ecgx.service.core import settings_violation
from ecgx.service.repository import MethodSettings, method_settings

FAILED = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def root(gated, tmp_path_factory):
    return make_core_repo(gated, tmp_path_factory.mktemp("core_gate") / "repo")


@pytest.fixture(scope="module")
def server(root, gated):
    s = CoreServer(root, gated["public"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def research(root, gated):
    s = CoreServer(root, gated["public"], allow_ungated=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def beats(gated):
    return beats_of(gated, 2)


def test_the_oip_lrp_composite_bypass_is_failed_precondition_as_on_ecgx_v1(server, beats) -> None:
    asked = {"composite": "epsilon_plus"}
    code, oip = failure(lambda: server.infer(beats, {"method": "lrp", "parameters": json.dumps(asked)}))
    assert code == FAILED, oip
    assert "composite='epsilon_plus'" in oip and "the gate checked composite='epsilon'" in oip
    code, v1 = failure(lambda: server.explain(beats, ["lrp"], {"lrp": asked}))
    assert code == FAILED and v1 == oip  # one core, one message
    # The rule the gate checked is served on both, gated.
    r = server.infer(beats, {"method": "lrp"})
    assert (
        param(r, "ungated") is False
        and json.loads(param(r, "effective_parameters"))["composite"] == "epsilon"
    )
    assert not server.explain(beats, ["lrp"]).attributions[0].gate.ungated


def test_settings_in_the_declared_safe_direction_are_served_on_both_protocols(server, beats) -> None:
    more = IG_CHECKED_STEPS * 2
    v1 = server.explain(beats, ["integrated_gradients"], {"integrated_gradients": {"n_steps": more}})
    assert not v1.research_mode and not v1.attributions[0].gate.ungated
    assert json.loads(v1.attributions[0].effective_parameters_json)["n_steps"] == more
    r = server.infer(beats, {"method": "integrated_gradients", "parameters": json.dumps({"n_steps": more})})
    assert param(r, "ungated") is False
    expected = np.stack([a.attribution.data for a in v1.attributions])
    assert attribution_of(r).tobytes() == expected.tobytes()  # the same numbers, bit for bit


def test_fewer_steps_than_checked_are_refused_naming_setting_value_and_check(server, beats) -> None:
    fewer = {"n_steps": IG_CHECKED_STEPS - 4}
    code, v1 = failure(
        lambda: server.explain(beats, ["integrated_gradients"], {"integrated_gradients": fewer})
    )
    assert code == FAILED
    assert f"n_steps={IG_CHECKED_STEPS - 4}" in v1 and f"checked n_steps={IG_CHECKED_STEPS}" in v1
    assert "at least that" in v1
    ig = {"method": "integrated_gradients", "parameters": json.dumps(fewer)}
    assert failure(lambda: server.infer(beats, ig)) == (FAILED, v1)


def test_a_setting_not_given_runs_as_the_gate_checked_it(server, beats) -> None:
    """Not the method's default (50 steps): the verdict covers 8."""
    v1 = server.explain(beats, ["integrated_gradients"])
    assert json.loads(v1.attributions[0].effective_parameters_json)["n_steps"] == IG_CHECKED_STEPS
    r = server.infer(beats, {"method": "integrated_gradients"})
    assert json.loads(param(r, "effective_parameters"))["n_steps"] == IG_CHECKED_STEPS


def test_a_report_without_settings_covers_the_defaults_only(server, beats) -> None:
    code, msg = failure(lambda: server.explain(beats, ["gradcam"], {"gradcam": {"relu": False}}))
    assert code == FAILED and "relu=false" in msg and "checked relu=true" in msg
    assert (
        failure(lambda: server.infer(beats, {"method": "gradcam", "parameters": '{"relu": false}'}))[0]
        == FAILED
    )
    assert server.explain(beats, ["gradcam"], {"gradcam": {"relu": True}}).attributions  # the checked value


def test_a_stochastic_methods_seed_is_always_free(server, beats) -> None:
    r = server.explain(beats[:1], ["kernel_shap"], {"kernel_shap": {"seed": 7, "n_samples": 20}})
    effective = json.loads(r.attributions[0].effective_parameters_json)
    assert effective["seed"] == 7 and effective["n_samples"] == 20 and not r.research_mode


def test_research_mode_serves_uncovered_settings_marked_ungated_on_both(research, beats) -> None:
    asked = {"composite": "epsilon_plus"}
    v1 = research.explain(beats, ["lrp"], {"lrp": asked})
    assert v1.research_mode and v1.attributions[0].gate.ungated
    r = research.infer(beats, {"method": "lrp", "parameters": json.dumps(asked)})
    assert param(r, "ungated") is True
    assert attribution_of(r).tobytes() == np.stack([a.attribution.data for a in v1.attributions]).tobytes()


def test_bad_values_are_invalid_argument_before_the_gate_is_asked(server, beats) -> None:
    code, msg = failure(
        lambda: server.explain(beats, ["integrated_gradients"], {"integrated_gradients": {"n_steps": 0}})
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "n_steps" in msg


# ------------------------------------------------------------------------------ the rule itself

DIRECTIONS = st.sampled_from([None, "any", "at_least", "at_most"])


@given(checked=st.integers(1, 10_000), asked=st.integers(-10, 20_000), direction=DIRECTIONS)
def test_the_rule_for_numbers(checked: int, asked: int, direction: str | None) -> None:
    rules = MethodSettings({"n": checked}, {"n": direction} if direction else {})
    allowed = (
        asked == checked
        or direction == "any"
        or (direction == "at_least" and asked >= checked)
        or (direction == "at_most" and asked <= checked)
    )
    assert (settings_violation("m", {"n": asked}, rules) is None) == allowed
    assert settings_violation("m", {}, rules) is None  # nothing asked: the checked value runs


@given(asked=st.one_of(st.booleans(), st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=3)))
def test_the_rule_never_orders_what_is_not_a_number(asked) -> None:
    rules = MethodSettings({"n": 8}, {"n": "at_least"})
    assert settings_violation("m", {"n": asked}, rules) is not None  # True is not 1, "9" is not 9


def test_a_report_signed_before_settings_covers_defaults_and_a_free_seed() -> None:
    s = method_settings("smoothgrad", {"verdict": "pass", "checks": {}})
    assert s.checked["n_samples"] == 20 and "seed" not in s.checked and s.may_differ == {"seed": "any"}
    odd = method_settings("saliency", {"settings": {"checked": {}, "may_differ": {"abs": "sideways"}}})
    assert odd.may_differ == {}  # a direction this server does not know frees nothing
