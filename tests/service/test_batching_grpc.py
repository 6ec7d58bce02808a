"""Dynamic batching over real gRPC channels on loopback, on the real engine (issue #21).

Two in-process servers over the same repository (the session's gated package, research mode so
that saliency and integrated gradients serve): one batching (preferred batch 16; a request waits up
to 1 s for a busy engine, so requests queue behind a running batch), one with batching off, whose
answers are the reference. On this CNN the engine's rows do not depend on the batch they run in
(tests/service/test_engine.py), so merged answers must equal the unbatched ones bit for bit.

The lane's state (requests queued, batches running) is read from the in-process server's batcher
to know when requests are queued behind a running batch, never to change it.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import grpc
import numpy as np
import pytest
from repo_helpers import make_package

from ecgx.core.dataset import load_dataset
from ecgx.core.schema import LEADS
from ecgx.core.signing import load_public_key
from ecgx.service.audit import AuditLog
from ecgx.service.batcher import BatchingConfig, BatchingQuotas, BatchPolicy
from ecgx.service.metrics import ServiceMetrics
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2_grpc as pb_grpc
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server

SLOTS = 32
IG = "integrated_gradients"
# Long enough that requests sent after it starts find it still running on a loaded 2-core machine.
HOLD = {"n_steps": 1000}
QUICK = {"n_steps": 1000}  # the same key as HOLD: they share a lane


class Server:
    def __init__(self, root: Path, public: Path, folder: Path, batching: BatchingConfig):
        self.repository = ModelRepository(root, [load_public_key(public)], allow_ungated=True)
        self.metrics = ServiceMetrics(self.repository, stability_share=0.0)
        self.audit_path = folder / "audit.jsonl"
        self.audit = AuditLog(self.audit_path)
        quotas = BatchingQuotas(batching=batching, caller_rate=None)
        self.server, self.port, self.servicer, _ = build_server(
            self.repository,
            security=ServerSecurity.plaintext_unauthenticated(),
            host="127.0.0.1",
            port=0,
            max_concurrent=SLOTS,
            max_queued=SLOTS,
            audit=self.audit,
            metrics=self.metrics,
            quotas=quotas,
        )
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.ExplanationServiceStub(self.channel)

    @property
    def batcher(self):
        return self.servicer.core.batcher

    def lane_state(self) -> list[tuple[int, int]]:
        """(requests waiting, batches running) of every lane."""
        with self.batcher._lock:
            return [(lane.waiting, lane.running) for lane in self.batcher._lanes.values()]

    def audit_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def batches(self, method: str, le: str = "+Inf") -> float:
        """Batches of at most ``le`` ECGs formed for ``method`` on model ecg (the histogram's bucket)."""
        labels = {"model": "ecg", "method": method, "le": le}
        return self.metrics.registry.get_sample_value("ecgx_dynamic_batch_ecgs_bucket", labels) or 0.0

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)
        self.audit.close()


@pytest.fixture(scope="module")
def repo(gated, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batching") / "repo"
    make_package(gated, root / "ecg" / "1", 0)
    return {"root": root, "public": gated["public_pem"], "data": gated["family"]["data"]}


@pytest.fixture(scope="module")
def on(repo, tmp_path_factory: pytest.TempPathFactory):
    policy = BatchPolicy(preferred_batch_size=16, max_queue_delay_ms=1000)
    s = Server(repo["root"], repo["public"], tmp_path_factory.mktemp("on"), BatchingConfig(policy))
    yield s
    s.close()


@pytest.fixture(scope="module")
def off(repo, tmp_path_factory: pytest.TempPathFactory):
    s = Server(repo["root"], repo["public"], tmp_path_factory.mktemp("off"), BatchingConfig.off())
    yield s
    s.close()


@pytest.fixture(scope="module")
def ecgs(repo) -> np.ndarray:
    return np.asarray(load_dataset(repo["data"]).signals[:16], dtype=np.float32)


def _request(x: np.ndarray, method: str, target: int, settings: dict | None = None) -> pb.ExplainRequest:
    x = np.asarray(x, dtype="<f4").reshape(-1, len(LEADS), x.shape[-1])
    msgs = [
        pb.Ecg(leads=list(LEADS), sampling_rate_hz=500.0, units=pb.MILLIVOLT, samples_per_lead=e.shape[-1],
               samples=e.tobytes())
        for e in x
    ]  # fmt: skip
    return pb.ExplainRequest(
        model="ecg",
        ecgs=msgs,
        methods=[method],
        targets=[pb.Target(index=target)],
        parameters_json={method: json.dumps(settings or {})},
    )


def _maps(response: pb.ExplainResponse) -> np.ndarray:
    return np.stack([np.frombuffer(a.attribution.data, "<f4").reshape(12, -1) for a in response.attributions])


def _until(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.002)


def _hold(server: Server, ecgs: np.ndarray):
    """A 15-ECG request (under the preferred batch, so it runs through the batcher) that keeps the
    integrated-gradients lane busy: 15,000 model rows; returns its future once it runs."""
    future = server.stub.Explain.future(_request(ecgs[:15], IG, 0, HOLD), timeout=120)
    _until(lambda: any(running for _, running in server.lane_state()) or future.done())
    assert not future.done(), "the holding request ended before the test could queue behind it"
    return future


def _queued(server: Server, n: int) -> None:
    """Wait until ``n`` requests are in the lane (the holder included)."""
    _until(lambda: any(waiting >= n for waiting, _ in server.lane_state()))


def test_concurrent_single_ecg_requests_are_merged_each_getting_exactly_its_own_answer(on, off, ecgs) -> None:
    jobs = [(k % len(ecgs), k % 5) for k in range(12)]  # ECG and target per client
    expected = {job: _maps(off.stub.Explain(_request(ecgs[job[0]], "saliency", job[1]))) for job in set(jobs)}
    barrier = Barrier(len(jobs))

    def client(job: tuple[int, int]) -> np.ndarray:
        barrier.wait()
        return _maps(on.stub.Explain(_request(ecgs[job[0]], "saliency", job[1]), timeout=60))

    for _ in range(20):  # all at once: the first runs alone, most of the rest queue behind it
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(client, jobs))
        for job, maps in zip(jobs, got, strict=True):
            assert np.array_equal(maps, expected[job]), job  # its own ECG and target, bit for bit
        formed, single = on.batches("saliency"), on.batches("saliency", "1.0")
        if formed > single:
            break
        barrier.reset()
    assert formed > single, "no batch of more than one ECG formed in 20 rounds of 12 concurrent requests"
    assert on.batcher.lanes() == 0  # nothing left behind


def test_batching_off_gives_identical_answers_for_every_deterministic_method(on, off, ecgs) -> None:
    for method, settings in (("saliency", {}), (IG, {"n_steps": 16}), ("deeplift", {}), ("gradcam", {})):
        for k in (0, 3):
            req = _request(ecgs[k : k + 2], method, k, settings)
            assert np.array_equal(_maps(on.stub.Explain(req)), _maps(off.stub.Explain(req))), (method, k)


def test_a_request_cancelled_in_the_queue_leaves_and_the_others_get_their_answers(on, off, ecgs) -> None:
    expected = {k: _maps(off.stub.Explain(_request(ecgs[k], IG, 1, QUICK))) for k in (1, 2, 3)}
    holder = _hold(on, ecgs)
    futures = {}
    for k in (1, 2, 3):
        futures[k] = on.stub.Explain.future(_request(ecgs[k], IG, 1, QUICK), timeout=120)
        _queued(on, 1 + k)
    futures[2].cancel()
    assert _maps(futures[1].result()).shape == (1, 12, 600)
    assert np.array_equal(_maps(futures[1].result()), expected[1])
    assert np.array_equal(_maps(futures[3].result()), expected[3])
    assert futures[2].cancelled()
    assert len(holder.result().attributions) == 15
    _until(lambda: on.batcher.lanes() == 0, 10)
    _until(lambda: any(line["code"] == "CANCELLED" for line in on.audit_lines()), 10)


def test_a_deadline_passing_in_the_queue_fails_that_request_alone(on, off, ecgs) -> None:
    expected = _maps(off.stub.Explain(_request(ecgs[4], IG, 2, QUICK)))
    holder = _hold(on, ecgs)
    short = on.stub.Explain.future(_request(ecgs[5], IG, 2, QUICK), timeout=0.05)
    other = on.stub.Explain.future(_request(ecgs[4], IG, 2, QUICK), timeout=120)
    assert short.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert np.array_equal(_maps(other.result()), expected)
    assert len(holder.result().attributions) == 15


def test_a_bad_request_among_good_ones_fails_alone_with_invalid_argument(on, off, ecgs) -> None:
    bad = ecgs[6].copy()
    bad[3, 100] = np.nan
    expected = {k: _maps(off.stub.Explain(_request(ecgs[k], IG, 3, QUICK))) for k in (6, 7)}
    holder = _hold(on, ecgs)
    good = {k: on.stub.Explain.future(_request(ecgs[k], IG, 3, QUICK), timeout=120) for k in (6, 7)}
    failed = on.stub.Explain.future(_request(bad, IG, 3, QUICK), timeout=120)
    error = failed.exception()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in error.details(), error.details()
    for k, future in good.items():
        assert np.array_equal(_maps(future.result()), expected[k]), k
    assert len(holder.result().attributions) == 15


def test_every_merged_call_has_its_own_audit_line_cost_and_targets(on, ecgs) -> None:
    before = len(on.audit_lines())
    fours = on.batches(IG, "4.0") - on.batches(IG, "2.0")
    holder = _hold(on, ecgs)
    futures = [on.stub.Explain.future(_request(ecgs[k], IG, k, QUICK), timeout=120) for k in range(4)]
    _queued(on, 5)
    for future in futures:
        assert len(future.result().attributions) == 1
    ids = {dict(f.trailing_metadata())["x-request-id"] for f in futures}
    holder.result()
    _until(lambda: len(on.audit_lines()) >= before + 5, 10)
    lines = {line["request_id"]: line for line in on.audit_lines()[before:]}
    assert len(lines) == 5 and ids <= set(lines)  # one line per call, merged or not
    for request_id in ids:
        line = lines[request_id]
        assert line["code"] == "OK" and line["batch_size"] == 1 and line["engine_ms"] > 0, line
        assert line["methods"] == [IG] and len(line["targets"]) == 1, line
    keys = on.repository.get("ecg").engine.package.class_keys
    assert sorted(lines[i]["targets"][0] for i in ids) == sorted(keys[k] for k in range(4))  # each its own
    # The four queued behind the holder ran as one batch of four (3 or 4 ECGs: a bucket of its own).
    assert on.batches(IG, "4.0") - on.batches(IG, "2.0") == fours + 1
