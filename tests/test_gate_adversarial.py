"""The gate against maps that must not pass: model-independent reference rows and constructed cheats.

A check that decides what is served is only as good as the maps it refuses. Each test
here builds a map that does not explain the gated model, and shows that under the
default policy's thresholds it fails a blocking check, with the reason.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from ecgx.core.package_reader import load_package
from ecgx.service.engine import AttributionEngine
from ecgx.validation.gate import run_gate
from ecgx.validation.references import PREFIX
from ecgx.validation.similarity import segment_sums

# The default policy's thresholds and settings; only the amount of work is smaller (the
# validation set has 64 ECGs).
POLICY = """
[gate]
ecgs = 64
[checks.randomisation]
ecgs = 16
"""
REFERENCES = {f"{PREFIX}{n}" for n in ("input", "edges", "constant", "unseeded_random", "other_model")}


def segment_sums_on_hashed_samples(inner):
    """A cheat: each lead x 50-sample segment's summed relevance moved onto one sample, picked by
    a hash of the model's logits. Per sample it looks model-dependent (the positions move when
    the weights do); per segment it is exactly ``inner``'s map, which perturbation ranks."""

    def attribute(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        maps = inner(engine, x, target)
        sums = segment_sums(maps, 50).reshape(len(x), x.shape[1], -1)
        out = np.zeros_like(maps)
        logits = engine.logits(x)
        for b in range(len(x)):
            digest = hashlib.sha256(logits[b].tobytes()).digest()
            offsets = np.frombuffer(digest * 8, np.uint8)[: sums.shape[1] * sums.shape[2]].astype(int) % 50
            for i, offset in enumerate(offsets):
                lead, window = divmod(i, sums.shape[2])
                out[b, lead, window * 50 + offset] = sums[b, lead, window]
        return out

    return attribute


def input_x_gradient(engine: AttributionEngine, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    return engine.attribute("input_x_gradient", x, target)


def another_models_occlusion(package: Path):
    """A cheat: occlusion computed on another seed's model, whatever model is gated."""
    other = AttributionEngine(load_package(package))
    return lambda engine, x, target: other.attribute("occlusion", x, target)


@pytest.fixture(scope="module")
def adversarial(trained_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    policy = tmp_path_factory.mktemp("adversarial") / "policy.toml"
    policy.write_text(POLICY)
    cheats = {
        "cheat:hashed_segment_sums": segment_sums_on_hashed_samples(input_x_gradient),
        "cheat:other_seed_occlusion": another_models_occlusion(trained_family["seed-1"]),
        "cheat:other_seed_hashed": segment_sums_on_hashed_samples(
            another_models_occlusion(trained_family["seed-1"])
        ),
    }
    run = run_gate(
        trained_family["seed-0"],
        trained_family["data"],
        policy=policy,
        methods=["saliency", "input_x_gradient", *cheats],
        attributors=cheats,
        workers=1,
        show_progress=False,
        research=True,
    )
    return run.report


def test_every_reference_row_fails_under_the_default_thresholds(adversarial: dict) -> None:
    refs = adversarial["references"]
    assert set(refs) == REFERENCES
    for name, row in refs.items():
        assert row["verdict"] == "fail", (name, row["reasons"])
        assert row["reasons"], name
    # They are shown beside the methods, never among them, and never served.
    assert not REFERENCES & set(adversarial["methods"])
    assert not REFERENCES & set(adversarial["serve"]) and not REFERENCES & set(adversarial["passed"])


def test_each_reference_row_fails_for_the_reason_it_should(adversarial: dict) -> None:
    refs = adversarial["references"]

    def randomisation(name: str) -> dict:
        return refs[f"{PREFIX}{name}"]["checks"]["randomisation"]

    # Weight-free maps do not change when the weights do.
    for name in ("input", "edges", "other_model"):
        final = randomisation(name)["details"]["criteria"]["final"]
        assert final["verdict"] == "fail" and final["score"] > 0.9, (name, final["summary"])
    # A constant map has no ranking: undefined, and undefined is a failure, not a change.
    constant = randomisation("constant")
    assert constant["verdict"] == "fail" and constant["score"] is None
    assert "undefined on 16 of 16 ECGs" in constant["summary"]
    # Fresh noise "changes" under randomisation, but no more than it changes by itself.
    noise = randomisation("unseeded_random")
    gap = noise["details"]["criteria"]["noise_floor_gap"]
    assert noise["details"]["criteria"]["final"]["verdict"] == "pass"
    assert gap["verdict"] == "fail" and gap["score"] < 0.1, gap["summary"]


def test_segment_sums_moved_to_hashed_samples_fail(adversarial: dict) -> None:
    """The issue's cheat: it 'changes' per sample, but per segment it is input x gradient's map,
    and its positions move under input noise as much as under randomisation."""
    row = adversarial["methods"]["cheat:hashed_segment_sums"]
    assert row["verdict"] == "fail"
    criteria = row["checks"]["randomisation"]["details"]["criteria"]
    assert criteria["noise_floor_gap"]["verdict"] == "fail", criteria["noise_floor_gap"]["summary"]


def test_another_seeds_map_fails_for_the_gated_model(adversarial: dict) -> None:
    for name in ("cheat:other_seed_occlusion", "cheat:other_seed_hashed"):
        row = adversarial["methods"][name]
        assert row["verdict"] == "fail", name
        assert row["checks"]["randomisation"]["verdict"] == "fail", name


def test_a_method_that_uses_the_model_is_not_failed_by_the_floor(adversarial: dict) -> None:
    """The floor is not a wall: saliency's maps depend on the weights, and the noise-floor and
    final criteria say so (its other criteria may still fail on this small model)."""
    criteria = adversarial["methods"]["saliency"]["checks"]["randomisation"]["details"]["criteria"]
    assert criteria["final"]["verdict"] == "pass", criteria["final"]["summary"]
    assert criteria["noise_floor_gap"]["verdict"] == "pass", criteria["noise_floor_gap"]["summary"]
