"""The policy floor, research mode, and what a research report may do (serve: no; verify: no),
and `ecgx gate verify`'s allow-list of policy hashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import assert_clean_failure, run_ecgx
from repo_helpers import make_package

from ecgx.core.signing import ALLOWED_POLICIES_ENV
from ecgx.service.repository import ModelRepository, PromotionRefused, promote
from ecgx.validation.gate import run_gate
from ecgx.validation.policy import (
    POLICY_FLOOR,
    PolicyError,
    check_floor,
    default_policy,
    floor_violations,
    load_policy,
)
from ecgx.validation.signing import allowed_policy_hashes

# (key, a value below the floor) for every key of the floor.
BELOW = {
    "gate.ecgs": "128",
    "gate.seed": "1",
    "gate.min_passing": "0",
    "gate.allow_incomplete_data": "true",
    "checks.randomisation.blocking": "false",
    "checks.randomisation.ecgs": "16",
    "checks.randomisation.draws": "2",
    "checks.randomisation.window": "1",
    "checks.randomisation.noise_scale": "0.5",
    "checks.randomisation.max_similarity": "0.6",
    "checks.randomisation.max_top_layer_similarity": "0.9",
    "checks.randomisation.max_curve_area": "0.7",
    "checks.randomisation.max_independent_similarity": "0.9",
    "checks.randomisation.min_noise_floor_gap": "0.05",
    "checks.randomisation.confidence": "0.9",
    "checks.randomisation.bootstrap": "500",
    "checks.perturbation.blocking": "false",
    "checks.perturbation.window": "25",
    "checks.perturbation.steps": "6",
    "checks.perturbation.strategies": '["zero", "lead_mean"]',
    "checks.perturbation.noise_scale": "2.0",
    "checks.perturbation.margin": "0.1",
    "checks.perturbation.confidence": "0.9",
    "checks.perturbation.bootstrap": "500",
    "checks.changed_model.blocking": "false",
    "checks.changed_model.ecgs": "32",
    "checks.changed_model.draws": "1",
    "checks.changed_model.margin": "-0.1",
    "checks.changed_model.confidence": "0.9",
    "checks.changed_model.bootstrap": "500",
    "serving.may_differ": 'smoothgrad = { stdev = "any" }',
}
SMALL = "[gate]\necgs = 8\nallow_incomplete_data = true\n[checks.randomisation]\necgs = 2\n"


def _policy(tmp_path: Path, key: str, value: str) -> Path:
    section, name = key.rsplit(".", 1)
    path = tmp_path / f"{key}.toml"
    if key == "serving.may_differ":  # a table of tables: the value is one method's line
        path.write_text(f"[{key}]\n{value}\n")
        return path
    path.write_text(f"[{section}]\n{name} = {value}\n")
    return path


def test_the_default_policy_meets_the_floor_and_the_floor_names_real_keys() -> None:
    assert floor_violations(default_policy()) == []
    assert set(BELOW) == set(POLICY_FLOOR)


@pytest.mark.parametrize("key", sorted(BELOW))
def test_each_key_below_the_floor_is_refused_with_the_floor_and_why(key: str, tmp_path: Path) -> None:
    policy = load_policy(_policy(tmp_path, key, BELOW[key]))
    why = POLICY_FLOOR[key][2]
    with pytest.raises(PolicyError) as e:
        check_floor(policy)
    message = str(e.value)
    assert f"{key} = " in message and why in message and "--research" in message
    assert "can never be served" in message
    assert check_floor(policy, research=True) == floor_violations(policy)


def test_the_gate_refuses_a_policy_below_the_floor_before_any_work(trained_family, tmp_path: Path) -> None:
    policy = tmp_path / "small.toml"
    policy.write_text(SMALL)
    result = run_ecgx(
        "validate",
        str(trained_family["seed-0"]),
        "--data",
        str(trained_family["data"]),
        "--policy",
        str(policy),
        "--unsigned",
    )
    assert_clean_failure(result, "is below the floor", "gate.ecgs = 8", "--research")
    assert not (trained_family["seed-0"] / "gate.json").exists()


@pytest.fixture(scope="module")
def research_run(trained_family, tmp_path_factory: pytest.TempPathFactory):
    policy = tmp_path_factory.mktemp("research") / "small.toml"
    policy.write_text(SMALL)
    return run_gate(
        trained_family["seed-0"],
        trained_family["data"],
        policy=policy,
        methods=["saliency"],
        research=True,
        workers=1,
        show_progress=False,
    )


def test_a_research_report_says_so_and_is_not_servable(research_run) -> None:
    report = research_run.report
    assert report["research"] is True and report["servable"] is False
    assert report["headline"].startswith("RESEARCH report, not servable")
    assert any("research mode: the policy is below the floor: gate.ecgs = 8" in w for w in report["warnings"])


def test_a_normal_report_is_servable_when_it_passed(gated) -> None:
    assert gated["report"]["servable"] is True and gated["report"]["research"] is False


def test_the_repository_never_serves_or_promotes_a_research_report(gated, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    make_package(gated, root / "ecg" / "1", research=True, servable=False)
    repo = ModelRepository(root, [gated["public"]])
    (version,) = repo.versions("ecg")
    assert not version.servable and "research report" in version.refusal
    ungated = ModelRepository(root, [gated["public"]], allow_ungated=True)
    (version,) = ungated.versions("ecg")
    assert version.servable and version.ungated and ungated.default_version("ecg") is None
    assert version.method_gate("gradcam").ungated
    pkg = make_package(gated, tmp_path / "pkg", research=True)
    with pytest.raises(PromotionRefused, match="research report"):
        promote(pkg, tmp_path / "other", "ecg", None, [gated["public"]])


def _verify(pkg: Path, public: Path, *extra: str, env: dict[str, str] | None = None):
    return run_ecgx("gate", "verify", str(pkg), "--public-key", str(public), *extra, env=env)


def test_gate_verify_accepts_only_allowed_policies(gated, tmp_path: Path) -> None:
    pkg = make_package(gated, tmp_path / "pkg")
    digest = gated["report"]["policy"]["sha256"]
    assert digest != default_policy().sha256
    result = _verify(pkg, gated["public_pem"], env={ALLOWED_POLICIES_ENV: ""})
    assert result.returncode == 1 and "is not on the allow-list" in result.stdout
    assert f"--allowed-policy {digest}" in result.stdout
    assert _verify(pkg, gated["public_pem"], "--allowed-policy", digest).returncode == 0
    listing = tmp_path / "allowed.txt"
    listing.write_text(f"# our policies\n{default_policy().sha256}\n{digest}  # the small one\n")
    assert _verify(pkg, gated["public_pem"], "--allowed-policies", str(listing)).returncode == 0
    assert (
        _verify(pkg, gated["public_pem"], env={ALLOWED_POLICIES_ENV: f"{'0' * 64},{digest}"}).returncode == 0
    )
    bad = _verify(pkg, gated["public_pem"], "--allowed-policy", "abc")
    assert_clean_failure(bad, "--allowed-policy: 'abc' is not a policy hash")


def test_without_an_allow_list_only_the_default_policy_is_accepted() -> None:
    assert allowed_policy_hashes(env={}) == {default_policy().sha256}


def test_gate_verify_fails_a_research_report_and_a_failed_verdict(gated, tmp_path: Path) -> None:
    digest = gated["report"]["policy"]["sha256"]
    research = make_package(gated, tmp_path / "research", research=True, servable=False)
    result = _verify(research, gated["public_pem"], "--allowed-policy", digest)
    assert result.returncode == 1 and "RESEARCH report" in result.stdout
    failed = make_package(gated, tmp_path / "failed", verdict="fail", servable=False)
    result = _verify(failed, gated["public_pem"], "--allowed-policy", digest)
    assert result.returncode == 1 and "the gate failed" in result.stdout
    report = json.loads((failed / "gate.json").read_text())
    assert report["verdict"] == "fail"
