"""The gRPC explanation service over real channels on loopback (issue #9).

A repository is built in a temporary folder from the session's gated package (conftest's
``gated``): model ``ecg``, version 1 whose signed report passes lime and gradcam (saliency
unchecked), version 2 whose gate failed (the ``repo`` fixture says how). Servers run in-process
on port 0; the last test runs ``ecgx serve`` in a subprocess with PyTorch made unimportable.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc
from cli_helpers import ECGX_WITHOUT_TORCH, serve_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ecgx.core.dataset import load_dataset
from ecgx.core.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from ecgx.core.schema import LEADS
from ecgx.core.signing import load_public_key
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server, lead_shares, status_of

SERVED, UNCHECKED = "lime", "saliency"


def _failed_randomisation(score: float) -> dict:
    return {
        "score": score,
        "threshold": 0.5,
        "verdict": "fail",
        "blocking": True,
        "summary": "the maps barely change when the weights are randomised",
    }


@pytest.fixture(scope="module")
def repo(gated, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model ``ecg`` from the session's gated package, with signed reports: version 1 passed and
    serves lime and gradcam (with gradcam's real checks and scores; lime's settings are its
    defaults, seed free), saliency unchecked and the random control failed; version 2's gate
    failed. The gate itself is tested in tests/test_gate*.py; this module tests the service."""
    from repo_helpers import make_package

    from ecgx.service.methods import get_method

    gradcam = gated["report"]["methods"]["gradcam"]
    lime_settings = {k: v for k, v in get_method(SERVED).parameters().items() if k != "seed"}
    lime = {**gradcam, "settings": {"checked": lime_settings, "may_differ": {"seed": "any"}}}
    random = {"verdict": "fail", "checks": {"randomisation": _failed_randomisation(1.0)}}
    root = tmp_path_factory.mktemp("grpc") / "repo"
    methods = {"gradcam": gradcam, SERVED: lime, "random": random}
    make_package(gated, root / "ecg" / "1", 0, methods=methods, serve=[SERVED, "gradcam"], verdict="pass")
    failed = {SERVED: {"verdict": "fail", "checks": {"randomisation": _failed_randomisation(0.97)}}}
    make_package(gated, root / "ecg" / "2", 0, methods=failed, serve=[], verdict="fail")
    return {"root": root, "public": gated["public_pem"], "data": gated["family"]["data"]}


class Server:
    def __init__(self, root: Path, public: Path, **kwargs):
        allow_ungated = kwargs.pop("allow_ungated", False)
        self.repository = ModelRepository(root, [load_public_key(public)], allow_ungated=allow_ungated)
        self.server, self.port, self.servicer, self.extras = build_server(
            self.repository,
            security=ServerSecurity.plaintext_unauthenticated(),
            host="127.0.0.1",
            port=0,
            **kwargs,
        )
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.ExplanationServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


@pytest.fixture(scope="module")
def server(repo):
    s = Server(repo["root"], repo["public"], max_batch=8, max_concurrent=2, max_queued=0)
    yield s
    s.close()


@pytest.fixture(scope="module")
def research(repo):
    s = Server(repo["root"], repo["public"], allow_ungated=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def beats(repo) -> np.ndarray:
    return np.asarray(load_dataset(repo["data"]).signals[:4], dtype=np.float32)


def ecg_msg(x: np.ndarray, leads=LEADS, fs: float = 500.0, units=pb.MILLIVOLT, **over) -> pb.Ecg:
    x = np.asarray(x, dtype="<f4")
    fields = dict(
        leads=list(leads), sampling_rate_hz=fs, units=units, samples_per_lead=x.shape[-1], samples=x.tobytes()
    )
    fields.update(over)
    return pb.Ecg(**fields)


def tensor(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


# ------------------------------------------------------------------------------ every RPC


def test_status_codes_map_one_to_one() -> None:
    classes = [InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Cancelled, DeadlineExceeded]
    codes = [status_of(c("x")) for c in classes]
    assert len(set(codes)) == len(classes)
    assert codes[0] == grpc.StatusCode.INVALID_ARGUMENT and codes[-1] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(issubclass(c, ValueError) for c in classes)


def test_list_and_get_model(server) -> None:
    models = server.stub.ListModels(pb.ListModelsRequest()).models
    assert [(m.name, m.default_version, list(m.versions)) for m in models] == [("ecg", "1", ["1", "2"])]
    info = server.stub.GetModel(pb.GetModelRequest(model="ecg"))
    v1, v2 = info.versions
    assert v1.serving and v1.gate_verdict == "pass" and len(v1.package_sha256) == 64
    assert list(v1.leads) == list(LEADS) and list(v1.input_shape) == [12, 600]
    assert any(c.key == "AF" and c.snomed_code == "164889003" for c in v1.classes)
    assert len(v1.gate_report_sha256) == 64 and len(v1.policy_sha256) == 64
    gates = {m.method: m for m in v1.methods}
    assert gates[SERVED].servable and gates[SERVED].verdict == "pass" and gates[SERVED].checks
    assert not gates[UNCHECKED].servable and gates[UNCHECKED].verdict == "not checked"
    assert not v2.serving and "gate failed" in v2.refusal_reason


def test_get_gate_report_is_the_signed_file(server, repo) -> None:
    from ecgx.core.signing import verify_signature

    r = server.stub.GetGateReport(pb.GetGateReportRequest(model="ecg"))
    raw = (repo["root"] / "ecg" / "1" / "gate.json").read_bytes()
    assert r.version == "1" and r.report_json == raw and r.verdict == "pass"
    verify_signature(json.loads(r.report_json), load_public_key(repo["public"]))
    r2 = server.stub.GetGateReport(pb.GetGateReportRequest(model="ecg", version="2"))
    assert r2.verdict == "fail"


def test_predict(server, beats) -> None:
    r = server.stub.Predict(pb.PredictRequest(model="ecg", ecgs=[ecg_msg(b) for b in beats]))
    probs = tensor(r.probabilities)
    assert probs.shape == (4, 9) and ((probs >= 0) & (probs <= 1)).all()
    assert r.version == "1" and len(r.package_sha256) == 64 and list(r.class_keys)[3] == "AF"
    np.testing.assert_allclose(1 / (1 + np.exp(-tensor(r.logits))), probs, rtol=1e-5)
    np.testing.assert_array_equal(tensor(r.beats), beats)


def test_predict_matches_the_engine_and_accepts_any_lead_order_and_microvolts(server, beats) -> None:
    engine = server.repository.get("ecg").engine
    order = np.random.default_rng(0).permutation(12)
    names = [LEADS[k].upper() for k in order]  # case-insensitive
    msgs = [ecg_msg(b[order] * 1000, leads=names, units=pb.MICROVOLT) for b in beats]
    r = server.stub.Predict(pb.PredictRequest(model="ecg", version="1", ecgs=msgs))
    np.testing.assert_allclose(tensor(r.probabilities), engine.probabilities(beats), rtol=1e-4, atol=1e-6)


def test_explain_carries_everything_to_reproduce_and_audit(server, beats) -> None:
    engine = server.repository.get("ecg").engine
    req = pb.ExplainRequest(
        model="ecg",
        ecgs=[ecg_msg(b) for b in beats[:2]],
        methods=[SERVED],
        targets=[pb.Target(class_key="AF")],
        parameters_json={SERVED: json.dumps({"seed": 5})},  # the seed is free; the rest as the gate checked
    )
    r = server.stub.Explain(req)
    assert len(r.attributions) == 2 and not r.research_mode
    assert r.onnxruntime_version and "CPUExecutionProvider" in r.providers
    assert len(r.gate_report_sha256) == 64 and len(r.policy_sha256) == 64 and len(r.package_sha256) == 64
    a = r.attributions[0]
    assert a.method == SERVED and a.target_class == "AF" and a.ecg_index == 0
    assert a.gate.servable and not a.gate.ungated and a.gate.verdict == "pass"
    assert {c.check for c in a.gate.checks} >= {"randomisation"} and a.compute_seconds > 0
    params = json.loads(a.effective_parameters_json)
    checked = server.repository.get("ecg").method_gate(SERVED).settings.checked
    assert params["n_samples"] == checked["n_samples"] and params["seed"] == 5
    got = np.stack([tensor(x.attribution) for x in r.attributions])
    assert got.shape == (2, 12, 600)
    again = engine.attribute(SERVED, beats[:2], target="AF", **params)
    np.testing.assert_allclose(got, again, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.lead_relevance_share, lead_shares(got[0]), rtol=1e-6)
    assert abs(sum(a.lead_relevance_share) - 1) < 1e-6


def test_explain_targets(server, beats) -> None:
    msgs = [ecg_msg(b) for b in beats[:3]]
    probs = server.repository.get("ecg").engine.probabilities(beats[:3])

    def classes(*targets: pb.Target) -> list[list[str]]:
        r = server.stub.Explain(
            pb.ExplainRequest(
                model="ecg", ecgs=msgs, methods=[SERVED], targets=list(targets),
                parameters_json={SERVED: '{"seed": 1}'},
            )
        )  # fmt: skip
        out: list[list[str]] = [[] for _ in msgs]
        for a in r.attributions:
            out[a.ecg_index].append(a.target_class)
        return out

    keys = server.repository.get("ecg").engine.package.class_keys
    top = [[keys[c] for c in np.argsort(-p, kind="stable")] for p in probs]
    assert classes() == [t[:1] for t in top]  # predicted by default
    assert classes(pb.Target(predicted=True)) == [t[:1] for t in top]
    assert classes(pb.Target(top_k=2)) == [t[:2] for t in top]
    assert classes(pb.Target(snomed_code="164889003")) == [["AF"]] * 3
    assert classes(pb.Target(index=0), pb.Target(class_key="AF"), pb.Target(index=8)) == [
        [keys[0]],
        ["AF"],
        [keys[8]],
    ]
    positive = [[keys[c] for c in np.flatnonzero(p >= 0.5)] or t[:1] for p, t in zip(probs, top, strict=True)]
    assert classes(pb.Target(all_predicted=True)) == positive


def test_rhythm_strip_becomes_the_importers_median_beat(server, shared_data) -> None:
    from ecgx.core.median_beat import median_beat
    from ecgx.training.data.wfdb_import import read_record

    signal_, fs, _ = read_record(shared_data / "ptbxl-sample" / "HR06000")
    r = server.stub.Predict(pb.PredictRequest(model="ecg", ecgs=[ecg_msg(signal_, fs=fs)]))
    np.testing.assert_allclose(tensor(r.beats)[0], median_beat(signal_, fs), atol=1e-6)
    short = signal_[:, : int(5 * fs)]
    code, msg = code_of(
        lambda: server.stub.Predict(pb.PredictRequest(model="ecg", ecgs=[ecg_msg(short, fs=fs)]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "5.00 s long" in msg and "at least 8 s" in msg
    code, msg = code_of(
        lambda: server.stub.Predict(pb.PredictRequest(model="ecg", ecgs=[ecg_msg(signal_, fs=100)]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sampling rate 100 Hz is below" in msg


# ------------------------------------------------------------------------------ bad input


def _bad_ecgs(b: np.ndarray) -> list[tuple[str, list[pb.Ecg], str]]:
    nan = b.copy()
    nan[3, 10] = np.nan
    inf = b.copy()
    inf[0, 0] = np.inf
    return [
        ("wrong byte count", [ecg_msg(b, samples=b.astype("<f4").tobytes()[:-4])], "= 28800 expected"),
        ("samples_per_lead 0", [ecg_msg(b, samples_per_lead=0)], "samples_per_lead must be at least 1"),
        ("missing lead", [ecg_msg(b[:11], leads=LEADS[:11])], "missing lead(s) V6"),
        ("unknown lead", [ecg_msg(b, leads=[*LEADS[:11], "V7"])], "unknown lead name(s) 'V7'"),
        ("extra lead", [ecg_msg(np.vstack([b, b[:1]]), leads=[*LEADS, "II"])], "given twice: II"),
        ("no leads", [ecg_msg(b, leads=[])], "no lead names"),
        ("NaN", [ecg_msg(nan)], "NaN or infinite samples in lead(s) aVR"),
        ("Inf", [ecg_msg(inf)], "NaN or infinite samples in lead(s) I"),
        ("µV sent as mV", [ecg_msg(b * 1000)], "set units to MICROVOLT"),
        ("absurd amplitude", [ecg_msg(b * 1e6, units=pb.MICROVOLT)], "implausible amplitude"),
        ("no units", [ecg_msg(b, units=pb.UNITS_UNSPECIFIED)], "units must be given"),
        ("bad rate", [ecg_msg(b, fs=0)], "sampling_rate_hz must be a positive number"),
        ("beat at wrong rate", [ecg_msg(b, fs=250)], "at least 8 s"),
        ("wrong length", [ecg_msg(b[:, :500])], "at least 8 s is needed"),
        ("empty batch", [], "no ECG"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_ecgs_are_invalid_argument_with_a_precise_message(server, beats, case: int) -> None:
    name, ecgs, expected = _bad_ecgs(beats[0])[case]
    for call in (
        lambda: server.stub.Predict(pb.PredictRequest(model="ecg", ecgs=ecgs)),
        lambda: server.stub.Explain(pb.ExplainRequest(model="ecg", ecgs=ecgs, methods=[SERVED])),
    ):
        code, msg = code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, msg)
        assert expected in msg, (name, msg)
        if ecgs:
            assert msg.startswith("ecgs[0]: ")


def test_oversized_batch_is_resource_exhausted(server, beats) -> None:
    ecgs = [ecg_msg(beats[0])] * 9  # the server takes 8
    code, msg = code_of(lambda: server.stub.Predict(pb.PredictRequest(model="ecg", ecgs=ecgs)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 8" in msg


def explain(server, beats, **kw) -> pb.ExplainResponse:
    fields = dict(model="ecg", ecgs=[ecg_msg(beats[0])], methods=[SERVED])
    fields.update(kw)
    return server.stub.Explain(pb.ExplainRequest(**fields))


@pytest.mark.parametrize(
    "kw, code, expected",
    [
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
        ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model is empty"),
        ({"version": "7"}, grpc.StatusCode.NOT_FOUND, "no version '7'"),
        ({"version": "2"}, grpc.StatusCode.FAILED_PRECONDITION, "gate failed"),
        ({"methods": ["magic"]}, grpc.StatusCode.NOT_FOUND, "unknown attribution method 'magic'"),
        ({"methods": []}, grpc.StatusCode.INVALID_ARGUMENT, "at least one method"),
        ({"methods": [SERVED, SERVED]}, grpc.StatusCode.INVALID_ARGUMENT, "more than once"),
        ({"targets": [pb.Target(class_key="XYZ")]}, grpc.StatusCode.NOT_FOUND, "unknown class 'XYZ'"),
        ({"targets": [pb.Target(snomed_code="123456789")]}, grpc.StatusCode.NOT_FOUND, "unknown class"),
        ({"targets": [pb.Target(index=9)]}, grpc.StatusCode.NOT_FOUND, "out of range 0..8"),
        ({"targets": [pb.Target(top_k=10)]}, grpc.StatusCode.INVALID_ARGUMENT, "top_k must be between 1"),
        ({"targets": [pb.Target()]}, grpc.StatusCode.INVALID_ARGUMENT, "sets no kind"),
        ({"targets": [pb.Target(index=0)] * 2}, grpc.StatusCode.INVALID_ARGUMENT, "2 targets for 1 ECGs"),
        ({"parameters_json": {SERVED: "{"}}, grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
        ({"parameters_json": {SERVED: "[1]"}}, grpc.StatusCode.INVALID_ARGUMENT, "must be a JSON object"),
        ({"parameters_json": {SERVED: '{"steps": 3}'}}, grpc.StatusCode.INVALID_ARGUMENT, "no parameter(s)"),
        ({"parameters_json": {"gradcam": "{}"}}, grpc.StatusCode.INVALID_ARGUMENT, "does not ask for"),
        ({"parameters_json": {SERVED: '{"n_samples": 1}'}}, grpc.StatusCode.INVALID_ARGUMENT, "n_samples"),
        (
            {"parameters_json": {SERVED: '{"n_samples": 99999}'}},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "n_samples",
        ),
        ({"parameters_json": {SERVED: '{"seed": -1}'}}, grpc.StatusCode.INVALID_ARGUMENT, "seed must be"),
    ],
)
def test_bad_requests(server, beats, kw, code, expected) -> None:
    got, msg = code_of(lambda: explain(server, beats, **kw))
    assert got == code and expected in msg, msg


def test_unknown_model_in_every_rpc(server, beats) -> None:
    for call in (
        lambda: server.stub.GetModel(pb.GetModelRequest(model="nope")),
        lambda: server.stub.GetGateReport(pb.GetGateReportRequest(model="nope")),
        lambda: server.stub.GetGateReport(pb.GetGateReportRequest(model="ecg", version="9")),
        lambda: server.stub.Predict(pb.PredictRequest(model="nope", ecgs=[ecg_msg(beats[0])])),
    ):
        assert code_of(call)[0] == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------------------ the gate


def test_a_method_the_gate_did_not_pass_is_refused(server, beats) -> None:
    code, msg = code_of(lambda: explain(server, beats, methods=[SERVED, UNCHECKED]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"method '{UNCHECKED}' did not pass the validation gate of ecg version 1" in msg
    assert "the gate did not check it" in msg
    # The random control is checked and fails: the refusal names the failed checks and scores.
    code, msg = code_of(lambda: explain(server, beats, methods=["random"]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert re.search(r"failed randomisation score 1 vs threshold [0-9.]+ \(blocking\)", msg), msg


def test_research_mode_serves_ungated_methods_and_says_so(research, beats) -> None:
    r = explain(research, beats, methods=[UNCHECKED])
    assert r.research_mode and r.attributions[0].gate.ungated and r.attributions[0].gate.servable
    failed = explain(
        research, beats, version="2", methods=[SERVED], parameters_json={SERVED: '{"n_samples": 20}'}
    )
    gate = failed.attributions[0].gate
    assert failed.research_mode and gate.ungated and gate.verdict == "fail"
    assert any(c.verdict == "fail" and c.check == "randomisation" for c in gate.checks)
    predicted = research.stub.Predict(pb.PredictRequest(model="ecg", version="2", ecgs=[ecg_msg(beats[0])]))
    assert predicted.research_mode
    assert not research.stub.Predict(pb.PredictRequest(model="ecg", ecgs=[ecg_msg(beats[0])])).research_mode
    v1, v2 = research.stub.GetModel(pb.GetModelRequest(model="ecg")).versions
    assert v2.serving and v2.ungated and v1.serving and not v1.ungated
    gated = explain(research, beats)  # the settings the gate checked
    assert not gated.research_mode and not gated.attributions[0].gate.ungated


# ------------------------------------------------------------------------------ limits, deadlines


def test_concurrency_limit_is_resource_exhausted(server, beats) -> None:
    for _ in range(server.servicer.max_concurrent):
        assert server.servicer.core.admission._slots.acquire(blocking=False)
    try:
        code, msg = code_of(
            lambda: server.stub.Predict(pb.PredictRequest(model="ecg", ecgs=[ecg_msg(beats[0])]))
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent" in msg
        assert server.stub.ListModels(pb.ListModelsRequest()).models  # cheap calls are not limited
    finally:
        for _ in range(server.servicer.max_concurrent):
            server.servicer.core.admission._slots.release()
    assert server.stub.Predict(pb.PredictRequest(model="ecg", ecgs=[ecg_msg(beats[0])])).probabilities.data


def test_a_deadline_stops_the_work_between_engine_calls(research, beats) -> None:
    # Many methods, each one engine call: the deadline passes after the first few.
    methods = ["integrated_gradients", "smoothgrad", "gradient_shap", "occlusion", "feature_ablation"]
    params = {
        "integrated_gradients": '{"n_steps": 400}',
        "smoothgrad": '{"n_samples": 400}',
        "gradient_shap": '{"n_samples": 400}',
    }
    req = pb.ExplainRequest(
        model="ecg", ecgs=[ecg_msg(b) for b in beats], methods=methods, parameters_json=params
    )
    t0 = time.perf_counter()
    code, _ = code_of(lambda: research.stub.Explain(req, timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server frees its slot soon after (it stops at the next engine call).
    deadline = time.monotonic() + 30
    admission = research.servicer.core.admission
    while admission.free_slots() < admission.max_concurrent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert research.servicer.core.admission.free_slots() == research.servicer.max_concurrent
    assert time.perf_counter() - t0 < 30


def test_32_concurrent_clients_without_an_error(research, beats) -> None:
    """8 requests run at a time (the default), the others wait for a slot: none is refused."""
    errors: list[BaseException] = []
    ecgs = [ecg_msg(b) for b in beats[:2]]

    def call(i: int) -> None:
        try:
            if i % 2:
                research.stub.Predict(pb.PredictRequest(model="ecg", ecgs=ecgs), timeout=120)
            else:
                r = research.stub.Explain(
                    pb.ExplainRequest(model="ecg", ecgs=ecgs, methods=["saliency", "integrated_gradients"]),
                    timeout=120,
                )
                assert len(r.attributions) == 4
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_concurrent_clients_past_the_limit_are_refused_cleanly(server, beats) -> None:
    errors: list[BaseException] = []

    def call() -> None:
        try:
            server.stub.Predict(pb.PredictRequest(model="ecg", ecgs=[ecg_msg(beats[0])]))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # max_concurrent=2 here
                errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ------------------------------------------------------------------------------ ecgx serve, without torch


def test_ecgx_serve_runs_without_torch_and_drains_on_sigterm(repo, beats, tmp_path) -> None:
    script = tmp_path / "serve_no_torch.py"
    script.write_text(ECGX_WITHOUT_TORCH)
    # A grace period the in-flight request fits in on a loaded machine: what happens to work still
    # running after it is tests/service/test_core_limits.py's (cancelled, exit within grace + 2 s).
    args = ["--repo", str(repo["root"]), "--port", "0", "--trusted-key", str(repo["public"]), "--grace", "60"]
    args += ["--insecure", "--metrics-port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        port, lines = serve_port(proc, "PLAINTEXT")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExplanationServiceStub(channel)
            assert [m.name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["ecg"]
            r = stub.Explain(
                pb.ExplainRequest(
                    model="ecg", ecgs=[ecg_msg(beats[0])], methods=[SERVED],
                    parameters_json={SERVED: '{"seed": 1}'},
                ),
                timeout=60,
            )  # fmt: skip
            assert len(r.attributions) == 1
            # The same port answers standard probes and Triton's client (Open Inference Protocol).
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "ecg", "inference.GRPCInferenceService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
                assert status == health_pb2.HealthCheckResponse.SERVING, service
            triton = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{port}")
            assert triton.is_server_live() and triton.is_model_ready("ecg")
            triton.close()
            # SIGTERM while a request is in flight: it still completes, then the server exits 0.
            slow = pb.ExplainRequest(
                model="ecg", ecgs=[ecg_msg(b) for b in np.concatenate([beats] * 4)], methods=[SERVED],
            )  # fmt: skip
            future = stub.Explain.future(slow, timeout=60)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert len(future.result().attributions) == 16
            # The answer can arrive before the server has acted on the signal (an idle machine
            # finishes the request in a few hundred ms): give the signal handler a moment.
            time.sleep(1.0)
            code, _ = code_of(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE  # no new requests once stopping
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "TORCH_LOADED False" in out
    log = "".join(lines) + err
    assert "stopped" in log
    # Waveforms are never logged: no sample value of the request appears in the log.
    assert f"{float(beats[0].ravel()[300]):.6f}"[:8] not in log


def test_a_client_cancellation_stops_the_work(research, beats) -> None:
    methods = ["integrated_gradients", "smoothgrad", "gradient_shap", "occlusion", "feature_ablation"]
    params = {m: '{"n_samples": 400}' for m in ("smoothgrad", "gradient_shap")}
    req = pb.ExplainRequest(
        model="ecg", ecgs=[ecg_msg(b) for b in beats], methods=methods, parameters_json=params
    )
    future = research.stub.Explain.future(req)
    time.sleep(0.2)
    assert future.cancel()
    deadline = time.monotonic() + 30
    admission = research.servicer.core.admission
    while admission.free_slots() < admission.max_concurrent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert research.servicer.core.admission.free_slots() == research.servicer.max_concurrent


def test_anything_untyped_is_internal_with_a_generic_message(repo, caplog) -> None:
    class Broken:
        def models(self):
            raise RuntimeError("secret detail of a bug")

    server, port, _, _ = build_server(
        Broken(), security=ServerSecurity.plaintext_unauthenticated(), host="127.0.0.1", port=0
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExplanationServiceStub(channel)
            code, msg = code_of(lambda: stub.ListModels(pb.ListModelsRequest()))
    finally:
        server.stop(None)
    assert code == grpc.StatusCode.INTERNAL and "secret" not in msg and "see the server log" in msg
    assert "secret detail of a bug" in caplog.text  # logged for the operator


def test_long_client_input_is_clipped_in_the_status(server, beats) -> None:
    names = [*LEADS[:11], "x" * 100_000]
    code, msg = code_of(
        lambda: server.stub.Predict(pb.PredictRequest(model="ecg", ecgs=[ecg_msg(beats[0], leads=names)]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "missing lead(s) V6" in msg and len(msg) < 2000


def test_generated_stubs_match_the_proto(tmp_path) -> None:
    """The installed stubs are what ecgx.service.grpc_codegen makes from proto/ now (reinstall if not)."""
    from ecgx.service import grpc_codegen

    written = grpc_codegen.generate(out_dir=tmp_path / "proto_gen")
    assert {p.name for p in written} >= {"ecgx_pb2.py", "ecgx_pb2_grpc.py", "ecgx_pb2.pyi"}
    for p in written:
        installed = grpc_codegen.OUT_DIR / p.relative_to(tmp_path / "proto_gen")
        assert installed.read_text() == p.read_text(), (
            f"{installed} is stale: pip install -e . regenerates it"
        )
    assert (
        "from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2"
        in (tmp_path / "proto_gen/ecgx/v1/ecgx_pb2_grpc.py").read_text()
    )
    assert pb.DESCRIPTOR.name == "ecgx/v1/ecgx.proto"


@pytest.mark.parametrize(
    "methods, target, forward_runs",
    [
        (["saliency"], pb.Target(class_key="AF"), 0),  # the backward graph's logits are used
        (["lime"], pb.Target(class_key="AF"), 1),  # none to use: one forward pass, at the end
        (["saliency", "lime"], pb.Target(predicted=True), 1),  # needed first, once
        (["saliency"], pb.Target(top_k=2), 1),
    ],
)
def test_the_forward_graph_runs_at_most_once_per_request(
    research, beats, monkeypatch, methods, target, forward_runs
):
    engine = research.repository.get("ecg").engine
    graphs: list[str] = []
    run = engine.run

    def counting(graph, feeds, outputs):
        # The request's own forward pass, not a method's passes over perturbed inputs.
        if graph == "forward" and feeds["x"].shape == (3, 12, 600) and np.array_equal(feeds["x"], beats[:3]):
            graphs.append(graph)
        return run(graph, feeds, outputs)

    monkeypatch.setattr(engine, "run", counting)
    r = explain(
        research, beats[:3], ecgs=[ecg_msg(b) for b in beats[:3]], methods=methods, targets=[target],
        parameters_json={"lime": '{"n_samples": 20}'} if "lime" in methods else {},
    )  # fmt: skip
    assert graphs.count("forward") == forward_runs
    np.testing.assert_allclose(tensor(r.probabilities), engine.probabilities(beats[:3]), rtol=1e-5, atol=1e-6)


def test_a_busy_port_is_refused_not_shared(server, capsys) -> None:
    with pytest.raises(OSError, match="in use"):
        build_server(
            server.repository,
            security=ServerSecurity.plaintext_unauthenticated(),
            host="127.0.0.1",
            port=server.port,
        )


def test_a_response_too_large_to_send_is_refused_before_any_work(server, beats, monkeypatch) -> None:
    monkeypatch.setattr(server.servicer.core, "max_response_bytes", 200_000)  # ~6 maps
    code, msg = code_of(
        lambda: explain(server, beats, ecgs=[ecg_msg(b) for b in beats], targets=[pb.Target(top_k=2)])
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "would hold 8 attributions" in msg


def test_fhir_observations_count_in_the_response_size(server, beats, monkeypatch) -> None:
    """An Observation holds the ECG and the map as text (~200 kB for a beat): a response that fits
    as tensors but not with its Observations is refused before any work, not cut by gRPC."""
    monkeypatch.setattr(server.servicer.core, "max_response_bytes", 400_000)
    ecgs = [ecg_msg(b) for b in beats[:2]]
    assert len(explain(server, beats, ecgs=ecgs).attributions) == 2
    code, msg = code_of(lambda: explain(server, beats, ecgs=ecgs, fhir=True))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "would hold 2 attributions" in msg


def test_an_lrp_composite_the_gate_did_not_check_is_served_only_in_research_mode(gated, beats, tmp_path):
    """The gate checks lrp with its default rule (epsilon); a report that serves lrp covers that
    rule, so another composite is refused, naming both, unless the server is in research mode."""
    from repo_helpers import make_package

    report = gated["report"]
    methods = {**report["methods"], "lrp": {"verdict": "pass", "checks": {}}}
    make_package(gated, tmp_path / "repo" / "ecg" / "1", serve=["lrp"], methods=methods)
    for allow_ungated in (False, True):
        repository = ModelRepository(tmp_path / "repo", [gated["public"]], allow_ungated=allow_ungated)
        server, port, _, _ = build_server(
            repository, security=ServerSecurity.plaintext_unauthenticated(), host="127.0.0.1", port=0
        )
        server.start()
        try:
            stub = pb_grpc.ExplanationServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            ecgs = [ecg_msg(beats[0])]
            default = stub.Explain(pb.ExplainRequest(model="ecg", ecgs=ecgs, methods=["lrp"]))
            assert not default.attributions[0].gate.ungated
            composite = pb.ExplainRequest(
                model="ecg",
                ecgs=ecgs,
                methods=["lrp"],
                parameters_json={"lrp": '{"composite": "epsilon_plus"}'},
            )
            if allow_ungated:
                assert stub.Explain(composite).attributions[0].gate.ungated
            else:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Explain(composite)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                details = err.value.details()
                assert "composite='epsilon_plus' (the gate checked composite='epsilon')" in details
                assert "is not covered by the validation gate's verdict" in details
        finally:
            server.stop(None)
            repository.stop()


# ---------------------------------------------------------------------------- per-version work done once


def test_interceptor_wraps_each_method_once_and_again_for_a_new_handler():
    """The wrapped handler is built once per method on gRPC's polling thread, and rebuilt when gRPC
    hands over another handler object for the method (a re-registered service)."""
    from types import SimpleNamespace

    from ecgx.service.calls import CallInterceptor

    interceptor = CallInterceptor(None)
    first = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    details = SimpleNamespace(method="/ecgx.v1.ExplanationService/Explain", invocation_metadata=())
    wrapped = interceptor.intercept_service(lambda d: first, details)
    assert wrapped.request_streaming and wrapped.request_deserializer is None  # read after admission
    assert interceptor.intercept_service(lambda d: first, details) is wrapped
    other = SimpleNamespace(method="/ecgx.v1.ExplanationService/Predict", invocation_metadata=())
    assert interceptor.intercept_service(lambda d: first, other) is not wrapped
    second = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    assert interceptor.intercept_service(lambda d: second, details) is not wrapped
    assert interceptor.intercept_service(lambda d: None, details) is None  # unknown: UNIMPLEMENTED


def test_gate_message_is_built_once_per_gate_and_equals_a_fresh_one():
    from ecgx.service.repository import CheckResult
    from ecgx.service.requests import GateInfo
    from ecgx.service.server import _build_gate_message, method_gate_message

    check = CheckResult("model_randomisation", 0.2, 0.5, "pass", True, "ok")
    gate = GateInfo("saliency", True, "pass", False, (check,))
    message = method_gate_message(gate)
    assert message == _build_gate_message(gate)
    assert method_gate_message(GateInfo("saliency", True, "pass", False, (check,))) is message
    failed = GateInfo("saliency", False, "fail", False, (check,))
    assert method_gate_message(failed).verdict == "fail"
    unhashable = GateInfo("saliency", True, "pass", False, [check])  # type: ignore[arg-type]
    assert method_gate_message(unhashable) == message  # built each time, the same message


def test_response_facts_are_built_once_per_served_version():
    from types import SimpleNamespace

    from ecgx.service.core import ServingCore

    def version(sha: str) -> SimpleNamespace:
        package = SimpleNamespace(class_keys=["a", "b"])
        engine = SimpleNamespace(package=package, providers=["CPUExecutionProvider"])
        return SimpleNamespace(
            model="m", version="1", package_sha256=sha, report_sha256="r", policy_sha256="p", engine=engine
        )

    core = ServingCore(repository=None)
    served = version("s1")
    facts = core._facts_of(served)
    assert (facts.model, facts.package_sha256, facts.class_keys) == ("m", "s1", ("a", "b"))
    assert core._facts_of(served) is facts
    reloaded = version("s2")  # the same name and version, reloaded: a new object, its own facts
    assert core._facts_of(reloaded).package_sha256 == "s2"


def test_gates_are_looked_up_once_per_served_version_and_still_refuse_every_request():
    from types import SimpleNamespace

    from ecgx.service.core import ServingCore, _servable_gate
    from ecgx.service.repository import MethodGate

    looked: list[str] = []

    def version(servable: bool) -> SimpleNamespace:
        def method_gate(method: str) -> MethodGate:
            looked.append(method)
            return MethodGate(method, servable, "fail", ())

        return SimpleNamespace(
            model="m", version="1", report=None, method_gate=method_gate, unavailable_reason=lambda m: None
        )

    core = ServingCore(repository=None)
    refused = version(False)
    gate = core._gate_of(refused, "saliency")
    assert core._gate_of(refused, "saliency") is gate and looked == ["saliency"]
    for _ in range(2):  # the cached gate refuses every request, not only the first
        with pytest.raises(FailedPrecondition):
            _servable_gate(refused, core._gate_of(refused, "saliency"))
    assert core._gate_of(version(True), "saliency").servable  # a new version: its own gate
    assert looked == ["saliency", "saliency"]


def test_settings_checks_are_remembered_only_when_they_pass():
    from ecgx.service.core import ServingCore

    core = ServingCore(repository=None)
    shape = (1, len(LEADS), 600)
    rows = core._rows_per_ecg("integrated_gradients", {"n_steps": 16}, shape)
    assert rows >= 16 and len(core._checked) == 1
    assert core._rows_per_ecg("integrated_gradients", {"n_steps": 16}, shape) == rows
    for _ in range(2):  # a bad value is refused every time, never remembered
        with pytest.raises(InvalidArgument):
            core._rows_per_ecg("integrated_gradients", {"n_steps": -1}, shape)
    with pytest.raises(InvalidArgument):  # a bool is not a step count (keys keep the type)
        core._rows_per_ecg("integrated_gradients", {"n_steps": True}, shape)
    assert len(core._checked) == 1
