"""The deployment's configuration files (deploy/): Prometheus' config and alert rules checked and
unit-tested with promtool, the Kubernetes manifests validated against the Kubernetes schemas
(kubernetes-validate) and against each other, the compose file's references, and the Grafana
dashboard's and the alerts' queries checked against the metric families a live
:class:`ecgx.service.metrics.ServiceMetrics` registry exports.

promtool comes from Debian's prometheus package (.ci/run installs it); where it is missing those
tests skip and say so. The Prometheus server itself runs in tests/integration/test_prometheus_integration.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ecgx.service.metrics import ServiceMetrics
from ecgx.service.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ecgx.json"
PROMTOOL = shutil.which("promtool")
KUBECTL = shutil.which("kubectl")
NO_PROMTOOL = "promtool is not installed (Debian: apt-get install prometheus; CI installs it)"
# The oldest Kubernetes minor still commonly in service, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "latest")
# Manifests in deploy/k8s/ that kustomization.yaml does not apply, and why.
NOT_APPLIED = {
    "secrets.example.yaml": "the shape of the Secrets and ConfigMap, created by the operator",
    "release-gate-job.yaml": "run once per release, not with the server",
    "release-pvcs.yaml": "the release Job's input and artefact volumes, used by the Job alone",
}
ALERTS = {
    "EcgxAuditLogUnwritable",
    "EcgxMetricsDown",
    "EcgxMetricsAbsent",
    "EcgxHighErrorRate",
    "EcgxPredictLatencyHigh",
    "EcgxExplainLatencyHigh",
    "EcgxGateReportFailsToVerify",
    "EcgxModelVersionRefused",
    "EcgxModelNotServing",
    "EcgxRepositoryReloadFailed",
    "EcgxAttributionStabilityBelowGateBaseline",
    "EcgxStabilitySamplesDropped",
    "EcgxStabilitySampleErrors",
}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess:
    if PROMTOOL is None:
        pytest.skip(NO_PROMTOOL)
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def manifests() -> dict[str, list[dict]]:
    """deploy/k8s/*.yaml (file name -> its documents), kustomization.yaml left out."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


def applied() -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest, for what kustomization.yaml applies."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    out = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


# ---------------------------------------------------------------------------- exported metrics


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name the service can export, from a live ServiceMetrics registry's families
    (a histogram family ``x`` exports ``x_bucket``, ``x_sum``, ``x_count``, ``x_created``)."""
    from ecgx.core.signing import load_public_key
    from ecgx.validation.signing import generate_keypair

    tmp = tmp_path_factory.mktemp("exported")
    _, public = generate_keypair(tmp / "keys")
    (tmp / "repo").mkdir()
    metrics = ServiceMetrics(ModelRepository(tmp / "repo", [load_public_key(public)]), stability_share=0.0)
    families = list(metrics.registry.collect())
    assert len(families) == 29 and all(f.name.startswith("ecgx_") for f in families)
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names = set()
    for fam in families:
        names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
    return names


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS |= {"offset", "bool", "inf", "nan", "le"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left after label matchers, grouping
    lists, ranges, function calls, keywords and numbers are taken out."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b[a-zA-Z_][a-zA-Z0-9_]*\s*\(", "(", text)  # function names
    idents = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {i for i in idents if i.lower() not in _KEYWORDS}


def test_metric_names_finds_what_a_query_reads() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (rpc, le) (rate(ecgx_request_duration_seconds_bucket{rpc=~"a|b"}'
        "[5m]))) > on (model) group_left ecgx_gate_method_passed and up offset 5m unless nope_total"
    )
    assert metric_names(expr) == {
        "ecgx_request_duration_seconds_bucket",
        "ecgx_gate_method_passed",
        "up",
        "nope_total",
    }


# ------------------------------------------------------------------------------------- Prometheus


def test_prometheus_config_passes_promtool() -> None:
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout + r.stderr


def test_alert_rules_pass_promtool_and_cover_every_issue() -> None:
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    rules = [rule for g in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for rule in g["rules"]]
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_alert_fires_in_the_promtool_unit_tests_and_none_on_a_healthy_service() -> None:
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    tests = load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == ALERTS
    # The first case is a healthy service: every alert is evaluated there and expected silent.
    healthy = tests[0]["alert_rule_test"]
    assert {t["alertname"] for t in healthy} == ALERTS and not any(t["exp_alerts"] for t in healthy)


def test_the_unit_tests_fail_when_an_alert_is_broken(tmp_path) -> None:
    """promtool test rules is not vacuous: a threshold moved out of reach makes it fail."""
    rules = (PROMETHEUS / "alerts.yml").read_text()
    broken = rules.replace("            > 0.05\n", "            > 0.5\n")
    assert broken != rules
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    r = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert r.returncode != 0 and "EcgxHighErrorRate" in r.stdout + r.stderr, r.stdout + r.stderr


def test_alert_queries_read_only_metrics_the_service_exports(exported) -> None:
    for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            names = metric_names(rule["expr"])
            assert names, rule["alert"]
            unknown = names - exported - {"up"}  # up: Prometheus' own, per scraped target
            assert not unknown, f"{rule['alert']} reads {sorted(unknown)}, which the service does not export"


def test_prometheus_scrapes_the_metrics_port_and_loads_the_rules() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "ecgx"  # the job label EcgxMetricsDown matches
    assert job["static_configs"][0]["targets"] == ["ecgx:9464"]


# --------------------------------------------------------------------------------------- Grafana


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, Grafana's interval variables replaced."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"\$__(rate_)?interval|\$__range", "5m", target["expr"])
            out.append((panel["title"], expr))
    return out


def test_dashboard_loads_and_has_the_panels_asked_for() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "ecgx" and board["panels"]
    titles = " | ".join(p["title"] for p in board["panels"]).lower()
    for wanted in ("request rate", "errors by code", "latency p50 / p95 by method", "gate verdicts"):
        assert wanted in titles
    assert "stability vs the gate baseline" in titles and "dropped" in titles
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]


def test_every_dashboard_query_names_only_exported_metrics(exported) -> None:
    queries = dashboard_queries()
    read = set()
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: {expr}"
        assert names <= exported, f"panel {title!r} reads {sorted(names - exported)}: not exported"
        read |= names
    # The panels asked for read what they are about.
    for name in (
        "ecgx_requests_total",
        "ecgx_request_duration_seconds_bucket",
        "ecgx_gate_method_passed",
        "ecgx_attribution_stability_bucket",
        "ecgx_attribution_stability_gate_baseline",
        "ecgx_stability_samples_dropped_total",
    ):
        assert name in read, name


def test_every_dashboard_query_is_valid_promql(tmp_path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:q{k}", "expr": e} for k, (_, e) in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    r = promtool("check", "rules", str(tmp_path / "dashboard.yml"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "ecgx.yml")["providers"][0]
    compose = load_yaml(DEPLOY / "compose.yaml")
    mounts = dict(_bind(v) for v in compose["services"]["grafana"]["volumes"] if _bind(v))
    assert mounts[provider["options"]["path"]] == (DEPLOY / "grafana" / "dashboards").resolve()
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]


# --------------------------------------------------------------------------------------- compose


def _bind(volume: str) -> tuple[str, Path] | None:
    """(container path, host path) of a relative bind mount; None for named volumes and ${VARS}."""
    source, target = volume.split(":")[:2]
    if not source.startswith("."):
        return None
    return target, (DEPLOY / source).resolve()


def test_compose_parses_and_references_files_that_exist() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"ecgx", "prometheus", "grafana"}
    build = services["ecgx"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), build
    assert services["ecgx"]["image"] == "ecgx:cpu"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            bind = _bind(volume)
            if bind is not None:
                assert bind[1].exists(), f"{name}: {volume} names a path that does not exist"
            elif not volume.startswith("${"):
                assert volume.split(":")[0] in compose.get("volumes", {}), f"{name}: {volume}"
    # The model repository is mounted read-only at /models; the gRPC and metrics ports.
    ecgx_volumes = services["ecgx"]["volumes"]
    assert any(v.rsplit(":", 2)[1:] == ["/models", "ro"] for v in ecgx_volumes), ecgx_volumes
    assert "127.0.0.1:50051:50051" in services["ecgx"]["ports"] and "9464" in services["ecgx"]["expose"]
    prometheus = dict(_bind(v) for v in services["prometheus"]["volumes"] if _bind(v))
    assert prometheus["/etc/prometheus/prometheus.yml"] == PROMETHEUS / "prometheus.yml"
    assert prometheus["/etc/prometheus/alerts.yml"] == PROMETHEUS / "alerts.yml"


# ------------------------------------------------------------------------------------ Kubernetes


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')"
    )
    checked = 0
    for name, docs in manifests().items():
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # the Prometheus Operator's CRDs: their schemas are not in kubernetes-validate
            for version in K8S_VERSIONS:
                v = kubernetes_validate.latest_version() if version == "latest" else version
                try:
                    kubernetes_validate.validate(doc, v, strict=True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{name} {doc['kind']} (Kubernetes {v}): {e.message} at {list(e.path)}")
                checked += 1
    assert checked >= 2 * 10


def test_the_schema_validation_catches_a_misspelt_field() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')"
    )
    (deployment,) = manifests()["deployment.yaml"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    assert listed == set(manifests()) - set(NOT_APPLIED)
    kinds = {kind for kind, _ in applied()}
    assert kinds >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "ServiceMonitor",
        "PrometheusRule",
    }


def test_kustomize_builds_the_manifests() -> None:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (it builds kustomizations offline: kubectl kustomize)")
    r = subprocess.run([KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    built = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == set(applied())
    namespace = load_yaml(K8S / "kustomization.yaml")["namespace"]
    assert all(d["metadata"].get("namespace") == namespace for d in built if d["kind"] != "Namespace")


def test_the_deployment_serves_from_read_only_mounts_with_secrets_and_probes() -> None:
    objects = applied()
    deployment = objects[("Deployment", "ecgx")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def volume_at(path: str) -> dict:
        assert mounts[path].get("readOnly") is True, path
        return volumes[mounts[path]["name"]]

    # Where the image's entrypoint looks (deploy/docker/entrypoint.sh) and the image's serve.toml.
    entrypoint = (DEPLOY / "docker" / "entrypoint.sh").read_text()
    serve_toml = (DEPLOY / "docker" / "serve.toml").read_text()
    assert 'repo = "/models"' in serve_toml and "open_health = true" in serve_toml
    for path in ("/etc/ecgx/keys", "/etc/ecgx/tls", "/etc/ecgx/access"):
        assert path + "/" in entrypoint, path
    models = volume_at("/models")["persistentVolumeClaim"]
    assert models["readOnly"] is True and ("PersistentVolumeClaim", models["claimName"]) in objects
    tls, access = volume_at("/etc/ecgx/tls")["secret"], volume_at("/etc/ecgx/access")["secret"]
    keys = volume_at("/etc/ecgx/keys")["configMap"]
    # Secret files readable by the server's group only: ecgx serve warns about (and, for the
    # access file, refuses) files others can read or write.
    assert tls["defaultMode"] == access["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"]
    examples = {(d["kind"], d["metadata"]["name"]): d for d in manifests()["secrets.example.yaml"]}
    assert set(examples["Secret", tls["secretName"]]["stringData"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert set(examples["Secret", access["secretName"]]["stringData"]) == {"access.toml"}
    assert all(k.endswith(".pem") for k in examples["ConfigMap", keys["name"]]["data"])
    # Non-root on a read-only root file system, as the image's user.
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    uid = pod["securityContext"]["runAsUser"]
    assert f"USER {uid}:" in dockerfile and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Requests and limits; the probes run the image's gRPC health check (the kubelet's own grpc
    # probe cannot speak TLS).
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and container["resources"]["limits"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        copied = rf"^COPY\b.* deploy/docker/healthcheck\.py {re.escape(command[0])}$"
        assert re.search(copied, dockerfile, re.M), f"{probe}: the image has no {command[0]}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464}


def test_service_hpa_pdb_and_network_policy_select_the_deployment() -> None:
    objects = applied()
    deployment = objects[("Deployment", "ecgx")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}

    def selects(selector: dict) -> bool:
        return selector.items() <= labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    service = objects[("Service", "ecgx")]
    assert selects(service["spec"]["selector"])
    assert {p["targetPort"] for p in service["spec"]["ports"]} == container_ports
    hpa = objects[("HorizontalPodAutoscaler", "ecgx")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ecgx"}
    assert hpa["spec"]["minReplicas"] >= 2  # so that the PodDisruptionBudget can let one go
    pdb = objects[("PodDisruptionBudget", "ecgx")]
    assert (
        selects(pdb["spec"]["selector"]["matchLabels"])
        and pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    )
    policy = objects[("NetworkPolicy", "ecgx")]
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == container_ports
    assert "Egress" in policy["spec"]["policyTypes"] and policy["spec"]["egress"] == []


def test_service_monitor_scrapes_the_services_metrics_port() -> None:
    objects = applied()
    monitor = objects[("ServiceMonitor", "ecgx")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = objects[("Service", "ecgx")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # Prometheus names the job after the Service: what alerts.yml's EcgxMetricsDown matches.
    assert 'up{job="' + service["metadata"]["name"] + '"}' in (PROMETHEUS / "alerts.yml").read_text()


def test_prometheus_rule_carries_the_alert_rules_and_passes_promtool(tmp_path) -> None:
    rule = applied()[("PrometheusRule", "ecgx")]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    r = promtool("check", "rules", str(tmp_path / "rules.yml"), cwd=tmp_path)
    assert r.returncode == 0 and f"{len(ALERTS)} rules found" in r.stdout, r.stdout + r.stderr
