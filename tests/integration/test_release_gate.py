"""The release gate (deploy/release/gate_and_publish.sh) run for real, its Kubernetes Job and the
example CI pipelines.

The script runs under bash as a pipeline would, with this environment's ``ecgx`` on PATH: a real
gate (ONNX Runtime, Ed25519 signatures) on the trained seed-0 package, a real ``ecgx gate verify``
and ``ecgx repo add``. A servable PASS needs the default policy's evidence (its floor: 256
ECGs) and a method that clears it, which the suite's small family cannot give (docs/gate.md): the
candidate is the demo's configuration trained on 8,000 beats from calibration seed 100, gated with
GradientSHAP, which passes on every calibration seed (about 2 min to train, 1 to gate).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import snapshot

from ecgx.core.signing import load_public_key, verify_gate
from ecgx.validation.policy import load_policy
from ecgx.validation.signing import generate_keypair

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "release" / "gate_and_publish.sh"
JOB = ROOT / "deploy" / "k8s" / "release-gate-job.yaml"
GITHUB = ROOT / "deploy" / "release" / "github-actions.example.yml"
GITLAB = ROOT / "deploy" / "release" / "gitlab-ci.example.yml"

# The default policy with GradientSHAP required (a stricter policy is still servable).
GATED = "gradient_shap"
PASSING = f'[gate]\nrequired_methods = ["{GATED}"]\n'
# No map can be that dissimilar from itself: every method fails randomisation, so the gate fails.
FAILING = PASSING + "[checks.randomisation]\nmax_similarity = -1.0\n"
TRAIN_BEATS, TRAIN_DATA_SEED, VALIDATION_SEED, MODEL_SEED = 8000, 2000, 3000, 100


def run_script(
    *args: str, env: dict[str, str] | None = None, clean_env: bool = False
) -> subprocess.CompletedProcess:
    """``bash gate_and_publish.sh ARGS`` with this interpreter's ``ecgx`` first on PATH.

    ``clean_env`` leaves out every ECGX_* variable of the caller's environment (a key in
    ECGX_GATE_SIGNING_KEY would otherwise change what is being tested)."""
    base = {k: v for k, v in os.environ.items() if not (clean_env and k.startswith("ECGX_"))}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**base, **(env or {})},
    )


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def context(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Keys, the two policies and folders for the script; no candidate (see ``candidate``)."""
    tmp = tmp_path_factory.mktemp("release")
    private, public = generate_keypair(tmp / "keys")
    (tmp / "pass.toml").write_text(PASSING)
    (tmp / "fail.toml").write_text(FAILING)
    return {
        "tmp": tmp,
        "private": private,
        "public": public,
        "pass": tmp / "pass.toml",
        "fail": tmp / "fail.toml",
        "pass_sha": load_policy(tmp / "pass.toml").sha256,
    }


@pytest.fixture(scope="module")
def candidate(release: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A package that can pass the default policy, read-only (the script must gate a copy), and
    validation data with enough ECGs of every class for it."""
    from ecgx.training.config import TrainConfig
    from ecgx.training.data.synth import synthesize_dataset
    from ecgx.training.export import export_checkpoint
    from ecgx.training.models import ModelConfig
    from ecgx.training.train import CHECKPOINT_FILE, seed_dir, train_run

    root = tmp_path_factory.mktemp("candidate")
    data = synthesize_dataset(root / "train", TRAIN_BEATS, TRAIN_DATA_SEED, show_progress=False)
    validation = synthesize_dataset(root / "validation", 384, VALIDATION_SEED, show_progress=False)
    train_run(data, [MODEL_SEED], root / "runs", ModelConfig(), TrainConfig(), show_progress=False)
    checkpoint = seed_dir(root / "runs", MODEL_SEED) / CHECKPOINT_FILE
    pkg = export_checkpoint(checkpoint, release["tmp"] / "candidates" / "ecg-candidate")
    for path in [pkg, *pkg.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return {"pkg": pkg, "data": validation}


def gate_args(release: dict[str, Any], candidate: dict[str, Path], policy: str, tmp: Path) -> list[str]:
    return [
        "--package",
        str(candidate["pkg"]),
        "--data",
        str(candidate["data"]),
        "--policy",
        str(release[policy]),
        "--signing-key",
        str(release["private"]),
        "--public-key",
        str(release["public"]),
        "--repo",
        str(tmp / "repo"),
        "--model",
        "ecg",
        "--artefacts",
        str(tmp / "artefacts"),
        "--methods",
        GATED,
        "--workers",
        "1",
    ]


@pytest.fixture(scope="module")
def published(release: dict[str, Any], candidate: dict[str, Path]) -> dict[str, Any]:
    """One passing run into an empty repository (its default version: 1)."""
    tmp = release["tmp"] / "published"
    before = snapshot(candidate["pkg"])
    result = run_script(*gate_args(release, candidate, "pass", tmp), clean_env=True)
    return {"result": result, "tmp": tmp, "before": before}


# ------------------------------------------------------------------------------ the script, for real


@pytest.mark.slow
def test_a_passing_gate_publishes_the_version_and_keeps_its_report(release, candidate, published) -> None:
    result, tmp = published["result"], published["tmp"]
    assert result.returncode == 0, context(result)
    version = tmp / "repo" / "ecg" / "1"
    assert last_line(result) == f"gate_and_publish.sh: PUBLISHED: {candidate['pkg']} as {version}"
    # The published version verifies as a server checks it: signed by the trusted key, every file
    # unchanged, the gate passed, the policy the run was given allowed, not a research report.
    check = verify_gate(version, load_public_key(release["public"]), allowed_policies=[release["pass_sha"]])
    assert check.ok and check.servable, check.problems
    # The artefact is that same signed report, with the logs of each step.
    artefacts = tmp / "artefacts"
    assert (artefacts / "gate.json").read_bytes() == (version / "gate.json").read_bytes()
    report = json.loads((artefacts / "gate.json").read_text())
    assert (
        report["verdict"] == "pass" and report["servable"] and report["signature"]["algorithm"] == "Ed25519"
    )
    assert report["policy"]["sha256"] == release["pass_sha"]
    assert "Gate verdict: PASS" in (artefacts / "validate.log").read_text()
    assert "signature valid" in (artefacts / "verify.log").read_text()
    assert (artefacts / "outcome.txt").read_text().startswith("PUBLISHED: ")
    # The candidate was gated in a copy: not one byte of it changed, no gate.json was added.
    assert snapshot(candidate["pkg"]) == published["before"]
    assert sorted(p.name for p in (tmp / "repo" / "ecg").iterdir()) == ["1"]  # no staging left behind


@pytest.mark.slow
def test_an_existing_version_is_refused_before_gating_and_replaced_only_when_asked(
    release, candidate, published
) -> None:
    assert published["result"].returncode == 0, context(published["result"])
    tmp = published["tmp"]
    repo = tmp / "repo"
    # The keys as the PEM text in ECGX_GATE_SIGNING_KEY / ECGX_GATE_PUBLIC_KEY (a CI secret), not files.
    args = [*gate_args(release, candidate, "pass", tmp), "--version", "1"]
    for option in ("--signing-key", "--public-key"):
        del args[args.index(option) : args.index(option) + 2]
    keys = {
        "ECGX_GATE_SIGNING_KEY": release["private"].read_text(),
        "ECGX_GATE_PUBLIC_KEY": release["public"].read_text(),
    }
    before = snapshot(repo)
    refused = run_script(*args, env=keys, clean_env=True)
    assert refused.returncode == 2, context(refused)
    assert "version" in last_line(refused) and "already exists" in last_line(refused)
    assert "--replace" in last_line(refused) and "Gate verdict" not in refused.stderr  # no gating
    assert snapshot(repo) == before

    old = (repo / "ecg" / "1" / "gate.json").read_bytes()
    replaced = run_script(*args, "--replace", env=keys, clean_env=True)
    assert replaced.returncode == 0, context(replaced)
    retired = [p for p in (repo / "ecg").iterdir() if p.name.startswith(".retired-1-")]
    assert len(retired) == 1 and (retired[0] / "gate.json").read_bytes() == old  # kept, never served
    new = json.loads((repo / "ecg" / "1" / "gate.json").read_text())
    assert new["verdict"] == "pass" and (repo / "ecg" / "1" / "gate.json").read_bytes() != old


def job_environment(tmp: Path) -> tuple[dict[str, str], list[str]]:
    """The release Job's container environment and arguments, with the container's paths mapped
    under ``tmp`` and Kubernetes' $(VAR) references expanded as the kubelet does."""
    container = yaml.safe_load(JOB.read_text())["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for item in container["env"]:
        value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), item["value"])
        for prefix in ("/inputs", "/models", "/artefacts", "/etc/ecgx", "/tmp"):
            if value == prefix or value.startswith(prefix + "/"):
                value = str(tmp / "root") + value
                break
        env[item["name"]] = value
    return env, list(container["args"])


@pytest.mark.slow
def test_a_failing_gate_fails_the_job_keeps_the_report_and_leaves_the_repository_untouched(
    release, candidate
) -> None:
    # Configured as the Kubernetes Job configures it (its environment), the gate policy added.
    tmp = release["tmp"] / "failing"
    env, args = job_environment(tmp)
    root = tmp / "root"
    shutil.copytree(candidate["pkg"].parent, root / "inputs" / "candidates")
    shutil.copytree(candidate["data"], root / "inputs" / "validation")
    (root / "etc" / "ecgx" / "signing").mkdir(parents=True)
    shutil.copy(release["private"], env["ECGX_GATE_SIGNING_KEY_FILE"])
    (root / "etc" / "ecgx" / "keys").mkdir()
    shutil.copy(release["public"], env["ECGX_GATE_PUBLIC_KEY_FILE"])
    (root / "tmp").mkdir()
    # A repository that already serves another model: the failed gate must not touch it.
    other = root / "models" / "other" / "1"
    other.mkdir(parents=True)
    (other / "keep.txt").write_text("served")
    before = snapshot(root / "models", root / "inputs")

    env.update(ECGX_GATE_POLICY=str(release["fail"]), ECGX_GATE_METHODS=GATED)
    result = run_script(*args, env=env, clean_env=True)

    assert result.returncode == 1, context(result)
    line = last_line(result)
    assert line.startswith("gate_and_publish.sh: GATE FAILED: "), context(result)
    assert f"required method {GATED} failed" in line and "repository untouched" in line
    assert snapshot(root / "models", root / "inputs") == before, "the repository or the candidate changed"
    artefacts = Path(env["ECGX_ARTEFACT_DIR"])
    assert artefacts == root / "artefacts" / "ecg-candidate"
    report = json.loads((artefacts / "gate.json").read_text())
    assert report["verdict"] == "fail" and not report["servable"]
    assert report["signature"]["algorithm"] == "Ed25519"  # the failing report is signed too
    assert (artefacts / "outcome.txt").read_text().startswith("GATE FAILED: ")
    assert not (artefacts / "publish.log").exists()  # ecgx repo add never ran
    assert not list((root / "tmp").glob("ecgx-gate.*"))  # the gated copy is gone


# ``ecgx ARGS`` in an installation that lacks the onnx package (the package reader needs it): a
# real ecgx that crashes with a traceback and exit status 1, as an image built without onnx did.
ECGX_WITHOUT_ONNX = """
import importlib.abc, sys

class _NoOnnx(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "onnx" or name.startswith("onnx."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, _NoOnnx())
from ecgx.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ecgx_crashing_is_an_error_not_a_gate_failure(release, candidate, tmp_path: Path) -> None:
    wrapper = tmp_path / "ecgx-without-onnx"
    (tmp_path / "ecgx_without_onnx.py").write_text(ECGX_WITHOUT_ONNX)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "ecgx_without_onnx.py"}" "$@"\n')
    wrapper.chmod(0o755)
    result = run_script(
        *gate_args(release, candidate, "pass", tmp_path), "--ecgx", str(wrapper), clean_env=True
    )
    assert result.returncode == 2, context(result)
    line = last_line(result)
    assert line.startswith("gate_and_publish.sh: ERROR: ecgx validate exited 1 without a verdict"), context(
        result
    )
    assert "No module named 'onnx'" in line and "repository untouched" in line
    assert not (tmp_path / "repo").exists() and not (tmp_path / "artefacts" / "gate.json").exists()
    assert (tmp_path / "artefacts" / "outcome.txt").read_text().startswith("ERROR: ")


# ------------------------------------------------------------------------------ bad usage, no gating


@pytest.fixture
def fake_candidate(tmp_path: Path) -> Path:
    """Enough of a package for the checks made before gating (they look for manifest.json)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "manifest.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    return pkg


def usage_args(tmp: Path, **change: str) -> list[str]:
    values = {
        "--package": str(tmp / "pkg"),
        "--data": str(tmp / "data"),
        "--repo": str(tmp / "repo"),
        "--model": "ecg",
        "--artefacts": str(tmp / "artefacts"),
        "--signing-key": str(tmp / "key.pem"),
        "--public-key": str(tmp / "key.pem"),
    }
    values.update(change)
    return [x for k, v in values.items() if v is not None for x in (k, v)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--repo": None}, "missing --repo"),
        ({"--model": None, "--signing-key": None}, "missing --model --signing-key"),
        ({"--package": "/nonexistent/pkg"}, "candidate package /nonexistent/pkg is not a folder"),
        ({"--data": "/nonexistent/data"}, "validation dataset /nonexistent/data is not a folder"),
        ({"--model": "../escape"}, "model name '../escape' is not a plain name"),
        ({"--version": "1/2"}, "version name '1/2' is not a plain name"),
        ({"--policy": "/nonexistent.toml"}, "policy /nonexistent.toml is not a file"),
        ({"--workers": "zero"}, "--workers must be a positive integer"),
        ({"--model": ""}, "--model needs a value"),
        ({"--bogus": "x"}, "unknown argument '--bogus'"),
        ({"--ray": "head:6379;id"}, "--ray must be auto, local or a cluster address"),
    ],
    ids=[
        "no repo",
        "two missing",
        "no package",
        "no data",
        "bad model",
        "bad version",
        "no policy",
        "bad workers",
        "empty value",
        "unknown",
        "bad ray address",
    ],
)
def test_bad_usage_exits_2_with_one_clear_line_and_touches_nothing(
    fake_candidate: Path, tmp_path: Path, change: dict[str, str | None], message: str
) -> None:
    before = snapshot(tmp_path)
    result = run_script(*usage_args(tmp_path, **change), clean_env=True)
    assert result.returncode == 2, context(result)
    assert last_line(result).startswith("gate_and_publish.sh: error: "), context(result)
    assert message in last_line(result) and "--help" in last_line(result)
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def test_an_existing_version_is_refused_before_any_work(fake_candidate: Path, tmp_path: Path) -> None:
    (tmp_path / "repo" / "ecg" / "3").mkdir(parents=True)
    before = snapshot(tmp_path)
    result = run_script(*usage_args(tmp_path, **{"--version": "3"}), clean_env=True)
    assert result.returncode == 2, context(result)
    assert f"version {tmp_path}/repo/ecg/3 already exists (pass --replace" in last_line(result)
    assert snapshot(tmp_path) == before


def test_artefacts_inside_the_repository_are_refused(fake_candidate: Path, tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    before = snapshot(tmp_path)
    result = run_script(
        *usage_args(tmp_path, **{"--artefacts": str(tmp_path / "repo" / "art")}), clean_env=True
    )
    assert result.returncode == 2, context(result)
    assert "artefact folder" in last_line(result) and "is inside the model repository" in last_line(result)
    assert snapshot(tmp_path) == before


def test_help_lists_every_setting_and_its_variable() -> None:
    result = run_script("--help", clean_env=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: gate_and_publish.sh")
    for option in (
        "--package",
        "--data",
        "--repo",
        "--model",
        "--artefacts",
        "--signing-key",
        "--public-key",
        "--version",
        "--policy",
        "--allowed-policy",
        "--replace",
        "--ray",
    ):
        assert option in result.stdout


# ------------------------------------------------------------------------------ the gate on Ray


def recording_ecgx(tmp: Path) -> tuple[Path, Path]:
    """A real ``ecgx`` behind a wrapper that first appends its arguments to a log (one call a line)."""
    log = tmp / "ecgx-calls.log"
    wrapper = tmp / "ecgx-recording"
    ecgx = Path(sys.executable).with_name("ecgx")
    wrapper.write_text(f'#!/bin/sh\necho "$*" >>"{log}"\nexec "{ecgx}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


@pytest.mark.parametrize("how", ["option", "environment"])
def test_ray_address_is_passed_to_ecgx_validate(fake_candidate: Path, tmp_path: Path, how: str) -> None:
    wrapper, log = recording_ecgx(tmp_path)
    args = [*usage_args(tmp_path), "--ecgx", str(wrapper)]
    env = {}
    if how == "option":
        args += ["--ray", "ray://head-svc.ecgx.svc:10001"]
    else:
        env["ECGX_RAY_ADDRESS"] = "ray://head-svc.ecgx.svc:10001"
    result = run_script(*args, env=env, clean_env=True)
    # The fake candidate cannot be gated: ecgx validate stops without a verdict (exit 2, ERROR).
    assert result.returncode == 2 and "ERROR" in last_line(result), context(result)
    assert "on Ray (ray://head-svc.ecgx.svc:10001)" in result.stderr
    (call,) = [line.split() for line in log.read_text().splitlines() if line.startswith("validate ")]
    assert call[call.index("--ray") + 1] == "ray://head-svc.ecgx.svc:10001", call
    assert not (tmp_path / "repo").exists()


def gate_numbers(report: dict[str, Any]) -> str:
    """What a gate computed, without what differs between two runs (time, timings, the package's
    scratch path, the unseeded reference row, and the execution backend the Ray report records)."""
    keep = ("verdict", "serve", "passed", "failed", "not_checked", "methods", "inter_method", "data")
    r = {k: report[k] for k in keep}
    r["data"] = {k: v for k, v in r["data"].items() if k != "path"}
    r["references"] = {k: v for k, v in report["references"].items() if k != "ref:unseeded_random"}
    return json.dumps(r, sort_keys=True)


@pytest.mark.slow
def test_the_gate_submitted_to_a_ray_cluster_publishes_the_same_numbers(
    release, candidate, published
) -> None:
    """--ray ADDRESS against a local Ray head (tests/ray_helpers.py), as the RayJob's --ray auto
    joins its own cluster: the same verdict and numbers as the local run, published the same way."""
    assert published["result"].returncode == 0, context(published["result"])
    helper = subprocess.run(["ecgx", "validate", "--help"], capture_output=True, text=True, timeout=120)
    if "--ray" not in helper.stdout:
        pytest.skip("this ecgx has no `validate --ray` (issue #24's backend)")
    pytest.importorskip("ray")
    from ray_helpers import local_ray_cluster

    tmp = release["tmp"] / "on-ray"
    with local_ray_cluster() as cluster:
        result = run_script(
            *gate_args(release, candidate, "pass", tmp), "--ray", cluster.address, clean_env=True
        )
    assert result.returncode == 0, context(result)
    assert last_line(result).startswith("gate_and_publish.sh: PUBLISHED: ")
    on_ray = json.loads((tmp / "repo" / "ecg" / "1" / "gate.json").read_text())
    local = json.loads((published["tmp"] / "artefacts" / "gate.json").read_text())
    assert gate_numbers(on_ray) == gate_numbers(local)
    check = verify_gate(
        tmp / "repo" / "ecg" / "1", load_public_key(release["public"]), allowed_policies=[release["pass_sha"]]
    )
    assert check.ok and check.servable, check.problems


def script_variables() -> set[str]:
    """The ECGX_* variables the script reads (its own and those ecgx itself reads)."""
    return set(re.findall(r"\$\{(ECGX_\w+)", SCRIPT.read_text()))


# ------------------------------------------------------------------------------ the Kubernetes Job


def test_the_job_manifest_validates_against_kubernetes_1_30() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (PyPI) is not installed: pip install -e '.[dev]'"
    )
    data = yaml.safe_load(JOB.read_text())
    kubernetes_validate.validate(data, "1.30", strict=True)
    # And the check itself catches a misspelt field (strict mode) in this document.
    data["spec"]["backofLimit"] = data["spec"].pop("backoffLimit")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(data, "1.30", strict=True)


def test_the_job_runs_the_script_once_with_the_repository_writable_only_here() -> None:
    job = yaml.safe_load(JOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "ecgx:cpu"
    assert container["command"][-1].endswith("gate_and_publish.sh")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    # Every setting the Job gives is one the script reads.
    assert set(env) - {"RELEASE_CANDIDATE", "TMPDIR", "HOME", "MPLCONFIGDIR"} <= script_variables()
    # The signing key comes from a Secret; the repository is mounted read-write (in this Job only:
    # deployment.yaml mounts the same claim read-only); candidate and data are read-only.
    signing = mounts[str(Path(env["ECGX_GATE_SIGNING_KEY_FILE"]).parent)]
    assert "secret" in volumes[signing["name"]] and signing["readOnly"] is True
    repo = mounts[env["ECGX_MODEL_REPOSITORY"]]
    assert not repo.get("readOnly") and not volumes[repo["name"]]["persistentVolumeClaim"].get("readOnly")
    inputs = mounts["/inputs"]
    assert env["ECGX_CANDIDATE"].startswith("/inputs/") and env["ECGX_VALIDATION_DATA"].startswith("/inputs/")
    assert inputs["readOnly"] is True and volumes[inputs["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert env["ECGX_ARTEFACT_DIR"].split("/")[1] in {m.strip("/").split("/")[0] for m in mounts}


# ------------------------------------------------------------------------------ the example pipelines


def schema_check(path: Path, schema: str) -> None:
    """The pipeline against the schema check-jsonschema vendors (SchemaStore's), when installed."""
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        pytest.skip("check-jsonschema (PyPI) is not installed: pip install -e '.[dev]'")
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", f"vendor.{schema}", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_github_actions_example_is_a_valid_workflow_that_keeps_the_report_on_failure() -> None:
    workflow = yaml.safe_load(GITHUB.read_text())
    # PyYAML reads the key `on` as True (YAML 1.1); GitHub reads it as "on".
    assert "workflow_dispatch" in workflow[True]
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    runs = [i for i, s in enumerate(steps) if "gate_and_publish.sh" in s.get("run", "")]
    uploads = [i for i, s in enumerate(steps) if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert len(runs) == 1 and len(uploads) == 1 and uploads[0] > runs[0]
    upload = steps[uploads[0]]
    assert "always()" in upload["if"] and upload["with"]["path"].rstrip("/") == "gate-artefacts"
    assert job["env"]["ECGX_ARTEFACT_DIR"].endswith("/gate-artefacts")
    assert "continue-on-error" not in job and "continue-on-error" not in steps[runs[0]]  # a fail fails
    assert any(s.get("run", "").startswith("python -m pip install .") for s in steps)
    variables = set(job["env"]) | set(steps[runs[0]].get("env", {}))
    assert {v for v in variables if v.startswith("ECGX_")} <= script_variables() | {
        "ECGX_GATE_SIGNING_KEY",
        "ECGX_GATE_PUBLIC_KEY",
        "ECGX_ALLOWED_POLICIES",
    }
    schema_check(GITHUB, "github-workflows")


def test_the_gitlab_example_is_a_valid_pipeline_that_keeps_the_report_on_failure() -> None:
    pipeline = yaml.safe_load(GITLAB.read_text())
    job = pipeline["release-gate"]
    assert job["stage"] in pipeline["stages"]
    assert job["artifacts"]["when"] == "always" and job["artifacts"]["paths"] == ["gate-artefacts/"]
    assert job["variables"]["ECGX_ARTEFACT_DIR"].endswith("/gate-artefacts")
    assert "allow_failure" not in job  # a failed gate fails the pipeline
    assert any("gate_and_publish.sh" in line for line in job["script"])
    assert any(line.startswith("python -m pip install .") for line in job["script"])
    assert set(job["variables"]) <= script_variables()
    schema_check(GITLAB, "gitlab-ci")
