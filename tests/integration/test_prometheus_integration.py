"""A real Prometheus server on loopback scraping a running ``ecgx serve``.

``ecgx serve`` runs as a subprocess (plaintext, ``--insecure``, metrics on a free port) over a
repository holding the session's gated package; Prometheus (the Debian package's binary; .ci/run
installs it) scrapes it every second with deploy/prometheus/alerts.yml loaded. Known traffic
goes through gRPC, and the counts are read back through Prometheus' HTTP query API; the
dashboard's queries and the alert rules are then evaluated by that Prometheus on the real series.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from cli_helpers import serve_port
from repo_helpers import make_package

from ecgx.core.dataset import load_dataset
from ecgx.core.schema import LEADS
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_BIN = shutil.which("prometheus")
MODEL, METHOD = "ecg", "gradcam"  # the gated fixture's report serves gradcam
SERVICE = "/ecgx.v1.ExplanationService/"
PREDICTS, EXPLAINS = 3, 2  # OK calls sent; plus one Predict for an unknown model (NOT_FOUND)
WAIT_S = 60  # bound on every wait for Prometheus to see something

pytestmark = pytest.mark.skipif(
    PROMETHEUS_BIN is None,
    reason="the prometheus binary is not installed (Debian: apt-get install prometheus; CI installs it)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` and its last value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError) as e:  # not up yet
            last = e
        else:
            if last:
                return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")


def ecg_messages(x: np.ndarray) -> list[pb.Ecg]:
    return [
        pb.Ecg(
            leads=list(LEADS),
            sampling_rate_hz=500.0,
            units=pb.MILLIVOLT,
            samples_per_lead=b.shape[-1],
            samples=np.asarray(b, dtype="<f4").tobytes(),
        )
        for b in x
    ]


class Prometheus:
    """A prometheus server on 127.0.0.1 (``query`` is its HTTP API)."""

    def __init__(self, tmp: Path, metrics_port: int):
        self.port = free_port()
        # deploy/prometheus/prometheus.yml as shipped, but scraping every second on loopback.
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(DEPLOY / "prometheus" / name) for name in config["rule_files"]]
        (job,) = config["scrape_configs"]
        assert job["static_configs"] == [{"targets": ["ecgx:9464"]}], job
        job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS_BIN,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.log_path = tmp / "prometheus.log"
        wait_for(
            "Prometheus to be ready", lambda: self._alive() and self._get("/-/ready").startswith("Prometheus")
        )

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        return True

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read().decode()

    def api(self, path: str, **params: str) -> Any:
        reply = json.loads(self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}"))
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query: labels (sorted) -> value."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["result"]}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def stack(gated: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """ecgx serve and a Prometheus scraping it, after the known traffic."""
    tmp = tmp_path_factory.mktemp("prometheus")
    make_package(gated, tmp / "repo" / MODEL / "1", 0)
    make_package(gated, tmp / "repo" / MODEL / "2", 1, verdict="fail")  # refused: the gate failed
    args = ["serve", "--repo", str(tmp / "repo"), "--trusted-key", str(gated["public_pem"]), "--port", "0"]
    args += ["--insecure", "--metrics-port", "0", "--stability-share", "1", "--grace", "2", "--quiet"]
    server = subprocess.Popen(
        [sys.executable, "-m", "ecgx.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
    )
    prometheus = None
    try:
        port, lines = serve_port(server, "PLAINTEXT")
        m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", "".join(lines))
        assert m, "".join(lines)
        prometheus = Prometheus(tmp, int(m[1]))
        wait_for("the first scrape", lambda: prometheus.query('up{job="ecgx"} == 1'))
        beats = np.asarray(load_dataset(gated["family"]["data"]).signals[:2], dtype=np.float32)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExplanationServiceStub(channel)
            for _ in range(PREDICTS):
                reply = stub.Predict(pb.PredictRequest(model=MODEL, ecgs=ecg_messages(beats)), timeout=60)
                assert reply.version == "1" and reply.class_keys
            for _ in range(EXPLAINS):
                reply = stub.Explain(
                    pb.ExplainRequest(model=MODEL, ecgs=ecg_messages(beats[:1]), methods=[METHOD]), timeout=60
                )
                assert len(reply.attributions) == 1
            with pytest.raises(grpc.RpcError) as e:
                stub.Predict(pb.PredictRequest(model="nope", ecgs=ecg_messages(beats[:1])), timeout=60)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        yield {"prometheus": prometheus, "server": server}
    finally:
        if prometheus is not None:
            prometheus.close()
        server.terminate()
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()


def test_prometheus_reads_back_the_calls_made(stack) -> None:
    prometheus = stack["prometheus"]
    expected = {
        (SERVICE + "Predict", MODEL, "1", "", "OK"): PREDICTS,
        (SERVICE + "Explain", MODEL, "1", METHOD, "OK"): EXPLAINS,
        (SERVICE + "Predict", "", "", "", "NOT_FOUND"): 1,
    }
    promql = 'sum by (rpc, model, version, method, code) (ecgx_requests_total{rpc=~"/ecgx.v1.*"})'

    def counts() -> dict | None:
        got = {
            tuple(dict(labels).get(k, "") for k in ("rpc", "model", "version", "method", "code")): v
            for labels, v in prometheus.query(promql).items()
        }
        return got if got == expected else None

    assert wait_for(f"{promql} == {expected}", counts) == expected
    # Latency histogram: one observation per RPC, and the batch sizes.
    latency = prometheus.query(f'sum(ecgx_request_duration_seconds_count{{rpc="{SERVICE}Predict"}})')
    assert list(latency.values()) == [PREDICTS + 1]
    batch = prometheus.query(f'sum(ecgx_request_batch_ecgs_sum{{rpc="{SERVICE}Predict"}})')
    assert list(batch.values()) == [PREDICTS * 2]  # a refused request has no batch
    # What the repository holds and what the gate said, per version and method.
    info = prometheus.query("ecgx_model_version_info")
    assert [dict(k)["version"] for k in info] == ["1"] and list(info.values()) == [1]
    refused = prometheus.query("ecgx_model_version_refused")
    assert [(dict(k)["version"], dict(k)["reason"], v) for k, v in refused.items()] == [
        ("2", "gate_failed", 1)
    ]
    passed = prometheus.query(f'ecgx_gate_method_passed{{model="{MODEL}", version="1", method="{METHOD}"}}')
    assert list(passed.values()) == [1]
    baseline = prometheus.query(f'ecgx_attribution_stability_gate_baseline{{version="1", method="{METHOD}"}}')
    assert len(baseline) == 1 and 0 < next(iter(baseline.values())) <= 1


def test_the_stability_samples_reach_prometheus(stack) -> None:
    """Every Explain computation (share 1) is measured or counted as dropped, as Prometheus sees it."""
    prometheus = stack["prometheus"]
    promql = "sum(ecgx_stability_samples_total) + sum(ecgx_stability_samples_dropped_total)"
    wait_for(f"{promql} == {EXPLAINS}", lambda: list(prometheus.query(promql).values()) == [EXPLAINS])
    measured = prometheus.query(f'sum(ecgx_attribution_stability_count{{method="{METHOD}"}})')
    samples = prometheus.query(f'sum(ecgx_stability_samples_total{{method="{METHOD}"}})')
    assert measured and samples and next(iter(measured.values())) == next(iter(samples.values()))


def test_every_dashboard_query_runs_on_the_real_series(stack) -> None:
    prometheus = stack["prometheus"]
    # rate() needs two scrapes of a series (the traffic may have fit between two: a rate of 0).
    wait_for("a request rate", lambda: prometheus.query("sum(rate(ecgx_request_duration_seconds_count[1m]))"))
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "ecgx.json").read_text())
    empty = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r"\$__(rate_)?interval", "1m", target["expr"])
            result = prometheus.query(expr)  # a PromQL error fails inside query()
            if not result:
                empty.append((panel["title"], expr))
            # Every label a legend names is one the query's series carry (Prometheus drops a label
            # whose value is empty, such as a Predict's method, so not every series need have it).
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert any(label in dict(series) for series in result), (panel["title"], expr, label)
    assert not empty, f"dashboard queries without data: {empty}"


def test_the_alert_rules_load_and_only_the_refused_version_is_pending(stack) -> None:
    prometheus = stack["prometheus"]

    def evaluated() -> list[dict] | None:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules) else None

    rules = wait_for("the alert rules to be evaluated", evaluated)
    assert len(rules) == 13 and all(r["type"] == "alerting" for r in rules)
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    # Version 2 failed its gate: EcgxModelVersionRefused waits 15 minutes before it fires. On a
    # loaded machine the first evaluation can precede the first scrape (EcgxMetricsAbsent pending
    # for a moment): wait for the first evaluation that has the scrape behind it.
    expected = [("EcgxModelVersionRefused", "2", "pending")]

    def active() -> list[tuple]:
        return [
            (a["labels"]["alertname"], a["labels"].get("version"), a["state"])
            for a in prometheus.api("alerts")["alerts"]
        ]

    wait_for(f"the active alerts to be {expected}", lambda: active() == expected)
