"""The KubeRay manifests (deploy/k8s/ray/, issue #24): the RayCluster and the release-gate RayJob
validated against the KubeRay CRD schemas vendored in deploy/k8s/ray/schemas/ (jsonschema, with
strict field validation: an unknown field is refused), every pod template inside them and every
core manifest validated against Kubernetes' own schemas (kubernetes-validate), and the settings
checked against each other and against the release script.

No cluster is needed; each check is also shown to refuse a broken copy.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAY = ROOT / "deploy" / "k8s" / "ray"
SCHEMAS = RAY / "schemas"
SCRIPT = ROOT / "deploy" / "release" / "gate_and_publish.sh"
CLUSTER = RAY / "raycluster.yaml"
JOB = RAY / "rayjob-release-gate.yaml"
K8S_VERSIONS = ("1.30.0", "latest")
# The claims and config the release-gate Job uses (../release-gate-job.yaml): the RayJob uses the same.
RELEASE_JOB = ROOT / "deploy" / "k8s" / "release-gate-job.yaml"


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def ray_manifests() -> dict[str, list[dict]]:
    """deploy/k8s/ray/*.yaml (file name -> its documents), kustomization.yaml left out."""
    out = {}
    for path in sorted(RAY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


def crd_validator(kind: str):
    """A jsonschema validator for the vendored schema of ``kind`` (RayCluster or RayJob), the
    two schema files registered so that RayJob's references into RayCluster's resolve."""
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    resources = []
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], referencing.Resource.from_contents(schema)))
    registry = referencing.Registry().with_resources(resources)
    schema = json.loads((SCHEMAS / f"{kind.lower()}.ray.io-v1.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, template) for every core/v1 PodTemplateSpec a RayCluster or RayJob embeds."""
    if doc["kind"] == "RayJob":
        spec = doc["spec"]
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
        cluster, prefix = spec.get("rayClusterSpec"), "spec.rayClusterSpec"
    else:
        cluster, prefix = doc["spec"], "spec"
    if cluster is None:
        return
    yield f"{prefix}.headGroupSpec.template", cluster["headGroupSpec"]["template"]
    for k, group in enumerate(cluster.get("workerGroupSpecs", [])):
        yield f"{prefix}.workerGroupSpecs[{k}].template", group["template"]


def crd_errors(doc: dict) -> list[str]:
    """Every way ``doc`` breaks its CRD's schema or an embedded pod template breaks Kubernetes'."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')"
    )
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in crd_validator(doc["kind"]).iter_errors(doc)]
    for where, template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        for version in K8S_VERSIONS:
            v = kubernetes_validate.latest_version() if version == "latest" else version
            try:
                kubernetes_validate.validate(wrapped, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{where} (Kubernetes {v}): {e.message} at {list(e.path)}")
    return errors


# ------------------------------------------------------------------------------ schema validation


def test_the_vendored_schemas_name_their_kuberay_source() -> None:
    for kind in ("RayCluster", "RayJob"):
        schema = json.loads((SCHEMAS / f"{kind.lower()}.ray.io-v1.json").read_text())
        assert schema["properties"]["apiVersion"] == {"const": "ray.io/v1"}
        assert schema["properties"]["kind"] == {"const": kind}
        assert "ray-project/kuberay" in schema["description"] and "commit" in schema["description"]


@pytest.mark.parametrize("path", [CLUSTER, JOB], ids=["RayCluster", "RayJob"])
def test_the_kuberay_manifests_validate_against_the_crd_schemas(path: Path) -> None:
    (doc,) = ray_manifests()[path.name]
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc) == []
    assert len(list(pod_templates(doc))) >= 2


def test_the_core_manifests_validate_against_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for docs in ray_manifests().values():
        for doc in docs:
            if doc["apiVersion"].startswith("ray.io/"):
                continue  # the KubeRay CRDs: checked against the vendored schemas above
            for version in K8S_VERSIONS:
                v = kubernetes_validate.latest_version() if version == "latest" else version
                kubernetes_validate.validate(doc, v, strict=True)
                checked += 1
    assert checked >= 2  # networkpolicy.yaml, on two Kubernetes versions


def _set(doc: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value


def _rename(doc: dict, path: str, new: str) -> None:
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[new] = node.pop(last)


@pytest.mark.parametrize(
    ("path", "broken", "found"),
    [
        (CLUSTER, lambda d: _rename(d, "spec.workerGroupSpecs", "workerGroupSpec"), "workerGroupSpec"),
        (CLUSTER, lambda d: _set(d, "spec.workerGroupSpecs.0.replicas", "2"), "replicas"),
        (CLUSTER, lambda d: _rename(d, "spec.headGroupSpec.enableIngress", "enableIngres"), "enableIngres"),
        (CLUSTER, lambda d: _set(d, "spec.headGroupSpec.serviceType", "Public"), "serviceType"),
        (CLUSTER, lambda d: _set(d, "apiVersion", "ray.io/v1alpha1"), "apiVersion"),
        (
            CLUSTER,
            lambda d: _rename(d, "spec.workerGroupSpecs.0.template.spec.securityContext", "securityContex"),
            "workerGroupSpecs[0].template",
        ),
        (
            CLUSTER,
            lambda d: _set(d, "spec.headGroupSpec.template.spec.containers.0.resources.limits.cpu", []),
            "headGroupSpec.template",
        ),
        (JOB, lambda d: _rename(d, "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"), "shutdown"),
        (JOB, lambda d: _set(d, "spec.submissionMode", "K8sMode"), "submissionMode"),
        (JOB, lambda d: _set(d, "spec.backoffLimit", "0"), "backoffLimit"),
        (JOB, lambda d: _set(d, "spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", 2**31), "maxReplicas"),
        (
            JOB,
            lambda d: _rename(d, "spec.submitterPodTemplate.spec.restartPolicy", "restartPolicies"),
            "submitterPodTemplate",
        ),
    ],
    ids=[
        "misspelt worker groups",
        "replicas as string",
        "misspelt ingress flag",
        "unknown service type",
        "old api version",
        "misspelt pod field",
        "wrong resource type",
        "misspelt job field",
        "unknown submission mode",
        "backoff as string",
        "int32 overflow",
        "misspelt submitter field",
    ],
)
def test_a_wrong_field_or_type_in_a_manifest_copy_is_refused(path: Path, broken, found: str) -> None:
    doc = copy.deepcopy(load(path))
    broken(doc)
    errors = crd_errors(doc)
    assert errors, "the broken copy validated"
    assert any(found in e for e in errors), errors


# ------------------------------------------------------------------------------ what the manifests say


def _containers(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    for where, template in pod_templates(doc):
        for container in template["spec"]["containers"]:
            yield where, template["spec"], container


@pytest.mark.parametrize("path", [CLUSTER, JOB], ids=["RayCluster", "RayJob"])
def test_every_ray_pod_is_restricted_and_runs_the_ray_image(path: Path) -> None:
    doc = load(path)
    for where, pod, container in _containers(doc):
        assert container["image"] == "ecgx:ray", where  # the serving image ecgx:cpu has no Ray
        sc, psc = container["securityContext"], pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert pod["automountServiceAccountToken"] is False, where
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, where  # Ray's session folder on a read-only root
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["cpu"] and limits["memory"] and requests["cpu"] and requests["memory"], where


@pytest.mark.parametrize("path", [CLUSTER, JOB], ids=["RayCluster", "RayJob"])
def test_no_dashboard_or_head_service_is_exposed_outside_the_cluster(path: Path) -> None:
    doc = load(path)
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    assert cluster["enableInTreeAutoscaling"] is False  # no autoscaler sidecar with API access
    for _, pod, container in _containers(doc):
        for port in container.get("ports", []):
            assert "hostPort" not in port
        assert not pod.get("hostNetwork")


def test_every_node_mounts_the_candidates_read_only() -> None:
    for path in (CLUSTER, JOB):
        for where, pod, container in _containers(load(path)):
            if container["name"] == "ray-job-submitter":
                continue  # submits over HTTP, reads nothing
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            inputs = mounts["/inputs"]
            claim = volumes[inputs["name"]]["persistentVolumeClaim"]
            assert inputs["readOnly"] is True and claim["readOnly"] is True, where
            assert claim["claimName"] == "ecgx-release-inputs", where


def test_the_release_job_cluster_has_the_same_workers_as_the_raycluster() -> None:
    cluster, job = load(CLUSTER)["spec"], load(JOB)["spec"]["rayClusterSpec"]
    assert job["workerGroupSpecs"] == cluster["workerGroupSpecs"]
    assert job["rayVersion"] == cluster["rayVersion"]
    assert job["headGroupSpec"]["rayStartParams"] == cluster["headGroupSpec"]["rayStartParams"]


def test_the_ray_version_is_one_the_ray_extra_allows() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"ray\[data\]>=([\d.]+),<(\d+)"', pyproject).groups()
    version = tuple(int(x) for x in load(CLUSTER)["spec"]["rayVersion"].split("."))
    assert tuple(int(x) for x in low.split(".")) <= version < (int(high),)


def script_variables() -> set[str]:
    return set(re.findall(r"\$\{(ECGX_\w+)", SCRIPT.read_text()))


def test_the_release_rayjob_runs_the_release_script_on_ray_with_the_jobs_settings() -> None:
    job = load(JOB)
    spec = job["spec"]
    assert (job["kind"], spec["backoffLimit"], spec["submitterConfig"]["backoffLimit"]) == ("RayJob", 0, 0)
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    words = spec["entrypoint"].split()
    assert words[:2] == ["bash", "/opt/ecgx-release/gate_and_publish.sh"]
    assert words[words.index("--ray") + 1] == "auto"  # the driver joins the RayJob's own cluster
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    # Every setting is one the script reads, and the single-pod Job gives the same ones.
    assert set(env) - {"TMPDIR"} <= script_variables()
    single = load(RELEASE_JOB)["spec"]["template"]["spec"]
    single_env = {e["name"] for e in single["containers"][0]["env"]}
    assert set(env) - {"TMPDIR"} <= single_env
    # The entrypoint runs on the head: the script, the keys and the volumes are mounted there as
    # in the single-pod Job, the signing key from the same Secret, read-only.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    single_volumes = {v["name"]: v for v in single["volumes"]}
    assert mounts["/opt/ecgx-release"]["readOnly"] is True
    signing = mounts[str(Path(env["ECGX_GATE_SIGNING_KEY_FILE"]).parent)]
    assert signing["readOnly"] is True
    assert volumes[signing["name"]]["secret"] == single_volumes["signing-key"]["secret"]
    for name in ("models", "inputs", "artefacts", "gate-keys", "release-script"):
        assert volumes[name] == single_volumes[name], name
    for key in ("ECGX_CANDIDATE", "ECGX_VALIDATION_DATA"):
        assert env[key].startswith("/inputs/")
    assert env["ECGX_ARTEFACT_DIR"].startswith("/artefacts/") and env["ECGX_MODEL_REPOSITORY"] == "/models"
    # Only the head sees the signing key: the workers compute, they never sign.
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert not any("secret" in v for v in group["template"]["spec"]["volumes"])


def test_the_network_policy_admits_ray_pods_release_gates_and_the_operator_only() -> None:
    (policy,) = ray_manifests()["networkpolicy.yaml"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for path in (CLUSTER, JOB):
        for where, template in pod_templates(load(path)):
            labels = template["metadata"]["labels"]
            if where.endswith("submitterPodTemplate"):
                assert labels["app.kubernetes.io/component"] == "release-gate"
            else:
                assert selector.items() <= labels.items(), where
    sources = [rule["from"] for rule in policy["spec"]["ingress"]]
    assert all(src for src in sources)  # no rule admits everyone
    open_rules = [rule for rule in policy["spec"]["ingress"] if "ports" not in rule]
    assert [r["from"][0]["podSelector"]["matchLabels"] for r in open_rules] == [selector]


def test_the_kustomization_applies_the_cluster_and_its_policy_not_the_per_release_job() -> None:
    kustomization = load(RAY / "kustomization.yaml")
    assert kustomization["namespace"] == "ecgx"
    assert set(kustomization["resources"]) == {"raycluster.yaml", "networkpolicy.yaml"}
    assert set(ray_manifests()) == {*kustomization["resources"], JOB.name}


def test_the_probes_are_python_the_image_has_and_check_ray_health() -> None:
    """KubeRay's default probes run wget, which ecgx's image lacks: every Ray container brings its
    own, in Python, on the raylet's health endpoint (and the head's GCS one)."""
    for path in (CLUSTER, JOB):
        for where, _, container in _containers(load(path)):
            if container["name"] == "ray-job-submitter":
                continue
            for probe in ("readinessProbe", "livenessProbe"):
                command = container[probe]["exec"]["command"]
                assert command[:2] == ["python3", "-c"], where
                compile(command[2], f"{where} {probe}", "exec")  # a SyntaxError fails the test
                assert "/api/local_raylet_healthz" in command[2], where
                if container["name"] == "ray-head":
                    assert "/api/gcs_healthz" in command[2], where
