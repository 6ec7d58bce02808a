"""Cost budgets, per-caller quotas, cancellation and bounded shutdown of the serving core (issue 19),
over real loopback channels.

Before the core: cancelled and timed-out work kept running until the engine call ended (a Kernel
SHAP request whose client gave up after 1 s held its slot for 17 s); the only cost caps were per
ECG and per call, so one request of many ECGs x methods x targets could hold a slot for minutes
and one token could take every slot; SIGTERM with long calls in flight took far past its grace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from cli_helpers import serve_port
from core_helpers import (
    MODEL,
    CoreServer,
    beats_of,
    ecg_msg,
    failure,
    infer_request,
    make_core_repo,
)

from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
from ecgx.service.requests import Caller, CancelToken, Quotas
from ecgx.service.security import load_server_security
from ecgx.token_cli import add_token

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# Long on purpose: 64 ECGs x 2000 coalitions (128,000 forward rows in chunks of 64, and 64 small
# surrogate fits), seconds on any machine; cancelled, it must stop within one chunk.
LONG = {"kernel_shap": {"n_samples": 2000, "window": 100, "seed": 1}}


@pytest.fixture(scope="module")
def root(gated, tmp_path_factory):
    return make_core_repo(gated, tmp_path_factory.mktemp("core_limits") / "repo")


@pytest.fixture(scope="module")
def beats(gated):
    return np.concatenate([beats_of(gated, 8)] * 8)


class Records:
    """A call observer (as the audit log is one): the outcome of every finished call."""

    def __init__(self) -> None:
        self.codes: list[str] = []
        self.refusals: list[str | None] = []

    def call_started(self, record) -> None:
        pass

    def call_finished(self, record) -> None:
        self.codes.append(record.code)
        self.refusals.append(record.refusal)


def wait_free(core, timeout: float = 10.0) -> float:
    """Seconds until every request slot is free again."""
    t0 = time.monotonic()
    while core.admission.free_slots() < core.admission.max_concurrent and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
    return time.monotonic() - t0


# ------------------------------------------------------------------------------ per-request budget


def test_a_request_over_the_cost_budget_is_refused_at_once_naming_figure_and_limit(
    root, gated, beats
) -> None:
    s = CoreServer(root, gated["public"], quotas=Quotas(max_request_cost=1000))
    engine = s.repository.get(MODEL).engine
    runs: list[str] = []
    run = engine.run
    engine.run = lambda graph, feeds, outputs: runs.append(graph) or run(graph, feeds, outputs)
    try:
        eight = beats[:8]
        ig = {"integrated_gradients": {"n_steps": 1000}}  # 8 ECGs x 1 target x 1000 rows + 8 forward
        code, msg = failure(lambda: s.explain(eight, ["integrated_gradients"], ig))
        assert code == EXHAUSTED and "8,008 model rows" in msg and "budget of 1,000" in msg, msg
        oip = {"method": "integrated_gradients", "parameters": json.dumps(ig["integrated_gradients"])}
        assert failure(lambda: s.infer(eight, oip)) == (EXHAUSTED, msg)
        # top_k counts every target it may name; the budget is the same on both protocols.
        code, msg = failure(
            lambda: s.explain(beats[:1], ["integrated_gradients"], {"integrated_gradients": {"n_steps": 200}},
                              targets=[pb.Target(top_k=5)])
        )  # fmt: skip
        assert code == EXHAUSTED and "1,001 model rows" in msg
        assert runs == []  # refused before any model pass
        assert s.explain(beats[:1], ["integrated_gradients"]).attributions  # 9 rows: within budget
    finally:
        engine.run = run
        s.close()


def test_the_audit_and_the_metrics_name_the_limit_that_refused(root, gated, beats) -> None:
    records = Records()
    s = CoreServer(root, gated["public"], audit=records, quotas=Quotas(max_request_cost=1000))
    try:
        ig = {"integrated_gradients": {"n_steps": 1000}}
        failure(lambda: s.explain(beats[:8], ["integrated_gradients"], ig))
        failure(lambda: s.infer(np.concatenate([beats] * 2)))  # over --max-batch
    finally:
        s.close()
    assert records.codes[-2:] == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    assert records.refusals[-2:] == ["cost_budget", "max_batch"]


# ------------------------------------------------------------------------------ per-caller quotas


@pytest.fixture(scope="module")
def tokens_server(root, gated, tmp_path_factory):
    access = tmp_path_factory.mktemp("core_tokens") / "access.toml"
    tokens = {n: add_token(access, n, ["predict", "explain"]) for n in ("ward", "lab")}
    security = load_server_security(tokens_file=access, insecure=True, env={})
    s = CoreServer(
        root, gated["public"], security=security, quotas=Quotas(caller_concurrent=1, caller_rate="6/minute"),
        max_concurrent=4,
    )  # fmt: skip
    yield s, {n: (("authorization", f"Bearer {t}"),) for n, t in tokens.items()}
    s.close()


def predict(s: CoreServer, beats: np.ndarray, metadata) -> pb.PredictResponse:
    request = pb.PredictRequest(model=MODEL, ecgs=[ecg_msg(b, s.leads) for b in beats])
    return s.ecgx.Predict(request, timeout=30, metadata=metadata)


def test_one_caller_cannot_take_every_slot(tokens_server, beats) -> None:
    s, meta = tokens_server
    busy = s.core.admission.admit(Caller("ward", "token"), CancelToken())  # ward's one request runs
    with busy:
        code, msg = failure(lambda: predict(s, beats[:1], meta["ward"]))
        assert code == EXHAUSTED and "caller 'ward'" in msg and "caller_concurrent = 1" in msg
        code, oip = failure(
            lambda: s.oip.ModelInfer(infer_request(beats[:1]), timeout=30, metadata=meta["ward"])
        )
        assert code == EXHAUSTED and "caller 'ward'" in oip
        assert predict(s, beats[:1], meta["lab"]).probabilities.data  # another caller is served
    assert predict(s, beats[:1], meta["ward"]).probabilities.data  # and ward again once its call ended


def test_a_callers_request_rate_is_limited_by_name(tokens_server, beats) -> None:
    s, meta = tokens_server
    codes = []
    for _ in range(8):
        try:
            predict(s, beats[:1], meta["lab"])
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
            last = e.details()
    assert "RESOURCE_EXHAUSTED" in codes and codes.count("OK") <= 6
    assert "caller 'lab'" in last and "rate quota" in last and "6 per 1 minute" in last


# ------------------------------------------------------------------------------ cancellation


@pytest.fixture(scope="module")
def observed(root, gated):
    records = Records()
    s = CoreServer(root, gated["public"], audit=records, max_concurrent=2)
    yield s, records
    s.close()


@pytest.mark.slow
def test_a_client_cancellation_frees_the_slot_within_a_chunk(observed, beats) -> None:
    s, records = observed
    request = pb.ExplainRequest(
        model=MODEL, ecgs=[ecg_msg(b, s.leads) for b in beats], methods=["kernel_shap"],
        parameters_json={"kernel_shap": json.dumps(LONG["kernel_shap"])},
    )  # fmt: skip
    future = s.ecgx.Explain.future(request, timeout=120)
    time.sleep(0.5)
    assert s.core.admission.free_slots() < s.core.admission.max_concurrent  # still computing
    assert future.cancel()
    assert wait_free(s.core) < 1.0
    time.sleep(0.2)
    assert records.codes[-1] == "CANCELLED"


@pytest.mark.slow
def test_a_deadline_stops_the_work_inside_the_engine_on_both_protocols(observed, beats) -> None:
    s, records = observed
    t0 = time.monotonic()
    code, _ = failure(lambda: s.explain(beats, ["kernel_shap"], LONG, timeout=1.0))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_free(s.core) + (time.monotonic() - t0) < 2.0
    parameters = {"method": "kernel_shap", "parameters": json.dumps(LONG["kernel_shap"])}
    t0 = time.monotonic()
    code, _ = failure(lambda: s.oip.ModelInfer(infer_request(beats, parameters), timeout=1.0))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_free(s.core) + (time.monotonic() - t0) < 2.0
    time.sleep(0.2)
    assert records.codes[-2:] == ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"]


def test_a_cancel_token_stops_an_engine_call_between_chunks(root, gated, beats) -> None:
    """The engine itself: a token cancelled from another thread ends ``attribute`` at the next chunk."""
    from ecgx.core.errors import Cancelled
    from ecgx.service.repository import ModelRepository

    engine = ModelRepository(root, [gated["public"]]).get(MODEL).engine
    token = CancelToken()
    view = engine.with_cancel(token)
    timer = threading.Timer(0.5, token.cancel, args=("stop",))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(Cancelled, match="stop"):
        view.attribute("kernel_shap", beats, 0, **LONG["kernel_shap"])
    assert time.monotonic() - t0 < 1.5
    assert engine._cancel is None  # the shared engine is untouched


# ------------------------------------------------------------------------------ shutdown


@pytest.mark.slow
def test_sigterm_exits_within_grace_plus_two_seconds_cancelling_long_calls(
    root, gated, beats, tmp_path
) -> None:
    grace = 1.0
    args = ["serve", "--repo", str(root), "--port", "0", "--trusted-key", str(gated["public_pem"])]
    args += ["--grace", str(grace), "--insecure"]
    main = "import sys; from ecgx.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", main, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path,
    )  # fmt: skip
    try:
        port, _ = serve_port(proc, "PLAINTEXT")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.ExplanationServiceStub(channel)
        leads = stub.GetModel(pb.GetModelRequest(model=MODEL)).versions[0].leads
        request = pb.ExplainRequest(
            model=MODEL, ecgs=[ecg_msg(b, leads) for b in beats], methods=["kernel_shap"],
            parameters_json={"kernel_shap": json.dumps(LONG["kernel_shap"])},
        )  # fmt: skip
        calls = [stub.Explain.future(request, timeout=120) for _ in range(2)]
        time.sleep(2.0)
        assert not any(c.done() for c in calls)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - t0
        log = proc.stderr.read()
        assert took < grace + 2.0, (took, log[-3000:])
        assert proc.returncode == 0, log[-3000:]
        for c in calls:
            assert c.exception() is not None  # the clients are told, not left waiting
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ configuration


def test_quotas_come_from_the_serve_config_and_flags(tmp_path) -> None:
    from ecgx.service.serve_config import ServeConfigError, resolve_serve_config

    config = tmp_path / "serve.toml"
    config.write_text('[serve]\nrepo = "r"\nmax_request_cost = 5000\ncaller_rate = "20/second"\n')
    q = resolve_serve_config(config, {"caller_concurrent": 2}).quotas()
    assert (q.max_request_cost, q.caller_rate, q.caller_concurrent) == (5000, "20/second", 2)
    off = resolve_serve_config(config, {"max_request_cost": 0, "caller_rate": "off"}).quotas()
    assert off.max_request_cost is None and off.caller_rate is None
    with pytest.raises(ServeConfigError, match="caller_rate must be a rate such as '600/minute'"):
        resolve_serve_config(config, {"caller_rate": "lots"})
    with pytest.raises(ServeConfigError, match="caller_concurrent must be in"):
        resolve_serve_config(config, {"caller_concurrent": 0})


def test_a_queued_request_leaves_the_queue_when_cancelled_and_shutdown_reaches_running_ones() -> None:
    from ecgx.core.errors import Cancelled, ResourceExhausted
    from ecgx.service.admission import Admission

    admission = Admission(Quotas(max_concurrent=1, max_queued=1))
    running = CancelToken()
    with admission.admit(Caller(), running):
        waiting = CancelToken()
        threading.Timer(0.2, waiting.cancel, args=("the client left",)).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled, match="the client left"), admission.admit(Caller(), waiting):
            pass
        assert time.monotonic() - t0 < 0.6  # a queued request looks at its token every 0.1 s
        full = Admission(Quotas(max_concurrent=1, max_queued=0))
        busy = pytest.raises(ResourceExhausted, match="--max-queued")
        with full.admit(Caller(), CancelToken()), busy, full.admit(Caller(), CancelToken()):
            pass
        assert admission.cancel_all("the server is shutting down") == 1 and running.cancelled
        with pytest.raises(Cancelled, match="shutting down"):
            running.check()
    assert admission.free_slots() == 1 and admission.running() == 0
