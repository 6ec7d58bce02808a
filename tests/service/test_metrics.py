"""Prometheus metrics (service/metrics.py) and online attribution stability (service/stability.py)
on a real server on loopback, scraped over HTTP and parsed with prometheus-client's parser.

The repository holds model ``ecg``: version 1, seed-0's gated package whose report (re-signed)
serves gradcam and saliency, so every served method has an agreement partner; version 2, a
failed gate (refused). Known traffic goes through the module's server (stability share 1); the
counts, histograms and gauges are then checked exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from repo_helpers import make_package

from ecgx.core.schema import LEADS
from ecgx.service.calls import CallRecord
from ecgx.service.metrics import ServiceMetrics, start_metrics_endpoint
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server
from ecgx.service.stability import (
    WorkerSettings,
    agreement_partner,
    gate_agreement,
    gate_noise_floor,
    pause_after,
)

MODEL = "ecg"
SERVICE = "/ecgx.v1.ExplanationService/"
PROMTOOL = shutil.which("promtool")
FAST_WORKER = WorkerSettings(cpu_budget=1.0)  # no pauses between samples: the tests wait for them

# Known traffic: Predict calls with PREDICT_ECGS ECGs each; Explain calls (methods, ECGs).
PREDICTS, PREDICT_ECGS = 3, 2
EXPLAINS = [(["gradcam"], 2), (["gradcam"], 1), (["saliency", "gradcam"], 3)]


def serving_report(gated: dict) -> dict[str, Any]:
    """The session's gate report with saliency passed and served too (signed again by
    make_package): the serving side reads the signed report, not how its verdicts came about."""
    methods = copy.deepcopy(gated["report"]["methods"])
    methods["saliency"]["verdict"] = "pass"
    return {"methods": methods, "serve": ["gradcam", "saliency"]}


@pytest.fixture(scope="module")
def repo_root(gated: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metrics") / "repo"
    make_package(gated, root / MODEL / "1", 0, **serving_report(gated))
    make_package(gated, root / MODEL / "2", 1, verdict="fail")
    return root


def open_repository(gated: dict, root: Path) -> ModelRepository:
    return ModelRepository(root, [gated["public"]], engine_options={"threads": 1})


class Running:
    """A server with metrics, its metrics endpoint and a client stub (close() stops all)."""

    def __init__(self, repository: ModelRepository, **metrics_options: Any):
        self.repository = repository
        self.metrics = ServiceMetrics(repository, seed=0, worker=FAST_WORKER, **metrics_options)
        self.built = build_server(
            repository,
            host="127.0.0.1",
            port=0,
            security=ServerSecurity.plaintext_unauthenticated(),
            metrics=self.metrics,
        )
        self.built.server.start()
        self.metrics.start()
        self.endpoint = start_metrics_endpoint(self.metrics.registry, "127.0.0.1", 0)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.built.port}")
        self.stub = pb_grpc.ExplanationServiceStub(self.channel)

    def scrape(self) -> str:
        with urllib.request.urlopen(self.endpoint.url, timeout=10) as r:
            assert r.status == 200
            return r.read().decode()

    def samples(self) -> dict[tuple[str, tuple], float]:
        """Every sample of a scrape: (sample name, sorted labels) -> value."""
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(self.scrape())
            for s in fam.samples
        }

    def close(self) -> None:
        self.channel.close()
        self.built.server.stop(None)
        self.metrics.stop()
        self.endpoint.close()


@contextlib.contextmanager
def running(repository: ModelRepository, **options: Any) -> Iterator[Running]:
    r = Running(repository, **options)
    try:
        yield r
    finally:
        r.close()


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def series(samples: dict, name: str, **labels: str) -> list[float]:
    """The values of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return [v for (n, lab), v in samples.items() if n == name and want <= set(lab)]


def ecgs(x: np.ndarray) -> list[pb.Ecg]:
    x = np.asarray(x, dtype="<f4")
    return [
        pb.Ecg(
            leads=list(LEADS),
            sampling_rate_hz=500.0,
            units=pb.MILLIVOLT,
            samples_per_lead=600,
            samples=b.tobytes(),
        )
        for b in x
    ]


@pytest.fixture(scope="module")
def traffic(gated: dict, repo_root: Path, beats: np.ndarray) -> Iterator[dict[str, Any]]:
    """The module's server (stability share 1) after the known traffic, and its scrape."""
    with running(open_repository(gated, repo_root), stability_share=1.0, stability_queue=64) as srv:
        for _ in range(PREDICTS):
            srv.stub.Predict(pb.PredictRequest(model=MODEL, ecgs=ecgs(beats[:PREDICT_ECGS])))
        for methods, n in EXPLAINS:
            srv.stub.Explain(pb.ExplainRequest(model=MODEL, ecgs=ecgs(beats[:n]), methods=methods))
        failures = [
            lambda: srv.stub.Predict(pb.PredictRequest(model="nope", ecgs=ecgs(beats[:1]))),
            lambda: srv.stub.Explain(pb.ExplainRequest(model=MODEL, ecgs=ecgs(beats[:1]), methods=["lime"])),
            lambda: srv.stub.Explain(
                pb.ExplainRequest(model=MODEL, version="2", ecgs=ecgs(beats[:1]), methods=["gradcam"])
            ),
        ]
        codes = []
        for call in failures:
            with pytest.raises(grpc.RpcError) as e:
                call()
            codes.append(e.value.code().name)
        assert codes == ["NOT_FOUND", "FAILED_PRECONDITION", "FAILED_PRECONDITION"]
        assert srv.metrics.wait_idle(120), "the stability worker did not finish its samples"
        yield {"server": srv, "samples": srv.samples(), "text": srv.scrape()}


# ------------------------------------------------------------------------------------ requests


def test_requests_are_counted_by_rpc_model_version_method_and_code(traffic) -> None:
    s = traffic["samples"]
    ok = {"model": MODEL, "version": "1", "code": "OK"}
    assert value(s, "ecgx_requests_total", rpc=SERVICE + "Predict", method="", **ok) == PREDICTS
    explained = {m: sum(1 for ms, _ in EXPLAINS if m in ms) for m in ("gradcam", "saliency")}
    for method, n in explained.items():
        assert value(s, "ecgx_requests_total", rpc=SERVICE + "Explain", method=method, **ok) == n
    assert value(s, "ecgx_requests_total", rpc=SERVICE + "Predict", code="NOT_FOUND") == 1
    assert value(s, "ecgx_requests_total", rpc=SERVICE + "Explain", code="FAILED_PRECONDITION") == 2
    # A request's model is labelled only with a name the repository has.
    assert {dict(lab).get("model") for (n, lab) in s if n == "ecgx_requests_total"} <= {"", MODEL}
    assert value(s, "ecgx_requests_in_flight") == 0


def test_latency_batch_and_engine_histograms_count_the_calls(traffic) -> None:
    s = traffic["samples"]
    predict, explain = SERVICE + "Predict", SERVICE + "Explain"
    n_predict = value(s, "ecgx_request_duration_seconds_count", rpc=predict)
    assert n_predict == PREDICTS + 1  # and the NOT_FOUND
    single = sum(1 for ms, _ in EXPLAINS if ms == ["gradcam"])  # and the refusal of version 2:
    assert value(s, "ecgx_request_duration_seconds_count", rpc=explain, method="gradcam") == single + 1
    assert value(s, "ecgx_request_duration_seconds_count", rpc=explain, method="multiple") == 1
    inf = value(s, "ecgx_request_duration_seconds_bucket", rpc=predict, model=MODEL, le="+Inf")
    assert (
        inf == PREDICTS
        and value(s, "ecgx_request_duration_seconds_bucket", rpc=predict, le="60.0") == n_predict
    )
    assert value(s, "ecgx_request_batch_ecgs_sum", rpc=predict) >= PREDICTS * PREDICT_ECGS
    assert value(s, "ecgx_engine_duration_seconds_count", rpc=predict, model=MODEL) == PREDICTS
    assert value(s, "ecgx_engine_duration_seconds_count", rpc=explain, model=MODEL) == len(EXPLAINS)
    engine = value(s, "ecgx_engine_duration_seconds_sum", rpc=explain)
    assert 0 < engine <= value(s, "ecgx_request_duration_seconds_sum", rpc=explain, model=MODEL)


def test_predicted_probabilities_per_class(traffic, gated) -> None:
    s = traffic["samples"]
    srv = traffic["server"]
    keys = srv.repository.get(MODEL, "1").engine.package.class_keys
    ecgs_predicted = PREDICTS * PREDICT_ECGS + sum(n for _, n in EXPLAINS)
    for key in keys:
        assert value(s, "ecgx_predicted_probability_count", model=MODEL, version="1", **{"class": key}) == (
            ecgs_predicted
        )
    total = value(s, "ecgx_predicted_probability_sum", model=MODEL, version="1")
    assert 0 < total < ecgs_predicted * len(keys)


# ------------------------------------------------------------------------------ repository, gate


def test_loads_refusals_and_serving_versions(traffic) -> None:
    s = traffic["samples"]
    assert value(s, "ecgx_model_loads_total", model=MODEL) == 1
    assert value(s, "ecgx_model_refusals_total", model=MODEL, reason="gate_failed") == 1
    assert value(s, "ecgx_model_version_info", model=MODEL, version="1", default="true") == 1
    assert value(s, "ecgx_model_version_info", version="2") == 0
    assert value(s, "ecgx_model_version_refused", model=MODEL, version="2", reason="gate_failed") == 1
    srv = traffic["server"]
    srv.repository.reload()
    assert value(srv.samples(), "ecgx_model_reloads_total", outcome="ok") == 1


def test_gate_gauges_equal_the_report(traffic) -> None:
    s = traffic["samples"]
    served = traffic["server"].repository.get(MODEL, "1")
    for method in ("gradcam", "saliency"):
        labels = {"model": MODEL, "version": "1", "method": method}
        gate = served.method_gate(method)
        assert value(s, "ecgx_gate_method_passed", **labels) == (gate.verdict == "pass")
        assert gate.checks
        for c in gate.checks:  # a check without a score (not run) has no series
            for name, want in (
                ("ecgx_gate_check_score", c.score),
                ("ecgx_gate_check_threshold", c.threshold),
            ):
                got = series(s, name, check=c.check, **labels)
                assert got == ([] if want is None else [pytest.approx(want)]), (name, c)
        floor = gate_noise_floor(served.report, method)
        assert floor is not None
        assert value(s, "ecgx_attribution_stability_gate_baseline", **labels) == pytest.approx(floor)
    # Only methods the report holds, never the random control; version 2's report verified, so
    # its gate shows too.
    assert not series(s, "ecgx_gate_method_passed", method="lime")
    assert not series(s, "ecgx_gate_method_passed", method="random")
    assert any(n == "ecgx_gate_method_passed" and ("version", "2") in lab for (n, lab) in s)


# ------------------------------------------------------------------------------------ stability


def test_stability_and_agreement_fill_at_share_one(traffic) -> None:
    s = traffic["samples"]
    served = traffic["server"].repository.get(MODEL, "1")
    assert agreement_partner(served, "gradcam") == "saliency"  # both one pass; saliency first
    assert agreement_partner(served, "saliency") == "gradcam"
    for method in ("gradcam", "saliency"):
        labels = {"model": MODEL, "version": "1", "method": method}
        sampled = sum(n for ms, n in EXPLAINS if method in ms)
        undefined = value(s, "ecgx_attribution_similarity_undefined_total", measure="stability", **labels)
        assert value(s, "ecgx_attribution_stability_count", **labels) + undefined == sampled
        partner = agreement_partner(served, method)
        undefined = value(s, "ecgx_attribution_similarity_undefined_total", measure="agreement", **labels)
        assert value(s, "ecgx_attribution_agreement_count", partner=partner, **labels) + undefined == sampled
        assert value(s, "ecgx_stability_samples_total", method=method) == sum(
            1 for ms, _ in EXPLAINS if method in ms
        )
    assert value(s, "ecgx_stability_samples_dropped_total") == 0
    assert value(s, "ecgx_stability_worker_cpu_seconds_total") > 0
    # The agreement's baseline is the gate's inter-method correlation of the same pair.
    names = served.report["inter_method"]["methods"]
    for method, partner in (("gradcam", "saliency"), ("saliency", "gradcam")):
        want = served.report["inter_method"]["matrix"][names.index(method)][names.index(partner)]
        labels = {"model": MODEL, "version": "1", "method": method, "partner": partner}
        assert gate_agreement(served.report, method, partner) == pytest.approx(want)
        assert value(s, "ecgx_attribution_agreement_gate_baseline", **labels) == pytest.approx(want)
    assert value(s, "ecgx_stability_queue_length") == 0 and value(s, "ecgx_stability_sample_share") == 1


def test_saliency_is_stable_under_its_own_noise_level(traffic) -> None:
    """Saliency of a trained model under noise at the ECG's own high-frequency level: the gate's
    floor for it is well above 0, and so are the live values (not a constant or a crash)."""
    s = traffic["samples"]
    labels = {"model": MODEL, "version": "1", "method": "saliency"}
    count = value(s, "ecgx_attribution_stability_count", **labels)
    mean = value(s, "ecgx_attribution_stability_sum", **labels) / count
    assert 0.2 < mean <= 1.0


def test_share_zero_samples_nothing(gated, repo_root, beats) -> None:
    with running(open_repository(gated, repo_root), stability_share=0.0) as srv:
        for _ in range(3):
            srv.stub.Explain(pb.ExplainRequest(model=MODEL, ecgs=ecgs(beats[:2]), methods=["saliency"]))
        assert srv.metrics.wait_idle(10)
        s = srv.samples()
    assert value(s, "ecgx_requests_total", method="saliency", code="OK") == 3
    assert value(s, "ecgx_attribution_stability_count") == 0
    assert value(s, "ecgx_attribution_agreement_count") == 0
    assert (
        value(s, "ecgx_stability_samples_total") == 0
        and value(s, "ecgx_stability_samples_dropped_total") == 0
    )


def explain_locally(served, method: str, x: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    classes = served.engine.logits(x).argmax(axis=1)
    return {}, classes, served.engine.attribute(method, x, classes)


def test_a_full_queue_drops_and_counts(gated, repo_root, beats) -> None:
    """Queue of one, a slow sample (occlusion, 277 passes per ECG) in progress: a burst of
    offers finds the queue full; every offer is measured or dropped, none waits."""
    repository = open_repository(gated, repo_root)
    metrics = ServiceMetrics(repository, stability_share=1.0, stability_queue=1, seed=0, worker=FAST_WORKER)
    metrics.start()
    try:
        served = repository.get(MODEL, "1")
        params, classes, maps = explain_locally(served, "occlusion", beats)
        offers = 10
        t0 = time.perf_counter()
        for _ in range(offers):
            metrics.explained(served, "occlusion", params, beats, classes, maps)
        assert time.perf_counter() - t0 < 1.0  # the request path never waits for the worker
        assert metrics.wait_idle(300)
        s = {(x.name, tuple(sorted(x.labels.items()))): x.value for f in parse(metrics) for x in f.samples}
    finally:
        metrics.stop()
    dropped = value(s, "ecgx_stability_samples_dropped_total", reason="queue_full")
    assert dropped >= offers - 2
    assert value(s, "ecgx_stability_samples_total", method="occlusion") + dropped == offers


def parse(metrics: ServiceMetrics) -> list:
    return list(text_string_to_metric_families(metrics.exposition().decode()))


def test_a_version_removed_before_its_sample_is_dropped(gated, tmp_path, beats) -> None:
    root = tmp_path / "repo"
    make_package(gated, root / MODEL / "1", 0, **serving_report(gated))
    make_package(gated, root / MODEL / "3", 0, **serving_report(gated))
    repository = open_repository(gated, root)
    metrics = ServiceMetrics(repository, stability_share=1.0, stability_queue=4, seed=0, worker=FAST_WORKER)
    metrics.start()
    try:
        slow, gone = repository.get(MODEL, "1"), repository.get(MODEL, "3")
        params, classes, maps = explain_locally(slow, "occlusion", beats)
        metrics.explained(slow, "occlusion", params, beats, classes, maps)  # keeps the worker busy
        params, classes, maps = explain_locally(gone, "saliency", beats[:1])
        metrics.explained(gone, "saliency", params, beats[:1], classes, maps)
        shutil.rmtree(root / MODEL / "3")
        repository.reload()
        assert metrics.wait_idle(300)
        s = {(x.name, tuple(sorted(x.labels.items()))): x.value for f in parse(metrics) for x in f.samples}
    finally:
        metrics.stop()
    assert value(s, "ecgx_stability_samples_dropped_total", reason="version_gone") == 1
    assert value(s, "ecgx_stability_samples_total", method="occlusion") == 1
    # The removed version's series are gone from the exposition; version 1's stay.
    assert value(s, "ecgx_attribution_stability_count", version="3") == 0
    assert not any(("version", "3") in lab for (_, lab) in s)
    assert value(s, "ecgx_model_reloads_total", outcome="ok") == 1


def test_sampler_not_started_drops_as_stopped(gated, repo_root, beats) -> None:
    repository = open_repository(gated, repo_root)
    metrics = ServiceMetrics(repository, stability_share=1.0, seed=0)
    served = repository.get(MODEL, "1")
    params, classes, maps = explain_locally(served, "saliency", beats[:1])
    metrics.explained(served, "saliency", params, beats[:1], classes, maps)
    assert metrics.wait_idle(1)
    text = metrics.exposition().decode()
    assert 'ecgx_stability_samples_dropped_total{reason="stopped"} 1.0' in text


# ------------------------------------------------------------------------------------ labels


def test_label_values_come_from_the_repository_and_method_table(gated, repo_root) -> None:
    metrics = ServiceMetrics(open_repository(gated, repo_root), stability_share=0.0)
    rpc = SERVICE + "Explain"
    for model, version, method in (
        ("nope", "1", "gradcam"),
        (MODEL, "99", "made_up"),
        (MODEL, "1", "gradcam"),
    ):
        record = CallRecord("id", rpc, "ipv4:127.0.0.1:1", model=model, version=version, methods=(method,))
        record.code = "NOT_A_CODE" if model == "nope" else "OK"
        metrics.call_started(record)
        metrics.call_finished(record)
    s = {(x.name, tuple(sorted(x.labels.items()))): x.value for f in parse(metrics) for x in f.samples}
    rows = {
        tuple(dict(lab)[k] for k in ("model", "version", "method", "code"))
        for (n, lab) in s
        if n == "ecgx_requests_total"
    }
    assert rows == {
        ("unknown", "", "gradcam", "UNKNOWN"),
        (MODEL, "unknown", "unknown", "OK"),
        (MODEL, "1", "gradcam", "OK"),
    }


# ---------------------------------------------------------------------------- exposition, endpoint


def test_exposition_passes_promtool(traffic) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; CI installs it)")
    r = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=traffic["text"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (r.stdout + r.stderr).strip(), r.stdout + r.stderr  # no lint warnings either


def test_every_metric_name_is_documented(traffic) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "monitoring.md").read_text()
    # prometheus-client adds a "_created" gauge beside each counter and histogram: not ours.
    names = {n for n in re.findall(r"^# TYPE (\S+) ", traffic["text"], re.M) if not n.endswith("_created")}
    assert len(names) == 29  # + ecgx_refusals_total (issue 19), the batcher's two (issue 21)
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/monitoring.md does not describe {missing}"


def test_the_documented_alert_expressions_are_valid_promql(tmp_path) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; CI installs it)")
    doc = (Path(__file__).resolve().parents[2] / "docs" / "monitoring.md").read_text()
    exprs = re.findall(r"```promql\n(.*?)```", doc, re.S)
    lines = [
        f"- alert: Doc{k}\n  expr: |\n" + "".join(f"    {x}\n" for x in e.splitlines())
        for k, e in enumerate(exprs)
    ]
    yaml_rules = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n- name: doc\n  rules:\n" + "".join(_indent(t) for t in [*lines, *yaml_rules]))
    r = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and len(exprs) >= 5, r.stdout + r.stderr + rules.read_text()


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" for line in text.splitlines())


def test_endpoint_reports_its_port_and_refuses_a_busy_one(gated, repo_root) -> None:
    metrics = ServiceMetrics(open_repository(gated, repo_root), stability_share=0.0)
    endpoint = start_metrics_endpoint(metrics.registry, "127.0.0.1", 0)
    try:
        assert endpoint.port > 0 and endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(endpoint.url, timeout=10) as r:
            assert b"ecgx_model_version_info" in r.read()
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{endpoint.port}"):
            start_metrics_endpoint(metrics.registry, "127.0.0.1", endpoint.port)
    finally:
        endpoint.close()
    with pytest.raises(ValueError, match="metrics port"):
        start_metrics_endpoint(metrics.registry, "127.0.0.1", 70000)


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan"), True])
def test_a_bad_share_is_refused(gated, repo_root, share) -> None:
    with pytest.raises(ValueError, match="stability share must be a number from 0 to 1"):
        ServiceMetrics(open_repository(gated, repo_root), stability_share=share)


def test_the_worker_pauses_to_stay_within_its_cpu_budget(gated, repo_root) -> None:
    assert pause_after(0.01, 0.02) == pytest.approx(0.49)  # 10 ms of work, then 490 ms of rest
    assert pause_after(0.5, 1.0) == 0 and pause_after(-1.0, 0.5) == 0
    for budget in (0, 1.5, True):
        with pytest.raises(ValueError, match="CPU budget"):
            WorkerSettings(cpu_budget=budget)


def test_metrics_and_stability_never_import_pytorch() -> None:
    code = (
        "import importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import ecgx.service.metrics, ecgx.service.stability\n"
        "print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_gate_noise_floor_reads_the_report(gated) -> None:
    report = json.loads(json.dumps(gated["report"]))
    floor = report["methods"]["gradcam"]["checks"]["randomisation"]["details"]["noise_floor"]["sample"]
    assert gate_noise_floor(report, "gradcam") == pytest.approx(floor)
    assert gate_noise_floor(report, "lime") is None and gate_noise_floor(None, "gradcam") is None
