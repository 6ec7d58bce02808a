"""User methods are for information only, everywhere (issue 26).

They never count towards min_passing, the headline, serve or another method's inter-method
score; the built-in verdicts are identical with and without them. During the gate a user
method sees only a narrow engine of the model under test, and its calls on the trained and
the changed models come in an order it cannot predict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ecgx.service.engine import AttributionEngine
from ecgx.service.methods import METHOD_NAMES
from ecgx.validation.gate import run_gate
from ecgx.validation.user_methods import GateEngine, run_user_methods

N_GATED = len(METHOD_NAMES) - 1  # every method but the random control

# Only the changed-model check blocks: on this small family occlusion passes it and saliency
# fails it (tests/conftest.py GATE_POLICY relies on the same split for gradcam and saliency).
POLICY = """
[gate]
ecgs = 32
allow_incomplete_data = true
[checks.randomisation]
ecgs = 8
draws = 2
blocking = false
[checks.perturbation]
blocking = false
bootstrap = 200
[checks.changed_model]
bootstrap = 200
"""


def occlusion(engine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """An honest user method: the built-in occlusion of the model it is given."""
    return engine.attribute("occlusion", x, target)


def input_magnitude(engine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.abs(x)


@pytest.fixture(scope="module")
def runs(trained_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    policy = tmp_path_factory.mktemp("isolation") / "policy.toml"
    policy.write_text(POLICY)

    def gate(user: dict) -> dict:
        return run_gate(
            trained_family["seed-0"],
            trained_family["data"],
            family=[trained_family["seed-1"]],
            policy=policy,
            methods=["saliency", *user],
            attributors=user,
            workers=1,
            show_progress=False,
            research=True,
        ).report

    return {"without": gate({}), "with": gate({"my_occlusion": occlusion, "my_input": input_magnitude})}


def test_a_passing_user_method_does_not_make_a_failing_gate_pass(runs: dict) -> None:
    report = runs["with"]
    assert report["user_methods"]["my_occlusion"]["verdict"] == "pass", report["user_methods"]["my_occlusion"]
    assert report["methods"]["saliency"]["verdict"] == "fail"
    # The case: nothing built-in passed, so the gate fails and serves nothing.
    assert report["verdict"] == "fail" and report["serve"] == [] and report["passed"] == []
    assert "0 method(s) passed; the policy needs at least 1" in report["reasons"]
    head = report["headline"].split(" User-supplied method(s) ")[0]
    assert "my_occlusion" not in head and "my_input" not in head and f"0 of {N_GATED} methods passed" in head


def test_built_in_verdicts_and_scores_are_identical_with_and_without_user_methods(runs: dict) -> None:
    without, with_user = runs["without"], runs["with"]
    assert with_user["methods"] == without["methods"]
    assert with_user["inter_method"] == without["inter_method"]
    for key in ("verdict", "reasons", "serve", "passed", "failed", "not_checked"):
        assert with_user[key] == without[key], key
    assert with_user["headline"].startswith(without["headline"])
    for name in ("ref:input", "ref:edges", "ref:class_template", "ref:constant", "ref:other_model"):
        assert with_user["references"][name] == without["references"][name], name


def test_user_methods_are_compared_with_the_built_in_methods_never_they_with_them(runs: dict) -> None:
    report = runs["with"]
    assert report["inter_method"]["methods"] == ["saliency", "random"]
    row = report["user_methods"]["my_occlusion"]["checks"]["inter_method"]["details"]["correlations"]
    assert set(row) == {"saliency"}
    assert set(
        report["methods"]["saliency"]["checks"]["inter_method"]["details"].get("correlations", {})
    ) <= {"random"}


def test_a_user_map_of_the_input_fails_like_the_reference_row(runs: dict) -> None:
    mine = runs["with"]["user_methods"]["my_input"]["checks"]
    reference = runs["with"]["references"]["ref:input"]["checks"]
    assert mine["changed_model"]["verdict"] == "fail"
    assert mine["changed_model"]["score"] == reference["changed_model"]["score"]


def test_the_narrow_engine_offers_the_model_and_nothing_that_names_the_package(tiny_package: Path) -> None:
    engine = AttributionEngine(tiny_package)
    narrow = GateEngine(engine)
    x = np.random.default_rng(0).standard_normal((2, 12, 600)).astype(np.float32)
    target = np.zeros(2, np.int64)
    np.testing.assert_array_equal(narrow.logits(x), engine.logits(x))
    np.testing.assert_array_equal(
        narrow.attribute("saliency", x, target), engine.attribute("saliency", x, target)
    )
    public = {n for n in dir(narrow) if not n.startswith("_")}
    assert public == {"attribute", "logits", "probabilities"}
    for name in ("package", "path", "manifest", "_parameters", "session"):
        assert not hasattr(narrow, name), name
    with pytest.raises(AttributeError):
        narrow.package = engine.package  # nothing can be hung on it either


def test_calls_come_in_an_order_the_method_cannot_predict(tiny_package: Path) -> None:
    """The trained model's call is not first, nor anywhere fixed: across runs the order changes,
    so 'the first model I see is the shipped one' is a guess."""
    engine = AttributionEngine(tiny_package)
    x = np.zeros((1, 12, 600), np.float32)
    target = np.zeros(1, np.int64)
    calls = [(("trained",), lambda: engine, x, target)] + [
        (("changed", k), lambda: engine, x + k, target) for k in range(1, 20)
    ]
    positions = []
    for _ in range(5):
        seen: list[float] = []

        def record(e, x, t, seen=seen):
            seen.append(float(x[0, 0, 0]))
            return np.abs(x)

        maps = run_user_methods({"m": record}, calls)
        assert set(maps) == {key for key, *_ in calls}  # every call, each map under its own key
        np.testing.assert_array_equal(maps[("changed", 3)]["m"], np.abs(x + 3))
        assert sorted(seen) == list(range(20))
        positions.append(seen.index(0.0))
    orders_differ = len(set(positions)) > 1
    assert orders_differ, positions  # 5 runs at the same place: chance 1 in 20**4
